//! The one error type of the verifier: every variant names the check that failed, with the
//! structured context a caller needs to act on it (STYLE.md, "one error enum per library").

use crate::cbor::CborError;
use std::fmt;

/// Where in the chain a certificate sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertPosition {
    /// `cabundle[i]`; `cabundle[0]` is the root.
    CaBundle(usize),
    /// The document's signing certificate.
    Leaf,
}

impl fmt::Display for CertPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CaBundle(i) => write!(f, "cabundle[{i}]"),
            Self::Leaf => f.write_str("leaf certificate"),
        }
    }
}

/// Why a document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    // --- size and encoding ---------------------------------------------------------------
    /// The input is larger than any real attestation document.
    #[error("document is {size} bytes; the maximum is {max}")]
    DocumentTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not the CBOR this profile allows.
    #[error("malformed CBOR in the {part}: {error}")]
    Cbor {
        /// `envelope` or `payload`.
        part: &'static str,
        /// What and where.
        error: CborError,
    },

    // --- COSE_Sign1 envelope (RFC 9052 §4.2) ----------------------------------------------
    /// A tag other than 18 (COSE_Sign1) wraps the envelope.
    #[error("envelope has CBOR tag {tag}; only untagged or tag 18 is allowed")]
    UnexpectedTag {
        /// The tag found.
        tag: u64,
    },
    /// The envelope is not a definite-length array of 4.
    #[error("envelope is not a definite-length array of 4 items")]
    EnvelopeShape,
    /// The protected header is not exactly `{1: -35}` (ES384).
    #[error("protected header is not exactly a1 01 38 22 (alg ES384)")]
    ProtectedHeader,
    /// The unprotected header is not the empty map.
    #[error("unprotected header is not the empty map")]
    UnprotectedHeader,
    /// The signature is not a 96-byte raw r‖s.
    #[error("signature is {len} bytes; ES384 needs 96")]
    SignatureLength {
        /// Its length.
        len: usize,
    },

    // --- payload (AWS attestation document) ------------------------------------------------
    /// The payload has a key outside the nine AWS defines.
    #[error("unknown payload field {key:?}")]
    UnknownField {
        /// The key, lossily decoded.
        key: String,
    },
    /// A payload key appears twice.
    #[error("duplicate payload field {field}")]
    DuplicateField {
        /// The field.
        field: &'static str,
    },
    /// A mandatory payload field is absent.
    #[error("missing payload field {field}")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// A payload field has the wrong CBOR type.
    #[error("payload field {field} has the wrong type: expected {expected}")]
    FieldType {
        /// The field.
        field: &'static str,
        /// What it should be.
        expected: &'static str,
    },
    /// A payload field's size is out of bounds.
    #[error("payload field {field} has {len} elements or bytes; allowed {min}..={max}")]
    FieldSize {
        /// The field.
        field: &'static str,
        /// Its size.
        len: usize,
        /// Smallest allowed.
        min: usize,
        /// Largest allowed.
        max: usize,
    },
    /// The digest is not SHA384.
    #[error("digest is {got:?}; only SHA384 is allowed")]
    UnsupportedDigest {
        /// What the document says.
        got: String,
    },
    /// The timestamp is zero.
    #[error("timestamp is zero")]
    ZeroTimestamp,
    /// A PCR index is 32 or more.
    #[error("PCR index {index} is out of range 0..32")]
    PcrIndexOutOfRange {
        /// The index.
        index: u64,
    },
    /// A PCR index appears twice.
    #[error("PCR{index} appears twice")]
    DuplicatePcr {
        /// The index.
        index: u8,
    },

    // --- certificate chain (RFC 5280 §6.1) --------------------------------------------------
    /// `cabundle[0]` is not byte-identical to a trusted root.
    #[error("cabundle[0] is not a trusted root")]
    UntrustedRoot,
    /// The chain is longer than allowed.
    #[error("certificate chain of {len} certificates is longer than {max}")]
    ChainTooLong {
        /// Its length, leaf included.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A certificate is not valid DER X.509.
    #[error("{position}: not a valid X.509 certificate: {reason}")]
    CertificateParse {
        /// Which one.
        position: CertPosition,
        /// The decoder's message.
        reason: String,
    },
    /// A certificate is not X.509 v3.
    #[error("{position}: not an X.509 v3 certificate")]
    CertificateVersion {
        /// Which one.
        position: CertPosition,
    },
    /// A certificate's validity ended before `now`.
    #[error("{position} expired at {not_after_ms} ms (now {now_ms} ms)")]
    CertificateExpired {
        /// Which one.
        position: CertPosition,
        /// Its notAfter, ms since the epoch.
        not_after_ms: u64,
        /// The verification time.
        now_ms: u64,
    },
    /// A certificate was not valid at the document's own timestamp (though it is now).
    #[error("{position} was not valid at the document's timestamp {timestamp_ms} ms")]
    CertificateInvalidAtTimestamp {
        /// Which one.
        position: CertPosition,
        /// The document's timestamp, ms since the epoch.
        timestamp_ms: u64,
    },
    /// A certificate's validity starts after `now`.
    #[error("{position} is not valid before {not_before_ms} ms (now {now_ms} ms)")]
    CertificateNotYetValid {
        /// Which one.
        position: CertPosition,
        /// Its notBefore, ms since the epoch.
        not_before_ms: u64,
        /// The verification time.
        now_ms: u64,
    },
    /// A certificate's issuer is not the subject of the one above it.
    #[error("{position}: issuer does not match the subject of its issuing certificate")]
    IssuerMismatch {
        /// Which one.
        position: CertPosition,
    },
    /// A CA certificate lacks basicConstraints cA=TRUE.
    #[error("{position} is used as a CA but is not one (basicConstraints)")]
    NotCa {
        /// Which one.
        position: CertPosition,
    },
    /// A CA certificate's pathLenConstraint is exceeded.
    #[error("{position} allows {path_len} intermediate CAs below it; the chain has {below}")]
    PathLenExceeded {
        /// Which one.
        position: CertPosition,
        /// Its constraint.
        path_len: u8,
        /// How many CAs follow it.
        below: usize,
    },
    /// A CA certificate lacks keyUsage keyCertSign.
    #[error("{position} lacks keyUsage keyCertSign")]
    MissingKeyCertSign {
        /// Which one.
        position: CertPosition,
    },
    /// The leaf certificate is a CA.
    #[error("the leaf certificate is a CA")]
    LeafIsCa,
    /// The leaf certificate lacks keyUsage digitalSignature.
    #[error("the leaf certificate lacks keyUsage digitalSignature")]
    LeafMissingDigitalSignature,
    /// A certificate has a critical extension this verifier does not process.
    #[error("{position} has an unknown critical extension {oid}")]
    UnknownCriticalExtension {
        /// Which one.
        position: CertPosition,
        /// The extension's OID.
        oid: String,
    },
    /// A certificate has the same extension twice.
    #[error("{position} has extension {oid} twice")]
    DuplicateExtension {
        /// Which one.
        position: CertPosition,
        /// The extension's OID.
        oid: String,
    },
    /// A known extension does not decode.
    #[error("{position}: extension {oid} is malformed")]
    MalformedExtension {
        /// Which one.
        position: CertPosition,
        /// The extension's OID.
        oid: String,
    },
    /// A signature or key algorithm other than ECDSA P-384 with SHA-384.
    #[error("{position}: unsupported algorithm {oid} (only ECDSA P-384 / SHA-384)")]
    UnsupportedAlgorithm {
        /// Which one.
        position: CertPosition,
        /// The algorithm's OID.
        oid: String,
    },
    /// A certificate's signature does not verify under its issuer's key.
    #[error("{position}: signature does not verify under its issuer's key")]
    CertificateSignature {
        /// Which one.
        position: CertPosition,
    },

    // --- document signature -----------------------------------------------------------------
    /// The COSE signature does not verify under the leaf certificate's key.
    #[error("COSE_Sign1 signature does not verify under the leaf certificate's key")]
    Signature,

    // --- policy -----------------------------------------------------------------------------
    /// The document comes from a debug-mode enclave and the policy does not allow that.
    #[error("debug-mode enclave (PCR0, PCR1 and PCR2 are all zero) and debug is not allowed")]
    DebugMode,
    /// A PCR the policy names is absent from the document.
    #[error("PCR{index} is required by the policy but absent from the document")]
    PcrMissing {
        /// The index.
        index: u8,
    },
    /// A PCR differs from the policy's value.
    #[error(
        "PCR{index} mismatch: expected {}, got {}",
        hex::encode(expected),
        hex::encode(got)
    )]
    PcrMismatch {
        /// The index.
        index: u8,
        /// What the policy wants.
        expected: Vec<u8>,
        /// What the document has.
        got: Vec<u8>,
    },
    /// The document is older than the policy allows.
    #[error("document is {age_ms} ms old; the maximum is {max_ms} ms")]
    TooOld {
        /// Its age.
        age_ms: u64,
        /// The limit.
        max_ms: u64,
    },
    /// The document's timestamp is further in the future than the allowed clock skew.
    #[error("document timestamp is {ahead_ms} ms in the future; allowed skew is {skew_ms} ms")]
    FromTheFuture {
        /// How far ahead.
        ahead_ms: u64,
        /// The allowed skew.
        skew_ms: u64,
    },
    /// The policy requires a field the document lacks.
    #[error("the policy requires {field} but the document has none")]
    PolicyFieldMissing {
        /// `nonce`, `public_key` or `user_data`.
        field: &'static str,
    },
    /// A field differs from what the policy requires.
    #[error("{field} does not match the policy")]
    PolicyFieldMismatch {
        /// `nonce`, `public_key` or `user_data`.
        field: &'static str,
    },
}

impl VerifyError {
    /// A stable identifier of the failed check, for JSON output and metrics.
    pub fn check(&self) -> &'static str {
        match self {
            Self::DocumentTooLarge { .. } => "document_too_large",
            Self::Cbor { .. } => "malformed_cbor",
            Self::UnexpectedTag { .. } => "unexpected_tag",
            Self::EnvelopeShape => "envelope_shape",
            Self::ProtectedHeader => "protected_header",
            Self::UnprotectedHeader => "unprotected_header",
            Self::SignatureLength { .. } => "signature_length",
            Self::UnknownField { .. } => "unknown_field",
            Self::DuplicateField { .. } => "duplicate_field",
            Self::MissingField { .. } => "missing_field",
            Self::FieldType { .. } => "field_type",
            Self::FieldSize { .. } => "field_size",
            Self::UnsupportedDigest { .. } => "unsupported_digest",
            Self::ZeroTimestamp => "zero_timestamp",
            Self::PcrIndexOutOfRange { .. } => "pcr_index_out_of_range",
            Self::DuplicatePcr { .. } => "duplicate_pcr",
            Self::UntrustedRoot => "untrusted_root",
            Self::ChainTooLong { .. } => "chain_too_long",
            Self::CertificateParse { .. } => "certificate_parse",
            Self::CertificateVersion { .. } => "certificate_version",
            Self::CertificateExpired { .. } => "certificate_expired",
            Self::CertificateNotYetValid { .. } => "certificate_not_yet_valid",
            Self::CertificateInvalidAtTimestamp { .. } => "certificate_invalid_at_timestamp",
            Self::IssuerMismatch { .. } => "issuer_mismatch",
            Self::NotCa { .. } => "not_ca",
            Self::PathLenExceeded { .. } => "path_len_exceeded",
            Self::MissingKeyCertSign { .. } => "missing_key_cert_sign",
            Self::LeafIsCa => "leaf_is_ca",
            Self::LeafMissingDigitalSignature => "leaf_missing_digital_signature",
            Self::UnknownCriticalExtension { .. } => "unknown_critical_extension",
            Self::DuplicateExtension { .. } => "duplicate_extension",
            Self::MalformedExtension { .. } => "malformed_extension",
            Self::UnsupportedAlgorithm { .. } => "unsupported_algorithm",
            Self::CertificateSignature { .. } => "certificate_signature",
            Self::Signature => "signature",
            Self::DebugMode => "debug_mode",
            Self::PcrMissing { .. } => "pcr_missing",
            Self::PcrMismatch { .. } => "pcr_mismatch",
            Self::TooOld { .. } => "too_old",
            Self::FromTheFuture { .. } => "from_the_future",
            Self::PolicyFieldMissing { .. } => "policy_field_missing",
            Self::PolicyFieldMismatch { .. } => "policy_field_mismatch",
        }
    }
}
