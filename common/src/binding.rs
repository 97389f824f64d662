//! The attestation `user_data` that binds the enclave's OHTTP key to what it serves
//! (DESIGN.md §4.3): which model (PCR16), which runtime configuration (PCR17), which key.
//!
//! It is a deterministic CBOR map (RFC 8949 §4.2.1), version 1, with a context string for
//! domain separation, so these bytes cannot be mistaken for any other structure an NSM
//! document might carry:
//!
//! ```text
//! {
//!   "v": 1,
//!   "ctx": "nitro-confidential-inference/ohttp-key-binding",
//!   "model": "<model name from the sealed header>",
//!   "key_id": <OHTTP key id, 0..=255>,
//!   "model_sha256": h'<32 bytes: the weights' SHA-256, PCR16's input>',
//!   "config_sha256": h'<32 bytes: the runtime configuration's SHA-256, PCR17's input>',
//!   "key_config_sha256": h'<32 bytes: SHA-256 of the document's public_key>'
//! }
//! ```
//!
//! Keys appear in that order (deterministic order: shorter encodings first). [`Binding::decode`]
//! accepts only the exact encoding [`Binding::encode`] produces, so there is one byte string
//! per binding. A verifier checks `PCR16 == extend(model_sha256)`,
//! `PCR17 == extend(config_sha256)`, and `key_config_sha256 == SHA-256(public_key)`.

use crate::cbor::Encoder;
use crate::sealed::{model_pcr16, sha256};

/// The context string of version 1.
pub const CONTEXT: &str = "nitro-confidential-inference/ohttp-key-binding";
/// The binding's version.
pub const VERSION: u64 = 1;
/// Longest model name carried (the sealed header bounds it too).
pub const MAX_MODEL_NAME: usize = 256;
/// The PCR the enclave measures its runtime configuration into.
pub const CONFIG_PCR: u16 = 17;

/// What the enclave binds its attested key to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The model's name.
    pub model: String,
    /// The OHTTP key configuration's key id.
    pub key_id: u8,
    /// The weights' SHA-256.
    pub model_sha256: [u8; 32],
    /// The runtime configuration's SHA-256.
    pub config_sha256: [u8; 32],
    /// SHA-256 of the encoded OHTTP key configuration (the document's `public_key`).
    pub key_config_sha256: [u8; 32],
}

/// Why a `user_data` is not a version-1 binding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// Not the exact deterministic encoding of a version-1 binding.
    #[error("user_data is not a version-1 key binding: {0}")]
    Malformed(&'static str),
}

impl Binding {
    /// The deterministic CBOR encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::with_capacity(256);
        e.map(7)
            .text("v")
            .uint(VERSION)
            .text("ctx")
            .text(CONTEXT)
            .text("model")
            .text(&self.model)
            .text("key_id")
            .uint(u64::from(self.key_id))
            .text("model_sha256")
            .bytes(&self.model_sha256)
            .text("config_sha256")
            .bytes(&self.config_sha256)
            .text("key_config_sha256")
            .bytes(&self.key_config_sha256);
        e.into_bytes()
    }

    /// Decodes `bytes`, which must be exactly what [`Binding::encode`] writes.
    pub fn decode(bytes: &[u8]) -> Result<Self, BindingError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        if r.head(5)? != 7 {
            return Err(BindingError::Malformed("not a map of 7 entries"));
        }
        r.key("v")?;
        if r.head(0)? != VERSION {
            return Err(BindingError::Malformed("unsupported version"));
        }
        r.key("ctx")?;
        if r.text(CONTEXT.len())? != CONTEXT {
            return Err(BindingError::Malformed("wrong context string"));
        }
        r.key("model")?;
        let model = r.text(MAX_MODEL_NAME)?.to_owned();
        r.key("key_id")?;
        let key_id = u8::try_from(r.head(0)?)
            .map_err(|_| BindingError::Malformed("key_id is not 0..=255"))?;
        r.key("model_sha256")?;
        let model_sha256 = r.digest()?;
        r.key("config_sha256")?;
        let config_sha256 = r.digest()?;
        r.key("key_config_sha256")?;
        let key_config_sha256 = r.digest()?;
        let binding = Self {
            model,
            key_id,
            model_sha256,
            config_sha256,
            key_config_sha256,
        };
        // One encoding per binding: anything non-minimal or trailing is refused.
        if binding.encode() != bytes {
            return Err(BindingError::Malformed("not the deterministic encoding"));
        }
        Ok(binding)
    }

    /// The binding for `key_config` (the encoded OHTTP key configuration).
    pub fn for_key(
        model: &str,
        model_sha256: [u8; 32],
        config_sha256: [u8; 32],
        key_id: u8,
        key_config: &[u8],
    ) -> Self {
        Self {
            model: prefix_within(model, MAX_MODEL_NAME).to_owned(),
            key_id,
            model_sha256,
            config_sha256,
            key_config_sha256: sha256(key_config),
        }
    }

    /// PCR16 as it must read for this binding's model.
    pub fn expected_pcr16(&self) -> [u8; 48] {
        model_pcr16(&self.model_sha256)
    }

    /// PCR17 as it must read for this binding's configuration.
    pub fn expected_pcr17(&self) -> [u8; 48] {
        config_pcr17(&self.config_sha256)
    }
}

/// PCR17 of an enclave whose runtime configuration has this SHA-256: like PCR16, the
/// zero-initialised PCR is extended once with the 32-byte digest, SHA-384(0^48 ‖ sha256).
pub fn config_pcr17(config_sha256: &[u8; 32]) -> [u8; 48] {
    model_pcr16(config_sha256)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BindingError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(BindingError::Malformed("truncated"))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(BindingError::Malformed("truncated"))?;
        self.pos = end;
        Ok(s)
    }

    /// An item head of `major` type; returns its argument.
    fn head(&mut self, major: u8) -> Result<u64, BindingError> {
        let first = *self
            .take(1)?
            .first()
            .ok_or(BindingError::Malformed("truncated"))?;
        if first >> 5 != major {
            return Err(BindingError::Malformed("unexpected item type"));
        }
        let n = match first & 0x1f {
            v @ 0..=23 => return Ok(u64::from(v)),
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return Err(BindingError::Malformed("indefinite or reserved length")),
        };
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn text(&mut self, max: usize) -> Result<&'a str, BindingError> {
        let len = self.head(3)?;
        if len > max as u64 {
            return Err(BindingError::Malformed("text too long"));
        }
        std::str::from_utf8(self.take(len as usize)?)
            .map_err(|_| BindingError::Malformed("text is not UTF-8"))
    }

    fn key(&mut self, expected: &'static str) -> Result<(), BindingError> {
        if self.text(32)? == expected {
            Ok(())
        } else {
            Err(BindingError::Malformed("unexpected key"))
        }
    }

    fn digest(&mut self) -> Result<[u8; 32], BindingError> {
        if self.head(2)? != 32 {
            return Err(BindingError::Malformed("digest is not 32 bytes"));
        }
        self.take(32)?
            .try_into()
            .map_err(|_| BindingError::Malformed("truncated"))
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary:
/// [`Binding::decode`] bounds the name in bytes, so a bound in characters would let a name of
/// multi-byte characters make every client refuse the enclave.
fn prefix_within(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Binding {
        Binding::for_key("SmolLM2", [1; 32], [2; 32], 7, b"key config")
    }

    #[test]
    fn long_names_are_cut_in_bytes_at_a_character_boundary() {
        for name in [
            "é".repeat(200),
            "a".repeat(300),
            format!("a{}", "é".repeat(200)),
            "🦀".repeat(70),
        ] {
            let b = Binding::for_key(&name, [1; 32], [2; 32], 7, b"key config");
            assert!(b.model.len() <= MAX_MODEL_NAME, "{}", b.model.len());
            assert!(b.model.len() > MAX_MODEL_NAME - 4, "{}", b.model.len());
            assert!(name.starts_with(&b.model));
            assert_eq!(Binding::decode(&b.encode()), Ok(b));
        }
        let short = Binding::for_key("SmolLM2 é", [1; 32], [2; 32], 7, b"k");
        assert_eq!(short.model, "SmolLM2 é");
    }

    #[test]
    fn round_trip_and_pcrs() {
        let b = sample();
        let bytes = b.encode();
        assert_eq!(Binding::decode(&bytes), Ok(b.clone()));
        assert_eq!(b.key_config_sha256, sha256(b"key config"));
        assert_eq!(b.expected_pcr16(), model_pcr16(&[1; 32]));
        assert_ne!(b.expected_pcr16(), b.expected_pcr17());
        // serde_cbor, an independent decoder, reads the same map.
        let v: std::collections::BTreeMap<String, serde_cbor::Value> =
            serde_cbor::from_slice(&bytes).unwrap();
        assert_eq!(v["ctx"], serde_cbor::Value::Text(CONTEXT.into()));
        assert_eq!(v["key_id"], serde_cbor::Value::Integer(7));
    }

    #[test]
    fn every_other_encoding_is_refused() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(Binding::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Binding::decode(&trailing).is_err());
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x01;
            if let Ok(b) = Binding::decode(&flipped) {
                // Only a flip inside a value can still parse, and then it is another binding.
                assert_ne!(b, sample(), "flip at {i}");
            }
        }
        // A different context string is a different structure.
        let other = bytes
            .windows(CONTEXT.len())
            .position(|w| w == CONTEXT.as_bytes())
            .unwrap();
        let mut ctx = bytes.clone();
        ctx[other] = b'N';
        assert_eq!(
            Binding::decode(&ctx),
            Err(BindingError::Malformed("wrong context string"))
        );
    }
}
