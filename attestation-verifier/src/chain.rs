//! The certificate chain: `cabundle[0]` must be a pinned root, byte for byte, and the chain is
//! built strictly as root → cabundle[1] → … → cabundle[n-1] → leaf, as AWS's verification
//! process prescribes (aws-nitro-enclaves-nsm-api `docs/attestation_process.md` §3.2.3), with
//! the RFC 5280 §6.1 checks a path of this shape needs: validity at `now` and at the
//! document's timestamp, issuer/subject linkage, basicConstraints and pathLenConstraint,
//! keyUsage, and no critical extension that is not processed. Every signature is ECDSA P-384 with SHA-384.

use crate::error::{CertPosition, VerifyError};
use crate::UnixTime;
use aws_lc_rs::digest::{digest, SHA256};
use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_ASN1, ECDSA_P384_SHA384_FIXED};
use der::asn1::{AnyRef, ObjectIdentifier};
use der::{Decode, Reader, SliceReader};
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages};
use x509_cert::Certificate;

const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const OID_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const OID_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
/// Extensions that may be critical (RFC 5280 §4.2: a certificate with a critical extension
/// the verifier does not process must be rejected). basicConstraints and keyUsage are
/// processed; the key identifiers carry no constraint. CRL distribution points, certificate
/// policies and extended key usage are not processed here, so they are accepted only when
/// non-critical, as AWS's certificates mark them.
const CRITICAL_ALLOWED: [&str; 4] = [
    "2.5.29.19", // basicConstraints
    "2.5.29.15", // keyUsage
    "2.5.29.14", // subjectKeyIdentifier
    "2.5.29.35", // authorityKeyIdentifier
];

/// The AWS Nitro Enclaves Root-G1 certificate (DER), from
/// <https://aws-nitro-enclaves.amazonaws.com/AWS_NitroEnclaves_Root-G1.zip>.
const AWS_NITRO_ROOT_G1: &[u8] = include_bytes!("aws_nitro_root.der");
/// SHA-256 of [`AWS_NITRO_ROOT_G1`], as AWS publishes it; checked by a test.
pub const AWS_NITRO_ROOT_G1_SHA256: &str =
    "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";

/// A trusted root certificate. A document is accepted only if its `cabundle[0]` is
/// byte-identical to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustAnchor {
    der: Vec<u8>,
}

/// Why a trust anchor could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnchorError {
    /// Not PEM, or not a `CERTIFICATE` block.
    #[error("not a PEM certificate: {0}")]
    Pem(String),
    /// Not an X.509 certificate with a P-384 key.
    #[error("not a usable root: {0}")]
    Certificate(VerifyError),
}

impl TrustAnchor {
    /// The AWS Nitro Enclaves Root-G1, embedded and pinned by its SHA-256.
    pub fn aws_nitro_root() -> Self {
        Self {
            der: AWS_NITRO_ROOT_G1.to_vec(),
        }
    }

    /// A root from DER bytes (the mock CA's, for example).
    pub fn from_der(der: &[u8]) -> Result<Self, AnchorError> {
        let cert =
            ParsedCert::parse(der, CertPosition::CaBundle(0)).map_err(AnchorError::Certificate)?;
        cert.p384_key(CertPosition::CaBundle(0))
            .map_err(AnchorError::Certificate)?;
        Ok(Self { der: der.to_vec() })
    }

    /// A root from a PEM `CERTIFICATE` block.
    pub fn from_pem(pem: &[u8]) -> Result<Self, AnchorError> {
        let (label, der) =
            der::pem::decode_vec(pem).map_err(|e| AnchorError::Pem(e.to_string()))?;
        if label != "CERTIFICATE" {
            return Err(AnchorError::Pem(format!(
                "PEM label is {label}, not CERTIFICATE"
            )));
        }
        Self::from_der(&der)
    }

    /// The certificate, DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// SHA-256 of the DER: the root's fingerprint.
    pub fn sha256(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, &self.der).as_ref());
        out
    }
}

/// A decoded certificate and the raw TBS bytes its signature covers.
pub(crate) struct ParsedCert<'a> {
    pub(crate) cert: Certificate,
    tbs: &'a [u8],
}

impl<'a> ParsedCert<'a> {
    pub(crate) fn parse(der: &'a [u8], position: CertPosition) -> Result<Self, VerifyError> {
        let parse_err = |e: der::Error| VerifyError::CertificateParse {
            position,
            reason: e.to_string(),
        };
        let cert = Certificate::from_der(der).map_err(parse_err)?;
        // The signature covers the TBS bytes as received, never a re-encoding.
        let outer = AnyRef::from_der(der).map_err(parse_err)?;
        let mut reader = SliceReader::new(outer.value()).map_err(parse_err)?;
        let tbs = reader.tlv_bytes().map_err(parse_err)?;
        if cert.tbs_certificate.version != x509_cert::Version::V3 {
            return Err(VerifyError::CertificateVersion { position });
        }
        Ok(Self { cert, tbs })
    }

    /// The subject's uncompressed P-384 point.
    fn p384_key(&self, position: CertPosition) -> Result<&[u8], VerifyError> {
        let spki = &self.cert.tbs_certificate.subject_public_key_info;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        if spki.algorithm.oid != OID_EC_PUBLIC_KEY || curve != Some(OID_SECP384R1) {
            let oid = curve.unwrap_or(spki.algorithm.oid);
            return Err(VerifyError::UnsupportedAlgorithm {
                position,
                oid: oid.to_string(),
            });
        }
        spki.subject_public_key
            .as_bytes()
            .ok_or(VerifyError::UnsupportedAlgorithm {
                position,
                oid: "subjectPublicKey with unused bits".into(),
            })
    }

    fn ms(t: &x509_cert::time::Time) -> u64 {
        u64::try_from(t.to_unix_duration().as_millis()).unwrap_or(u64::MAX)
    }

    fn check_validity(&self, position: CertPosition, now: UnixTime) -> Result<(), VerifyError> {
        let v = &self.cert.tbs_certificate.validity;
        let (not_before_ms, not_after_ms) = (Self::ms(&v.not_before), Self::ms(&v.not_after));
        let now_ms = now.as_millis();
        if now_ms < not_before_ms {
            return Err(VerifyError::CertificateNotYetValid {
                position,
                not_before_ms,
                now_ms,
            });
        }
        // X.509 times have second resolution and notAfter is inclusive (RFC 5280 §4.1.2.5).
        if now_ms / 1000 > not_after_ms / 1000 {
            return Err(VerifyError::CertificateExpired {
                position,
                not_after_ms,
                now_ms,
            });
        }
        Ok(())
    }

    /// Checks validity at the verification time and at the document's own timestamp: a
    /// document signed by a key whose certificate had expired, or was not yet valid, when
    /// the document was made is refused even if the certificate is valid now.
    fn check_validity_at(
        &self,
        position: CertPosition,
        now: UnixTime,
        document_time: UnixTime,
    ) -> Result<(), VerifyError> {
        self.check_validity(position, now)?;
        self.check_validity(position, document_time).map_err(|_| {
            VerifyError::CertificateInvalidAtTimestamp {
                position,
                timestamp_ms: document_time.as_millis(),
            }
        })
    }

    /// Checks the extensions and returns (basicConstraints, keyUsage) if present.
    fn extensions(
        &self,
        position: CertPosition,
    ) -> Result<(Option<BasicConstraints>, Option<KeyUsage>), VerifyError> {
        let mut bc = None;
        let mut ku = None;
        let exts = self
            .cert
            .tbs_certificate
            .extensions
            .as_deref()
            .unwrap_or(&[]);
        for (i, ext) in exts.iter().enumerate() {
            let oid = ext.extn_id.to_string();
            if exts.iter().take(i).any(|e| e.extn_id == ext.extn_id) {
                return Err(VerifyError::DuplicateExtension { position, oid });
            }
            let malformed = || VerifyError::MalformedExtension {
                position,
                oid: oid.clone(),
            };
            if ext.extn_id == OID_BASIC_CONSTRAINTS {
                bc = Some(
                    BasicConstraints::from_der(ext.extn_value.as_bytes())
                        .map_err(|_| malformed())?,
                );
            } else if ext.extn_id == OID_KEY_USAGE {
                ku = Some(KeyUsage::from_der(ext.extn_value.as_bytes()).map_err(|_| malformed())?);
            } else if ext.critical && !CRITICAL_ALLOWED.contains(&oid.as_str()) {
                return Err(VerifyError::UnknownCriticalExtension { position, oid });
            }
        }
        Ok((bc, ku))
    }

    /// Checks that this certificate was signed by `issuer`.
    fn check_issued_by(
        &self,
        issuer: &ParsedCert<'_>,
        position: CertPosition,
    ) -> Result<(), VerifyError> {
        let tbs = &self.cert.tbs_certificate;
        if tbs.issuer != issuer.cert.tbs_certificate.subject {
            return Err(VerifyError::IssuerMismatch { position });
        }
        for alg in [&self.cert.signature_algorithm, &tbs.signature] {
            if alg.oid != OID_ECDSA_SHA384 || alg.parameters.is_some() {
                return Err(VerifyError::UnsupportedAlgorithm {
                    position,
                    oid: alg.oid.to_string(),
                });
            }
        }
        let issuer_position = match position {
            CertPosition::CaBundle(i) => CertPosition::CaBundle(i.saturating_sub(1)),
            CertPosition::Leaf => position,
        };
        let key = issuer.p384_key(issuer_position)?;
        let signature = self
            .cert
            .signature
            .as_bytes()
            .ok_or(VerifyError::CertificateSignature { position })?;
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_ASN1, key)
            .verify(self.tbs, signature)
            .map_err(|_| VerifyError::CertificateSignature { position })
    }
}

/// Result of a successful chain check: the leaf's key and which anchor matched.
pub(crate) struct ValidChain {
    pub(crate) leaf_key: Vec<u8>,
    pub(crate) anchor: usize,
}

/// Validates `leaf ← cabundle[n-1] ← … ← cabundle[1] ← cabundle[0] = anchor` at `now` and
/// at `document_time` (the document's timestamp).
pub(crate) fn validate(
    leaf: &[u8],
    cabundle: &[Vec<u8>],
    anchors: &[TrustAnchor],
    now: UnixTime,
    document_time: UnixTime,
) -> Result<ValidChain, VerifyError> {
    let root = cabundle
        .first()
        .ok_or(VerifyError::MissingField { field: "cabundle" })?;
    let anchor = anchors
        .iter()
        .position(|a| a.der.as_slice() == root.as_slice())
        .ok_or(VerifyError::UntrustedRoot)?;
    if cabundle.len() > crate::document::MAX_CABUNDLE {
        return Err(VerifyError::ChainTooLong {
            len: cabundle.len() + 1,
            max: crate::document::MAX_CABUNDLE + 1,
        });
    }

    let cas = cabundle
        .iter()
        .enumerate()
        .map(|(i, der)| ParsedCert::parse(der, CertPosition::CaBundle(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf_cert = ParsedCert::parse(leaf, CertPosition::Leaf)?;

    // CA checks, root included: every one must be valid now and when the document was made,
    // be a CA allowed to sign
    // certificates, and allow as many CAs below it as the chain has.
    for (i, ca) in cas.iter().enumerate() {
        let position = CertPosition::CaBundle(i);
        ca.check_validity_at(position, now, document_time)?;
        let (bc, ku) = ca.extensions(position)?;
        let bc = bc.filter(|b| b.ca).ok_or(VerifyError::NotCa { position })?;
        let below = cas.len() - 1 - i;
        if let Some(path_len) = bc.path_len_constraint {
            if below > usize::from(path_len) {
                return Err(VerifyError::PathLenExceeded {
                    position,
                    path_len,
                    below,
                });
            }
        }
        if !ku.is_some_and(|k| k.0.contains(KeyUsages::KeyCertSign)) {
            return Err(VerifyError::MissingKeyCertSign { position });
        }
        if let Some(issuer) = i.checked_sub(1).and_then(|p| cas.get(p)) {
            ca.check_issued_by(issuer, position)?;
        }
    }

    let position = CertPosition::Leaf;
    leaf_cert.check_validity_at(position, now, document_time)?;
    let (bc, ku) = leaf_cert.extensions(position)?;
    if bc.is_some_and(|b| b.ca) {
        return Err(VerifyError::LeafIsCa);
    }
    if !ku.is_some_and(|k| k.0.contains(KeyUsages::DigitalSignature)) {
        return Err(VerifyError::LeafMissingDigitalSignature);
    }
    let issuer = cas
        .last()
        .ok_or(VerifyError::MissingField { field: "cabundle" })?;
    leaf_cert.check_issued_by(issuer, position)?;
    let leaf_key = leaf_cert.p384_key(position)?.to_vec();
    Ok(ValidChain { leaf_key, anchor })
}

/// Verifies the document's raw r‖s ES384 signature over `sig_structure`. High-S signatures are
/// accepted, as real NSMs emit them and ECDSA does not forbid them (FIPS 186-5 §6.4.2).
pub(crate) fn verify_es384(
    leaf_key: &[u8],
    sig_structure: &[u8],
    signature: &[u8],
) -> Result<(), VerifyError> {
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, leaf_key)
        .verify(sig_structure, signature)
        .map_err(|_| VerifyError::Signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_root_matches_its_pin() {
        let a = TrustAnchor::aws_nitro_root();
        assert_eq!(hex::encode(a.sha256()), AWS_NITRO_ROOT_G1_SHA256);
        // And it is a usable P-384 root.
        TrustAnchor::from_der(a.der()).unwrap();
    }

    #[test]
    fn anchor_from_pem_matches_shared_file() {
        let pem = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/vectors/nitro/aws_nitro_root.pem"
        ))
        .expect("../shared/vectors beside the checkout");
        assert_eq!(
            TrustAnchor::from_pem(&pem).unwrap(),
            TrustAnchor::aws_nitro_root()
        );
        assert!(TrustAnchor::from_pem(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        .is_err());
    }
}
