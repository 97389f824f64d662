//! Parsing: bytes → [`UnverifiedDocument`]. Nothing here is trusted yet.
//!
//! The COSE_Sign1 envelope (RFC 9052 §4.2) is read strictly, because real NSMs never vary it.
//! The payload follows AWS's attestation document specification
//! (aws-nitro-enclaves-nsm-api, `docs/attestation_process.md` §3.2): strict about keys,
//! types and sizes, tolerant only of definite versus indefinite container lengths.

use crate::cbor::{CborError, Head, Reader};
use crate::error::VerifyError;
use std::collections::BTreeMap;

/// Largest document accepted. The NSM driver's response buffer is 12 KiB
/// (`NSM_RESPONSE_MAX_SIZE`); no genuine document can be larger.
pub const MAX_DOCUMENT_SIZE: usize = 16 * 1024;
/// Largest `user_data`, `nonce` or `public_key`.
pub const MAX_OPTIONAL_FIELD: usize = 1024;
/// Largest DER certificate in `certificate` or `cabundle`.
pub const MAX_CERTIFICATE: usize = 1024;
/// Most certificates in `cabundle` (AWS sends 4: root, regional, zonal, instance).
pub const MAX_CABUNDLE: usize = 8;
/// Size of a SHA-384 PCR.
pub const PCR_LEN: usize = 48;
/// Number of PCRs an NSM has.
pub const MAX_PCRS: usize = 32;
/// Longest `module_id` accepted (real ones are 39 characters).
pub const MAX_MODULE_ID: usize = 256;

/// The protected header every NSM sends: `{1: -35}`, alg ES384 (RFC 9053 §2.1).
pub const PROTECTED_HEADER: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];
/// Raw r‖s ES384 signature length (RFC 9053 §2.1).
pub const SIGNATURE_LEN: usize = 96;
/// CBOR tag of COSE_Sign1 (RFC 9052 §2).
const COSE_SIGN1_TAG: u64 = 18;

/// A PCR value.
pub type Pcr = [u8; PCR_LEN];

/// A parsed but unverified attestation document. Its fields are reachable only through
/// [`UnverifiedDocument::unverified`], whose name says what they are worth.
#[derive(Debug, Clone)]
pub struct UnverifiedDocument {
    pub(crate) protected: Vec<u8>,
    pub(crate) payload: Vec<u8>,
    pub(crate) signature: Vec<u8>,
    pub(crate) fields: Fields,
}

/// The payload's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    /// Issuing NSM's id.
    pub module_id: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// PCR index → value.
    pub pcrs: BTreeMap<u8, Pcr>,
    /// DER signing certificate.
    pub certificate: Vec<u8>,
    /// DER CA certificates, root first.
    pub cabundle: Vec<Vec<u8>>,
    /// Optional attested public key.
    pub public_key: Option<Vec<u8>>,
    /// Optional application data.
    pub user_data: Option<Vec<u8>>,
    /// Optional verifier nonce.
    pub nonce: Option<Vec<u8>>,
}

impl UnverifiedDocument {
    /// Parses `bytes` as an attestation document without verifying anything.
    pub fn parse(bytes: &[u8]) -> Result<Self, VerifyError> {
        if bytes.len() > MAX_DOCUMENT_SIZE {
            return Err(VerifyError::DocumentTooLarge {
                size: bytes.len(),
                max: MAX_DOCUMENT_SIZE,
            });
        }
        let envelope = |error: CborError| VerifyError::Cbor {
            part: "envelope",
            error,
        };
        let mut r = Reader::new(bytes);
        let mut head = r.head().map_err(envelope)?.1;
        if let Head::Tag(tag) = head {
            if tag != COSE_SIGN1_TAG {
                return Err(VerifyError::UnexpectedTag { tag });
            }
            head = r.head().map_err(envelope)?.1;
        }
        if head != Head::Array(Some(4)) {
            return Err(VerifyError::EnvelopeShape);
        }
        let protected = r.bytes("protected header").map_err(envelope)?;
        if protected != PROTECTED_HEADER {
            return Err(VerifyError::ProtectedHeader);
        }
        if r.head().map_err(envelope)?.1 != Head::Map(Some(0)) {
            return Err(VerifyError::UnprotectedHeader);
        }
        let payload = r.bytes("payload").map_err(envelope)?;
        let signature = r.bytes("signature").map_err(envelope)?;
        r.finish().map_err(envelope)?;
        if signature.len() != SIGNATURE_LEN {
            return Err(VerifyError::SignatureLength {
                len: signature.len(),
            });
        }
        let fields = parse_payload(payload)?;
        Ok(Self {
            protected: protected.to_vec(),
            payload: payload.to_vec(),
            signature: signature.to_vec(),
            fields,
        })
    }

    /// The payload's fields, **unverified**: for inspection and diagnostics only. Nothing read
    /// here may be trusted; call [`crate::verify`] for that.
    pub fn unverified(&self) -> &Fields {
        &self.fields
    }
}

/// The nine payload keys, in AWS's order; the index is the bit in the "seen" mask.
const KEYS: [&str; 9] = [
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
];

fn size_check(field: &'static str, len: usize, min: usize, max: usize) -> Result<(), VerifyError> {
    if len < min || len > max {
        return Err(VerifyError::FieldSize {
            field,
            len,
            min,
            max,
        });
    }
    Ok(())
}

/// Reads a container head and returns its length (`None` for indefinite).
fn container(
    r: &mut Reader<'_>,
    field: &'static str,
    want_map: bool,
) -> Result<Option<u64>, VerifyError> {
    let cbor = |error| VerifyError::Cbor {
        part: "payload",
        error,
    };
    match (r.head().map_err(cbor)?.1, want_map) {
        (Head::Map(n), true) | (Head::Array(n), false) => Ok(n),
        _ => Err(VerifyError::FieldType {
            field,
            expected: if want_map { "map" } else { "array" },
        }),
    }
}

/// True when the next item is the break that ends an indefinite container (and consumes it).
fn at_break(r: &mut Reader<'_>) -> bool {
    if r.peek() == Some(0xff) {
        // 0xff is always a well-formed break head.
        let _ = r.head();
        true
    } else {
        false
    }
}

/// Iterates a definite or indefinite container, calling `item` for each element, with at most
/// `max` elements (so an indefinite container cannot run on).
fn each(
    r: &mut Reader<'_>,
    len: Option<u64>,
    field: &'static str,
    max: usize,
    mut item: impl FnMut(&mut Reader<'_>) -> Result<(), VerifyError>,
) -> Result<usize, VerifyError> {
    let mut count = 0usize;
    loop {
        match len {
            Some(n) if count as u64 == n => break,
            None if at_break(r) => break,
            _ => {}
        }
        if count == max {
            let len = len.map_or(max + 1, |n| usize::try_from(n).unwrap_or(usize::MAX));
            return Err(VerifyError::FieldSize {
                field,
                len,
                min: 0,
                max,
            });
        }
        item(r)?;
        count += 1;
    }
    Ok(count)
}

fn parse_payload(payload: &[u8]) -> Result<Fields, VerifyError> {
    let cbor = |error| VerifyError::Cbor {
        part: "payload",
        error,
    };
    let wrong = |field, expected| move |_| VerifyError::FieldType { field, expected };
    let mut r = Reader::new(payload);
    let len = container(&mut r, "payload", true)?;

    let mut seen = 0u16;
    let mut module_id = None;
    let mut timestamp = None;
    let mut pcrs = None;
    let mut certificate = None;
    let mut cabundle = None;
    let (mut public_key, mut user_data, mut nonce) = (None, None, None);

    // Nine distinct keys at most: a tenth is necessarily unknown or a duplicate, and is
    // reported as such by the key checks below before any eleventh is read.
    each(&mut r, len, "payload", KEYS.len() + 1, |r| {
        let (start, head) = r.head().map_err(cbor)?;
        let key = match head {
            Head::Text(n) => r.text_body(start, n).map_err(cbor)?,
            _ => {
                return Err(VerifyError::UnknownField {
                    key: format!("<non-text key at byte {start}>"),
                })
            }
        };
        let index = KEYS
            .iter()
            .position(|k| k.as_bytes() == key)
            .ok_or_else(|| VerifyError::UnknownField {
                key: String::from_utf8_lossy(key).into_owned(),
            })?;
        let name = KEYS.get(index).copied().unwrap_or("payload");
        if seen & (1 << index) != 0 {
            return Err(VerifyError::DuplicateField { field: name });
        }
        seen |= 1 << index;
        match name {
            "module_id" => {
                let v = r.text("text").map_err(wrong("module_id", "text"))?;
                size_check("module_id", v.len(), 1, MAX_MODULE_ID)?;
                module_id = Some(v.to_owned());
            }
            "digest" => {
                let v = r.text("text").map_err(wrong("digest", "text"))?;
                if v != "SHA384" {
                    return Err(VerifyError::UnsupportedDigest { got: v.to_owned() });
                }
            }
            "timestamp" => {
                let v = r
                    .uint("uint")
                    .map_err(wrong("timestamp", "unsigned integer"))?;
                if v == 0 {
                    return Err(VerifyError::ZeroTimestamp);
                }
                timestamp = Some(v);
            }
            "pcrs" => pcrs = Some(parse_pcrs(r)?),
            "certificate" => {
                let v = r
                    .bytes("bytes")
                    .map_err(wrong("certificate", "byte string"))?;
                size_check("certificate", v.len(), 1, MAX_CERTIFICATE)?;
                certificate = Some(v.to_vec());
            }
            "cabundle" => {
                let len = container(r, "cabundle", false)?;
                let mut certs = Vec::new();
                let n = each(r, len, "cabundle", MAX_CABUNDLE, |r| {
                    let v = r
                        .bytes("bytes")
                        .map_err(wrong("cabundle", "byte strings"))?;
                    size_check("cabundle entry", v.len(), 1, MAX_CERTIFICATE)?;
                    certs.push(v.to_vec());
                    Ok(())
                })?;
                size_check("cabundle", n, 1, MAX_CABUNDLE)?;
                cabundle = Some(certs);
            }
            optional => {
                let field = match optional {
                    "public_key" => &mut public_key,
                    "user_data" => &mut user_data,
                    _ => &mut nonce,
                };
                let v = r
                    .nullable_bytes("bytes")
                    .map_err(wrong(name, "byte string or null"))?;
                if let Some(v) = v {
                    size_check(name, v.len(), 0, MAX_OPTIONAL_FIELD)?;
                    *field = Some(v.to_vec());
                }
            }
        }
        Ok(())
    })?;
    r.finish().map_err(cbor)?;

    let missing = |field| VerifyError::MissingField { field };
    if seen & (1 << 1) == 0 {
        return Err(missing("digest"));
    }
    Ok(Fields {
        module_id: module_id.ok_or(missing("module_id"))?,
        timestamp: timestamp.ok_or(missing("timestamp"))?,
        pcrs: pcrs.ok_or(missing("pcrs"))?,
        certificate: certificate.ok_or(missing("certificate"))?,
        cabundle: cabundle.ok_or(missing("cabundle"))?,
        public_key,
        user_data,
        nonce,
    })
}

fn parse_pcrs(r: &mut Reader<'_>) -> Result<BTreeMap<u8, Pcr>, VerifyError> {
    let len = container(r, "pcrs", true)?;
    let mut pcrs = BTreeMap::new();
    let n = each(r, len, "pcrs", MAX_PCRS, |r| {
        let index = r.uint("uint").map_err(|_| VerifyError::FieldType {
            field: "pcrs",
            expected: "unsigned integer indices",
        })?;
        let index = u8::try_from(index)
            .ok()
            .filter(|&i| usize::from(i) < MAX_PCRS)
            .ok_or(VerifyError::PcrIndexOutOfRange { index })?;
        let value = r.bytes("bytes").map_err(|_| VerifyError::FieldType {
            field: "pcrs",
            expected: "byte string values",
        })?;
        let value: Pcr = value.try_into().map_err(|_| VerifyError::FieldSize {
            field: "pcr value",
            len: value.len(),
            min: PCR_LEN,
            max: PCR_LEN,
        })?;
        if pcrs.insert(index, value).is_some() {
            return Err(VerifyError::DuplicatePcr { index });
        }
        Ok(())
    })?;
    size_check("pcrs", n, 1, MAX_PCRS)?;
    Ok(pcrs)
}
