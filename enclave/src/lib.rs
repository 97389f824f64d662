//! The enclave application: everything that runs inside the Nitro Enclave. Provisioning
//! (attested key release and in-memory unsealing), and the listener that serves the host's
//! control connection, attestation documents and opaque request streams.
//!
//! Everything from the host is untrusted input: bounded, checked, and answered with
//! content-free errors.

#![forbid(unsafe_code)]

pub mod provision;
pub mod server;
