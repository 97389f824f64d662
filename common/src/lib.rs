//! Code shared by the enclave, the host relay and the client: the NSM abstraction (the real
//! `/dev/nsm` driver and, behind the `mock-nsm` feature, a mock NSM with its own persisted CA),
//! the sealed-model format, and, as later issues land, the host↔enclave wire protocol.
//!
//! Nothing here does async I/O: the crate works on byte slices and typed values, and the
//! binaries own sockets and files (DESIGN.md §2).

pub mod cbor;
#[cfg(feature = "cli")]
pub mod cli;
pub mod cms;
pub mod nsm;
pub mod sealed;
pub mod wire;

#[cfg(feature = "mock-nsm")]
pub mod mock_ca;
