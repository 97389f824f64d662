//! Code shared by the enclave, the host relay and the client: the NSM abstraction (the real
//! `/dev/nsm` driver and, behind the `mock-nsm` feature, a mock NSM with its own persisted CA),
//! and, as later issues land, the host↔enclave wire protocol and the sealed-model format.
//!
//! Nothing here does async I/O: the crate works on byte slices and typed values, and the
//! binaries own sockets and files (DESIGN.md §2).

pub mod cbor;
pub mod nsm;

#[cfg(feature = "mock-nsm")]
pub mod mock_ca;
