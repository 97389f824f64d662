//! Verifies AWS Nitro Enclaves attestation documents.
//!
//! `bytes → UnverifiedDocument → verify(anchors, now, policy) → VerifiedDocument`. The steps
//! run in a fixed order: parse the COSE_Sign1 envelope and payload, validate the certificate
//! chain to a pinned root, check the ES384 signature, then apply the caller's [`Policy`].
//! No payload field leaves [`verify`] unless every step holds, and only a
//! [`VerifiedDocument`] hands out the enclave's public key and user data.
//!
//! There is no I/O and no clock inside: the caller passes the roots and the time
//! ([`UnixTime`]), so expired real documents can be verified at their own timestamp.
//!
//! References: AWS, "Verifying the root of trust" and aws-nitro-enclaves-nsm-api
//! `docs/attestation_process.md`; RFC 9052 (COSE), RFC 9053 (ES384), RFC 5280 (X.509),
//! RFC 8949 (CBOR).

#![forbid(unsafe_code)]

mod cbor;
mod chain;
mod document;
pub mod eif;
mod error;
mod policy;

pub use cbor::{CborError, CborErrorKind};
pub use chain::{AnchorError, TrustAnchor, AWS_NITRO_ROOT_G1_SHA256};
pub use document::{
    Fields, Pcr, UnverifiedDocument, MAX_CABUNDLE, MAX_CERTIFICATE, MAX_DOCUMENT_SIZE,
    MAX_OPTIONAL_FIELD, MAX_PCRS, PCR_LEN, PROTECTED_HEADER, SIGNATURE_LEN,
};
pub use error::{CertPosition, VerifyError};
pub use policy::{
    load_file, parse_hex, parse_measurements, parse_pcr_index, parse_pcr_value, resolve_against,
    Policy, PolicyError, PolicyFile, DEFAULT_MAX_CLOCK_SKEW,
};

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time, in milliseconds since the Unix epoch. Verification takes it as input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnixTime(u64);

impl UnixTime {
    /// From milliseconds since the epoch (the unit of a document's `timestamp`).
    pub const fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    /// The system clock, read by the caller (never inside [`verify`]).
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }
}

impl From<SystemTime> for UnixTime {
    fn from(t: SystemTime) -> Self {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Self(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A document whose chain, signature and policy all held. Its fields can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDocument {
    fields: Fields,
    anchor: usize,
    debug: bool,
}

impl VerifiedDocument {
    /// The issuing NSM's module id.
    pub fn module_id(&self) -> &str {
        &self.fields.module_id
    }
    /// When the NSM made the document, in ms since the epoch.
    pub fn timestamp(&self) -> UnixTime {
        UnixTime(self.fields.timestamp)
    }
    /// All PCRs the document carries.
    pub fn pcrs(&self) -> &BTreeMap<u8, Pcr> {
        &self.fields.pcrs
    }
    /// One PCR.
    pub fn pcr(&self, index: u8) -> Option<&Pcr> {
        self.fields.pcrs.get(&index)
    }
    /// The public key the enclave attested, if any.
    pub fn public_key(&self) -> Option<&[u8]> {
        self.fields.public_key.as_deref()
    }
    /// The user data, if any.
    pub fn user_data(&self) -> Option<&[u8]> {
        self.fields.user_data.as_deref()
    }
    /// The nonce, if any.
    pub fn nonce(&self) -> Option<&[u8]> {
        self.fields.nonce.as_deref()
    }
    /// The signing certificate, DER.
    pub fn certificate(&self) -> &[u8] {
        &self.fields.certificate
    }
    /// The CA bundle, root first, DER.
    pub fn cabundle(&self) -> &[Vec<u8>] {
        &self.fields.cabundle
    }
    /// Index, in the `anchors` passed to [`verify`], of the root the chain ends in.
    pub fn anchor_index(&self) -> usize {
        self.anchor
    }
    /// Whether the enclave runs in debug mode (PCR0, PCR1 and PCR2 all zero); only possible
    /// when the policy allowed it.
    pub fn is_debug(&self) -> bool {
        self.debug
    }
}

/// Verifies an attestation document: parse, chain, signature, policy, in that order.
pub fn verify(
    bytes: &[u8],
    anchors: &[TrustAnchor],
    now: UnixTime,
    policy: &Policy,
) -> Result<VerifiedDocument, VerifyError> {
    UnverifiedDocument::parse(bytes)?.verify(anchors, now, policy)
}

impl UnverifiedDocument {
    /// Verifies this document: chain, signature, policy.
    pub fn verify(
        self,
        anchors: &[TrustAnchor],
        now: UnixTime,
        policy: &Policy,
    ) -> Result<VerifiedDocument, VerifyError> {
        let chain = chain::validate(
            &self.fields.certificate,
            &self.fields.cabundle,
            anchors,
            now,
            UnixTime::from_millis(self.fields.timestamp),
        )?;
        chain::verify_es384(&chain.leaf_key, &self.sig_structure(), &self.signature)?;
        policy.check(&self.fields, now)?;
        let debug = (0..3u8).all(|i| {
            self.fields
                .pcrs
                .get(&i)
                .is_some_and(|p| p.iter().all(|&b| b == 0))
        });
        Ok(VerifiedDocument {
            fields: self.fields,
            anchor: chain.anchor,
            debug,
        })
    }

    /// Sig_structure (RFC 9052 §4.4): `["Signature1", protected, h'', payload]`, built from the
    /// received protected and payload bytes, never from a re-encoding.
    fn sig_structure(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + 32);
        out.push(0x84); // array(4)
        out.push(0x6a); // text(10)
        out.extend_from_slice(b"Signature1");
        bstr_head(&mut out, self.protected.len());
        out.extend_from_slice(&self.protected);
        out.push(0x40); // external_aad: empty byte string
        bstr_head(&mut out, self.payload.len());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// A definite byte-string head of minimal length (RFC 8949 §4.2.1).
fn bstr_head(out: &mut Vec<u8>, len: usize) {
    match len {
        0..=23 => out.push(0x40 | len as u8),
        24..=0xff => out.extend_from_slice(&[0x58, len as u8]),
        0x100..=0xffff => {
            out.push(0x59);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x5a);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
}
