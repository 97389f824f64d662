//! Verifying a client attestation document (DESIGN.md §4.3), in this order:
//! 1. the document itself, with `attestation-verifier`: COSE signature, the certificate chain
//!    to the policy's root, PCR0-2 (and 8) of the image, PCR16 (model) and PCR17 (runtime
//!    configuration) derived from the policy's digests, debug mode, age, and the nonce this
//!    client just drew;
//! 2. the key binding in `user_data` (`common::binding`): version, context, the same model and
//!    configuration digests as the PCRs, and the SHA-256 of the attested `public_key`;
//! 3. the `public_key` itself: a valid OHTTP key configuration whose key id is the bound one.
//!
//! Only a document that passes all three yields an [`Attested`] key to encrypt to.

use crate::policy::ClientPolicy;
use attestation_verifier::{Pcr, UnixTime, VerifyError};
use common::binding::{Binding, BindingError};
use common::channel::{key_config_id, ChannelError};
use common::sealed::sha256;
use serde::Serialize;
use std::collections::BTreeMap;

/// Why an attestation document was refused.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The document failed verification (signature, chain, PCRs, debug, age or nonce).
    #[error("attestation document refused: {0}")]
    Document(#[from] VerifyError),
    /// The document attests no key.
    #[error("the document attests no public key")]
    NoKey,
    /// The document has no key binding (the enclave has no model yet, or is not this product).
    #[error("the document has no user_data key binding (is a model loaded?)")]
    NoBinding,
    /// The binding is malformed.
    #[error(transparent)]
    Binding(#[from] BindingError),
    /// The binding names another key than the attested one.
    #[error("the key binding does not match the attested public key")]
    KeyNotBound,
    /// The binding's digests disagree with the PCRs the policy checked.
    #[error("the key binding's {0} digest does not match the policy")]
    DigestMismatch(&'static str),
    /// The attested key configuration is unusable.
    #[error("the attested key configuration: {0}")]
    KeyConfig(#[from] ChannelError),
    /// The configuration's key id is not the bound one.
    #[error("the key configuration's id is not the bound key id")]
    KeyIdMismatch,
}

/// A verified enclave key and what the document said about it.
#[derive(Debug, Clone)]
pub struct Attested {
    /// The encoded OHTTP key configuration to encrypt to.
    pub key_config: Vec<u8>,
    /// The binding: model, key id, digests.
    pub binding: Binding,
    /// Every PCR in the document.
    pub pcrs: BTreeMap<u8, Pcr>,
    /// When the NSM made the document, in ms since the epoch.
    pub timestamp_ms: u64,
    /// The NSM's module id.
    pub module_id: String,
    /// SHA-256 of the root the chain ends in.
    pub root_sha256: [u8; 32],
}

/// Verifies `doc` against `policy` and the `nonce` this client sent.
pub fn verify(
    doc: &[u8],
    policy: &ClientPolicy,
    nonce: &[u8],
    now: UnixTime,
) -> Result<Attested, AttestError> {
    let mut checks = policy.verifier.clone();
    checks.nonce = Some(nonce.to_vec());
    let verified = attestation_verifier::verify(doc, &policy.anchors, now, &checks)?;
    let key_config = verified.public_key().ok_or(AttestError::NoKey)?.to_vec();
    let binding = Binding::decode(verified.user_data().ok_or(AttestError::NoBinding)?)?;
    if binding.key_config_sha256 != sha256(&key_config) {
        return Err(AttestError::KeyNotBound);
    }
    // The PCRs were checked against the policy's digests; the binding must name the same.
    if binding.model_sha256 != policy.model_sha256 {
        return Err(AttestError::DigestMismatch("model"));
    }
    if binding.config_sha256 != policy.config_sha256 {
        return Err(AttestError::DigestMismatch("configuration"));
    }
    if key_config_id(&key_config)? != binding.key_id {
        return Err(AttestError::KeyIdMismatch);
    }
    let root_sha256 = policy
        .anchors
        .get(verified.anchor_index())
        .map(|a| a.sha256())
        .unwrap_or_default();
    Ok(Attested {
        key_config,
        binding,
        pcrs: verified.pcrs().clone(),
        timestamp_ms: verified.timestamp().as_millis(),
        module_id: verified.module_id().to_owned(),
        root_sha256,
    })
}

/// What was verified, for people: `client attest` prints it and the proxy serves it.
#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    /// Always true: facts exist only for verified documents.
    pub verified: bool,
    /// The model's name.
    pub model: String,
    /// The model's SHA-256 (PCR16's input).
    pub model_sha256: String,
    /// The runtime configuration's SHA-256 (PCR17's input).
    pub config_sha256: String,
    /// The OHTTP key id.
    pub key_id: u8,
    /// SHA-256 of the attested OHTTP key configuration.
    pub key_config_sha256: String,
    /// The document's time (RFC 3339, UTC).
    pub document_time: String,
    /// The NSM module.
    pub module_id: String,
    /// The root the chain ends in (SHA-256 of its DER).
    pub root_sha256: String,
    /// PCRs by index, hex.
    pub pcrs: BTreeMap<String, String>,
}

impl Attested {
    /// The verified facts.
    pub fn facts(&self) -> Facts {
        let time = time::OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(self.timestamp_ms) * 1_000_000,
        )
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
        Facts {
            verified: true,
            model: self.binding.model.clone(),
            model_sha256: hex::encode(self.binding.model_sha256),
            config_sha256: hex::encode(self.binding.config_sha256),
            key_id: self.binding.key_id,
            key_config_sha256: hex::encode(self.binding.key_config_sha256),
            document_time: time,
            module_id: self.module_id.clone(),
            root_sha256: hex::encode(self.root_sha256),
            pcrs: self
                .pcrs
                .iter()
                .filter(|(i, _)| matches!(i, 0..=4 | 8 | 16 | 17))
                .map(|(i, v)| (i.to_string(), hex::encode(v)))
                .collect(),
        }
    }
}
