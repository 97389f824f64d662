//! The enclave application: everything that runs inside the Nitro Enclave. Provisioning
//! (attested key release and in-memory unsealing) is here; inference and the attested client
//! endpoint arrive with issues 4 and 6.
//!
//! Everything from the host is untrusted input: bounded, checked, and answered with
//! content-free errors.

#![forbid(unsafe_code)]

pub mod provision;
