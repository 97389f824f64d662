//! The untrusted host relay on the parent instance (DESIGN.md §1–§4). It may see ciphertext,
//! sizes and timing, never content: it seals models for the enclave, calls KMS on the
//! enclave's behalf (KMS encrypts the key to the enclave's attested key), and streams sealed
//! weights to it; and `serve` is the client-facing relay that forwards attestation requests
//! and opaque OHTTP streams to the enclave and keeps it provisioned.

#![forbid(unsafe_code)]

pub mod apikeys;
pub mod kms;
pub mod policy;
pub mod provision;
pub mod seal;
pub mod serve;
