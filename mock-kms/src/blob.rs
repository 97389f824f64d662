//! The mock's `CiphertextBlob`: authenticated, bound to its key and encryption context, so a
//! tampered blob or a changed context gives `InvalidCiphertextException` as real KMS does.
//!
//! ```text
//! blob = 0x01 | key_id_len u8 | key_id | nonce (12) | AES-256-GCM(material, nonce, aad, plaintext) ‖ tag
//! aad  = "mock-kms/v1" | key_id_len u8 | key_id | context, sorted: (u16 len, key, u16 len, value)*
//! ```

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

const VERSION: u8 = 1;
const TAG_LEN: usize = 16;

/// Why a blob does not open.
#[derive(Debug, PartialEq, Eq)]
pub enum BlobError {
    /// Not a blob of this mock, tampered, another key's, or another context's.
    Invalid,
}

fn aad(key_id: &str, context: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = b"mock-kms/v1".to_vec();
    out.push(key_id.len() as u8);
    out.extend_from_slice(key_id.as_bytes());
    for (k, v) in context {
        for s in [k, v] {
            out.extend_from_slice(&(s.len().min(u16::MAX as usize) as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

fn aead(material: &[u8]) -> Result<LessSafeKey, BlobError> {
    UnboundKey::new(&AES_256_GCM, material)
        .map(LessSafeKey::new)
        .map_err(|_| BlobError::Invalid)
}

/// Which key a blob names, without opening it.
pub fn key_id(blob: &[u8]) -> Result<&str, BlobError> {
    match blob {
        [VERSION, len, rest @ ..] => rest
            .get(..usize::from(*len))
            .and_then(|id| std::str::from_utf8(id).ok())
            .ok_or(BlobError::Invalid),
        _ => Err(BlobError::Invalid),
    }
}

/// Encrypts `plaintext` under `material` for `key_id` and `context`.
pub fn seal(
    key_id: &str,
    material: &[u8],
    context: &BTreeMap<String, String>,
    plaintext: &[u8],
) -> Result<Vec<u8>, BlobError> {
    let id_len = u8::try_from(key_id.len()).map_err(|_| BlobError::Invalid)?;
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| BlobError::Invalid)?;
    let mut out = Vec::with_capacity(2 + key_id.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
    out.push(VERSION);
    out.push(id_len);
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(&nonce);
    let mut body = plaintext.to_vec();
    aead(material)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(key_id, context)),
            &mut body,
        )
        .map_err(|_| BlobError::Invalid)?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decrypts a blob made by [`seal`] with the same key and context.
pub fn open(
    key_id: &str,
    material: &[u8],
    context: &BTreeMap<String, String>,
    blob: &[u8],
) -> Result<Zeroizing<Vec<u8>>, BlobError> {
    let header = 2 + key_id.len();
    if self::key_id(blob)? != key_id {
        return Err(BlobError::Invalid);
    }
    let nonce: [u8; NONCE_LEN] = blob
        .get(header..header + NONCE_LEN)
        .and_then(|n| n.try_into().ok())
        .ok_or(BlobError::Invalid)?;
    let mut body = Zeroizing::new(
        blob.get(header + NONCE_LEN..)
            .ok_or(BlobError::Invalid)?
            .to_vec(),
    );
    let len = aead(material)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(key_id, context)),
            &mut body,
        )
        .map_err(|_| BlobError::Invalid)?
        .len();
    body.truncate(len);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tampering_key_and_context_are_caught() {
        let m = [7u8; 32];
        let ctx: BTreeMap<String, String> = [("a".into(), "1".into())].into();
        let blob = seal("k1", &m, &ctx, b"secret").unwrap();
        assert_eq!(&open("k1", &m, &ctx, &blob).unwrap()[..], b"secret");
        assert_eq!(key_id(&blob).unwrap(), "k1");
        for i in 0..blob.len() {
            let mut t = blob.clone();
            t[i] ^= 1;
            assert!(open("k1", &m, &ctx, &t).is_err(), "byte {i}");
        }
        assert!(open("k1", &m, &BTreeMap::new(), &blob).is_err());
        assert!(open("k1", &[8u8; 32], &ctx, &blob).is_err());
        assert!(open("k2", &m, &ctx, &blob).is_err());
        assert!(open("k1", &m, &ctx, &blob[..10]).is_err());
    }
}
