//! The measurements of an enclave image file (EIF), computed as `nitro-cli describe-eif` and
//! `nitro-cli build-enclave` compute them, so a verifier can derive the PCRs it expects from the
//! image it reviewed (the EIF format and hashing are those of the aws-nitro-enclaves-image-format
//! crate, version 4 of the format).
//!
//! ```text
//! header   = magic ".eif" | version u16 | flags u16 | default_mem u64 | default_cpus u64
//!            | reserved u16 | num_sections u16 | offsets [u64; 32] | sizes [u64; 32]
//!            | unused u32 | crc32 u32                                  (548 bytes, big endian)
//! section  = type u16 (1 kernel, 2 cmdline, 3 ramdisk, 4 signature, 5 metadata) | flags u16
//!            | size u64 | data
//! PCR0 = SHA-384(0^48 ‖ SHA-384(kernel ‖ cmdline ‖ every ramdisk))      the whole image
//! PCR1 = SHA-384(0^48 ‖ SHA-384(kernel ‖ cmdline ‖ first ramdisk))      the boot part (AWS's)
//! PCR2 = SHA-384(0^48 ‖ SHA-384(the other ramdisks))                    the application
//! PCR8 = SHA-384(0^48 ‖ SHA-384(signing certificate, DER))              signed images only
//! ```
//!
//! Sections are hashed in file order. The file is read as a stream (EIFs are hundreds of MB),
//! every size is checked against what is left of the file, and the CRC-32 in the header is
//! checked too.

use crate::document::Pcr;
use aws_lc_rs::digest::{Context, SHA384};
use std::collections::BTreeMap;
use std::io::Read;

/// `.eif`.
pub const EIF_MAGIC: [u8; 4] = *b".eif";
/// Size of the EIF header.
pub const HEADER_LEN: usize = 548;
/// Size of a section header.
pub const SECTION_HEADER_LEN: usize = 12;
/// Most sections an EIF has.
pub const MAX_SECTIONS: usize = 32;
/// Largest signature section accepted (one certificate and one COSE signature).
pub const MAX_SIGNATURE_SECTION: u64 = 64 << 10;

const KERNEL: u16 = 1;
const CMDLINE: u16 = 2;
const RAMDISK: u16 = 3;
const SIGNATURE: u16 = 4;
const METADATA: u16 = 5;

/// Why an EIF could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum EifError {
    /// Reading failed.
    #[error("reading the EIF: {0}")]
    Io(#[from] std::io::Error),
    /// Not an EIF, or a malformed one.
    #[error("not a valid EIF: {0}")]
    Format(String),
}

fn bad(reason: impl Into<String>) -> EifError {
    EifError::Format(reason.into())
}

/// What `describe-eif` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EifMeasurements {
    /// The format version.
    pub version: u16,
    /// PCR0, PCR1, PCR2 and (signed images) PCR8.
    pub pcrs: BTreeMap<u8, Pcr>,
    /// Whether the header's CRC-32 matches the file.
    pub crc_ok: bool,
    /// Number of ramdisks.
    pub ramdisks: usize,
}

impl EifMeasurements {
    /// nitro-cli's JSON: `{"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": …}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("HashAlgorithm".into(), "Sha384 { ... }".into());
        for (i, v) in &self.pcrs {
            m.insert(format!("PCR{i}"), hex::encode(v).into());
        }
        serde_json::json!({ "Measurements": m })
    }
}

/// CRC-32 (IEEE 802.3, reflected, as `crc32::IEEE` computes it).
struct Crc32 {
    table: [u32; 256],
    value: u32,
}

impl Crc32 {
    fn new() -> Self {
        let mut table = [0u32; 256];
        for (i, slot) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        Self {
            table,
            value: 0xffff_ffff,
        }
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            let idx = ((self.value ^ u32::from(b)) & 0xff) as usize;
            self.value = self.table.get(idx).copied().unwrap_or(0) ^ (self.value >> 8);
        }
    }

    fn finish(&self) -> u32 {
        !self.value
    }
}

fn extend(digest: &[u8]) -> Pcr {
    let mut ctx = Context::new(&SHA384);
    ctx.update(&[0u8; 48]);
    ctx.update(digest);
    let mut out = [0u8; 48];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_be_bytes)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Measures the EIF read from `r`, whose total length is `len` bytes.
pub fn measure<R: Read>(mut r: R, len: u64) -> Result<EifMeasurements, EifError> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)
        .map_err(|_| bad("shorter than an EIF header"))?;
    if header.get(..4) != Some(&EIF_MAGIC[..]) {
        return Err(bad("wrong magic (not an EIF)"));
    }
    let version = be_u16(&header, 4);
    let num_sections = usize::from(be_u16(&header, 26));
    if num_sections > MAX_SECTIONS {
        return Err(bad(format!(
            "{num_sections} sections; at most {MAX_SECTIONS}"
        )));
    }
    let crc_field = header.len() - 4;
    let want_crc = u32::from_be_bytes(
        header
            .get(crc_field..)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| bad("header"))?,
    );
    let mut crc = Crc32::new();
    crc.update(header.get(..crc_field).unwrap_or_default());

    let mut image = Context::new(&SHA384);
    let mut boot = Context::new(&SHA384);
    let mut app = Context::new(&SHA384);
    let mut cert: Option<Vec<u8>> = None;
    let mut ramdisks = 0usize;
    let (mut kernels, mut cmdlines) = (0usize, 0usize);
    let mut offset = HEADER_LEN as u64;
    let mut buf = vec![0u8; 1 << 20];
    for index in 0..num_sections {
        let mut sh = [0u8; SECTION_HEADER_LEN];
        r.read_exact(&mut sh)
            .map_err(|_| bad(format!("section {index}: truncated header")))?;
        crc.update(&sh);
        let kind = be_u16(&sh, 0);
        let size = be_u64(&sh, 4);
        let declared_offset = be_u64(&header, 28 + 8 * index);
        let declared_size = be_u64(&header, 28 + 8 * MAX_SECTIONS + 8 * index);
        if declared_offset != offset || declared_size != size {
            return Err(bad(format!(
                "section {index}: the header's table says offset {declared_offset} size {declared_size}, the file has {offset} and {size}"
            )));
        }
        offset += SECTION_HEADER_LEN as u64;
        if size > len.saturating_sub(offset) {
            return Err(bad(format!(
                "section {index}: {size} bytes run past the end of the file"
            )));
        }
        match kind {
            KERNEL => kernels += 1,
            CMDLINE => cmdlines += 1,
            RAMDISK => ramdisks += 1,
            SIGNATURE => {
                if size > MAX_SIGNATURE_SECTION {
                    return Err(bad("signature section too large"));
                }
            }
            METADATA => {}
            other => return Err(bad(format!("section {index}: unknown type {other}"))),
        }
        let mut kept = Vec::new();
        let mut left = size;
        while left > 0 {
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = buf.get_mut(..n).ok_or_else(|| bad("buffer"))?;
            r.read_exact(chunk)
                .map_err(|_| bad(format!("section {index}: truncated")))?;
            crc.update(chunk);
            match kind {
                KERNEL | CMDLINE => {
                    image.update(chunk);
                    boot.update(chunk);
                }
                RAMDISK => {
                    image.update(chunk);
                    if ramdisks == 1 {
                        boot.update(chunk);
                    } else {
                        app.update(chunk);
                    }
                }
                SIGNATURE => kept.extend_from_slice(chunk),
                _ => {}
            }
            left -= n as u64;
        }
        offset += size;
        if kind == SIGNATURE {
            cert = Some(signing_certificate(&kept)?);
        }
    }
    let mut rest = [0u8; 1];
    if r.read(&mut rest)? != 0 {
        return Err(bad("bytes after the last section"));
    }
    if kernels != 1 || cmdlines != 1 || ramdisks == 0 {
        return Err(bad(format!(
            "{kernels} kernel, {cmdlines} cmdline and {ramdisks} ramdisk sections; an enclave image has one, one, and at least one"
        )));
    }
    let mut pcrs = BTreeMap::new();
    pcrs.insert(0, extend(image.finish().as_ref()));
    pcrs.insert(1, extend(boot.finish().as_ref()));
    pcrs.insert(2, extend(app.finish().as_ref()));
    if let Some(der) = cert {
        let mut ctx = Context::new(&SHA384);
        ctx.update(&der);
        pcrs.insert(8, extend(ctx.finish().as_ref()));
    }
    Ok(EifMeasurements {
        version,
        pcrs,
        crc_ok: crc.finish() == want_crc,
        ramdisks,
    })
}

/// Measures the EIF at `path`.
pub fn measure_file(path: &std::path::Path) -> Result<EifMeasurements, EifError> {
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    measure(std::io::BufReader::new(f), len)
}

/// The signing certificate (DER) from a signature section: a CBOR array of
/// `{signing_certificate: PEM, signature: COSE_Sign1}` maps, the byte strings written by serde
/// as arrays of integers.
fn signing_certificate(section: &[u8]) -> Result<Vec<u8>, EifError> {
    let value: serde_cbor::Value =
        serde_cbor::from_slice(section).map_err(|e| bad(format!("signature section: {e}")))?;
    let serde_cbor::Value::Array(entries) = value else {
        return Err(bad("signature section is not an array"));
    };
    let first = entries
        .into_iter()
        .next()
        .ok_or_else(|| bad("signature section is empty"))?;
    let serde_cbor::Value::Map(map) = first else {
        return Err(bad("signature entry is not a map"));
    };
    let pem = map
        .into_iter()
        .find_map(|(k, v)| {
            (k == serde_cbor::Value::Text("signing_certificate".into())).then_some(v)
        })
        .ok_or_else(|| bad("signature entry has no signing_certificate"))?;
    let pem: Vec<u8> = match pem {
        serde_cbor::Value::Bytes(b) => b,
        serde_cbor::Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                serde_cbor::Value::Integer(n) => {
                    u8::try_from(n).map_err(|_| bad("certificate byte"))
                }
                _ => Err(bad("certificate byte")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("signing_certificate is not bytes")),
    };
    let (label, der) =
        der::pem::decode_vec(&pem).map_err(|e| bad(format!("certificate PEM: {e}")))?;
    if label != "CERTIFICATE" {
        return Err(bad(
            "the signing certificate's PEM label is not CERTIFICATE",
        ));
    }
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        let mut c = Crc32::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xcbf4_3926);
    }

    #[test]
    fn not_an_eif() {
        assert!(measure(&b"hello"[..], 5).is_err());
        let mut h = vec![0u8; HEADER_LEN];
        assert!(measure(&h[..], HEADER_LEN as u64).is_err());
        h[..4].copy_from_slice(&EIF_MAGIC);
        // No sections: no kernel.
        assert!(measure(&h[..], HEADER_LEN as u64).is_err());
        h[27] = 33;
        assert!(measure(&h[..], HEADER_LEN as u64).is_err());
    }
}
