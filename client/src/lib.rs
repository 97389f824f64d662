//! Verifies the enclave's attestation, then talks to it end to end; also a local OpenAI-compatible proxy.

#![forbid(unsafe_code)]
