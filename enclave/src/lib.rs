//! The enclave application: everything that runs inside the Nitro Enclave. Provisioning
//! (attested key release and in-memory unsealing), the measured runtime configuration (PCR17),
//! the listener that serves the host's control connection, attestation documents and opaque
//! request streams, and the attested OHTTP gateway that answers OpenAI API requests.
//!
//! Everything from the host is untrusted input: bounded, checked, and answered with
//! content-free errors.

#![forbid(unsafe_code)]

pub mod gateway;
pub mod openai;
pub mod provision;
pub mod runtime;
pub mod server;
