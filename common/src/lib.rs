//! Code shared by the enclave, the host relay and the client: the NSM abstraction (the real
//! `/dev/nsm` driver and, behind the `mock-nsm` feature, a mock NSM with its own persisted CA),
//! the sealed-model format, the host↔enclave wire protocol and transport, and the client↔enclave
//! channel (binary HTTP inside chunked Oblivious HTTP, and the attested key binding).
//!
//! The codecs do no I/O: they work on byte slices and typed values. The `tokio` feature adds
//! the socket side (`wire::io` framing and the vsock/Unix [`transport`]) for the binaries
//! (DESIGN.md §2).

pub mod apikeys;
pub mod audit;
pub mod bhttp;
pub mod binding;
pub mod cbor;
#[cfg(feature = "ohttp")]
pub mod channel;
#[cfg(feature = "cli")]
pub mod cli;
pub mod clock;
pub mod cms;
pub mod media;
pub mod nsm;
pub mod sealed;
#[cfg(feature = "tokio")]
pub mod transport;
pub mod wire;

#[cfg(feature = "mock-nsm")]
pub mod mock_ca;
