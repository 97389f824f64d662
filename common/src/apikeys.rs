//! Client API keys as the enclave checks them: a signed list of salted key hashes with scopes
//! and quotas, delivered by the (untrusted) host and verified inside the enclave.
//!
//! Trust: the list is signed with an Ed25519 key (RFC 8032) whose public half is part of the
//! enclave's measured runtime configuration (PCR17), so the host can deliver lists but not
//! forge one. Revoking a key is a new list with a higher `serial`: no new image and no change
//! to PCR17. The enclave refuses a list whose serial is lower than the one it holds, and every
//! list expires (`not_after`), which bounds how long a host that restarts the enclave can
//! replay an older list.
//!
//! Keys are `cik_<id>_<secret>` with 32 random bytes of secret (base64url). The list holds
//! `HMAC-SHA256(salt, secret)` with a fresh 16-byte salt per key: the keys have 256 bits of
//! entropy, so a fast salted hash suffices (no password stretching), and a leaked list reveals
//! no key. The key's id is in the key itself, so the check is one lookup and one
//! constant-time comparison.
//!
//! The signed file is JSON: `{"payload": base64(list JSON), "signature": base64(Ed25519 over
//! CONTEXT ‖ payload bytes)}`; the context string separates this signature from any other use
//! of the key.

use aws_lc_rs::signature::{KeyPair, UnparsedPublicKey, ED25519};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Domain separation for the list signature.
pub const CONTEXT: &[u8] = b"nitro-confidential-inference/api-keys/v1\n";
/// The list format version.
pub const LIST_VERSION: u32 = 1;
/// Largest signed file accepted.
pub const MAX_SIGNED_BYTES: usize = 4 << 20;
/// Most keys in one list.
pub const MAX_KEYS: usize = 10_000;
/// Key prefix.
pub const KEY_PREFIX: &str = "cik_";
/// Longest key id.
pub const MAX_ID: usize = 64;

/// Why a key list is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiKeysError {
    /// Too large.
    #[error("the key list is {0} bytes; at most {MAX_SIGNED_BYTES}")]
    TooLarge(usize),
    /// Not the signed JSON envelope, or a payload that is not a key list.
    #[error("the key list does not parse: {0}")]
    Parse(#[source] serde_json::Error),
    /// The envelope's payload or signature is not base64.
    #[error("the key list's {field} is not base64: {source}")]
    Base64 {
        /// `payload` or `signature`.
        field: &'static str,
        /// The decoder's error.
        source: base64::DecodeError,
    },
    /// More keys than [`MAX_KEYS`].
    #[error("the key list has {0} keys; at most {MAX_KEYS}")]
    TooManyKeys(usize),
    /// The system's random number generator failed.
    #[error("the system RNG failed")]
    Rng,
    /// A new signer key could not be generated or read back.
    #[error("generating an Ed25519 signer key failed")]
    KeyGeneration,
    /// The signature does not verify with the measured signer key.
    #[error("the key list's signature does not verify with the enclave's signer key")]
    Signature,
    /// Unsupported version.
    #[error("key list version {0} is not supported")]
    Version(u32),
    /// Expired.
    #[error("the key list expired at {not_after} (now {now})")]
    Expired {
        /// Its expiry, Unix seconds.
        not_after: u64,
        /// The enclave's clock.
        now: u64,
    },
    /// Older than the list in force.
    #[error("key list serial {got} is older than the one in force ({current})")]
    Rollback {
        /// The list's serial.
        got: u64,
        /// The serial in force.
        current: u64,
    },
    /// A key entry is wrong.
    #[error("key {id:?}: {reason}")]
    Entry {
        /// The key's id.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

/// A key list: what the signer signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyList {
    /// Format version, 1.
    pub v: u32,
    /// Higher replaces lower; a revocation is a new list with a higher serial.
    pub serial: u64,
    /// Unix seconds after which the list is refused.
    pub not_after: u64,
    /// The keys.
    pub keys: Vec<KeyEntry>,
}

/// One key: its id, salted hash, scopes and quotas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// The key's id (`[A-Za-z0-9-]`, 1..=64): public, in the key itself.
    pub id: String,
    /// 16 random bytes, hex.
    pub salt: String,
    /// HMAC-SHA256(salt, secret), hex.
    pub hmac: String,
    /// The models the key may use; `"*"` for all.
    pub models: Vec<String>,
    /// Requests per minute; 0 for no limit.
    #[serde(default)]
    pub requests_per_minute: u32,
    /// Prompt plus completion tokens per minute; 0 for no limit.
    #[serde(default)]
    pub tokens_per_minute: u32,
}

impl KeyEntry {
    /// Whether the key may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }

    /// Whether `secret` is this key's secret (constant time).
    pub fn matches(&self, secret: &[u8]) -> bool {
        let (Ok(salt), Ok(want)) = (hex::decode(&self.salt), hex::decode(&self.hmac)) else {
            return false;
        };
        let got = hmac(&salt, secret);
        aws_lc_rs::constant_time::verify_slices_are_equal(&got, &want).is_ok()
    }
}

fn hmac(salt: &[u8], secret: &[u8]) -> [u8; 32] {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, salt);
    let tag = aws_lc_rs::hmac::sign(&key, secret);
    tag.as_ref().try_into().unwrap_or([0; 32])
}

fn valid_id(id: &str) -> bool {
    (1..=MAX_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    payload: String,
    signature: String,
}

impl KeyList {
    /// Checks the entries: ids, hex lengths, scopes, no duplicates.
    pub fn check(&self) -> Result<(), ApiKeysError> {
        if self.v != LIST_VERSION {
            return Err(ApiKeysError::Version(self.v));
        }
        if self.keys.len() > MAX_KEYS {
            return Err(ApiKeysError::TooManyKeys(self.keys.len()));
        }
        let mut ids = std::collections::HashSet::new();
        for k in &self.keys {
            let bad = |reason: &str| ApiKeysError::Entry {
                id: k.id.chars().take(MAX_ID).collect(),
                reason: reason.into(),
            };
            if !valid_id(&k.id) {
                return Err(bad("ids are 1 to 64 of A-Z a-z 0-9 -"));
            }
            if !ids.insert(k.id.as_str()) {
                return Err(bad("listed twice"));
            }
            if hex::decode(&k.salt).map(|s| s.len()) != Ok(16) {
                return Err(bad("salt must be 16 bytes of hex"));
            }
            if hex::decode(&k.hmac).map(|s| s.len()) != Ok(32) {
                return Err(bad("hmac must be 32 bytes of hex"));
            }
            if k.models.is_empty() || k.models.len() > 256 || k.models.iter().any(|m| m.len() > 256)
            {
                return Err(bad("models must list 1 to 256 names"));
            }
        }
        Ok(())
    }

    /// The signed file.
    pub fn sign(
        &self,
        signer: &aws_lc_rs::signature::Ed25519KeyPair,
    ) -> Result<Vec<u8>, ApiKeysError> {
        self.check()?;
        let payload = serde_json::to_vec(self).map_err(ApiKeysError::Parse)?;
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&payload);
        let sig = signer.sign(&msg);
        let b64 = base64::engine::general_purpose::STANDARD;
        let env = Envelope {
            payload: b64.encode(&payload),
            signature: b64.encode(sig.as_ref()),
        };
        let mut out = serde_json::to_vec_pretty(&env).map_err(ApiKeysError::Parse)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Verifies a signed file with the signer's public key and checks it is in force at `now`
    /// (Unix seconds).
    pub fn verify(signed: &[u8], signer: &[u8; 32], now: u64) -> Result<Self, ApiKeysError> {
        if signed.len() > MAX_SIGNED_BYTES {
            return Err(ApiKeysError::TooLarge(signed.len()));
        }
        let env: Envelope = serde_json::from_slice(signed).map_err(ApiKeysError::Parse)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let payload = b64
            .decode(&env.payload)
            .map_err(|source| ApiKeysError::Base64 {
                field: "payload",
                source,
            })?;
        let sig = b64
            .decode(&env.signature)
            .map_err(|source| ApiKeysError::Base64 {
                field: "signature",
                source,
            })?;
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&payload);
        UnparsedPublicKey::new(&ED25519, signer)
            .verify(&msg, &sig)
            .map_err(|_| ApiKeysError::Signature)?;
        let list: KeyList = serde_json::from_slice(&payload).map_err(ApiKeysError::Parse)?;
        list.check()?;
        if now > list.not_after {
            return Err(ApiKeysError::Expired {
                not_after: list.not_after,
                now,
            });
        }
        Ok(list)
    }
}

/// A new signer key pair: the PKCS#8 document (secret; store it offline) and the public key.
pub fn new_signer() -> Result<(Zeroizing<Vec<u8>>, [u8; 32]), ApiKeysError> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| ApiKeysError::KeyGeneration)?;
    let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref())
        .map_err(|_| ApiKeysError::KeyGeneration)?;
    let public = pair.public_key().as_ref().try_into().unwrap_or([0; 32]);
    Ok((Zeroizing::new(doc.as_ref().to_vec()), public))
}

/// A fresh API key for `id`: the key to hand to its owner once, and the list entry.
pub fn issue(
    id: &str,
    models: Vec<String>,
    rpm: u32,
    tpm: u32,
) -> Result<(ApiKey, KeyEntry), ApiKeysError> {
    if !valid_id(id) {
        return Err(ApiKeysError::Entry {
            id: id.chars().take(MAX_ID).collect(),
            reason: "ids are 1 to 64 of A-Z a-z 0-9 -".into(),
        });
    }
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut secret = Zeroizing::new([0u8; 32]);
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::SecureRandom::fill(&rng, secret.as_mut())
        .and_then(|()| aws_lc_rs::rand::SecureRandom::fill(&rng, &mut salt))
        .map_err(|_| ApiKeysError::Rng)?;
    let entry = KeyEntry {
        id: id.to_string(),
        salt: hex::encode(salt),
        hmac: hex::encode(hmac(&salt, secret.as_ref())),
        models,
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let key = ApiKey(Zeroizing::new(format!(
        "{KEY_PREFIX}{id}_{}",
        b64.encode(secret.as_ref())
    )));
    Ok((key, entry))
}

/// An API key (secret): never printed by `Debug`.
pub struct ApiKey(Zeroizing<String>);

impl ApiKey {
    /// The key, to show its owner once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

/// Splits a presented key into its id and secret. `None` when it is not one of ours.
pub fn parse_key(key: &str) -> Option<(&str, Zeroizing<Vec<u8>>)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    // The secret is base64url, which may itself contain `_`: the id has none, so it ends at
    // the first one.
    let (id, secret) = rest.split_once('_')?;
    if !valid_id(id) || secret.len() != 43 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(secret)
        .ok()?;
    Some((id, Zeroizing::new(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> (aws_lc_rs::signature::Ed25519KeyPair, [u8; 32]) {
        let (doc, public) = new_signer().unwrap();
        (
            aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(&doc).unwrap(),
            public,
        )
    }

    #[test]
    fn issued_keys_verify_and_others_do_not() {
        let (key, entry) = issue("team-a", vec!["smollm2".into()], 10, 1000).unwrap();
        let (id, secret) = parse_key(key.expose()).unwrap();
        assert_eq!(id, "team-a");
        assert!(entry.matches(&secret));
        let (other, _) = issue("team-a", vec!["*".into()], 0, 0).unwrap();
        let (_, wrong) = parse_key(other.expose()).unwrap();
        assert!(!entry.matches(&wrong));
        assert!(entry.allows("smollm2") && !entry.allows("other"));
        assert!(parse_key("sk-123").is_none());
        assert!(parse_key("cik_team-a_short").is_none());
        assert_eq!(format!("{key:?}"), "ApiKey(..)");
    }

    #[test]
    fn signed_lists_verify_only_with_their_signer_and_in_force() {
        let (pair, public) = signer();
        let (_, entry) = issue("a", vec!["*".into()], 0, 0).unwrap();
        let list = KeyList {
            v: 1,
            serial: 3,
            not_after: 2_000,
            keys: vec![entry],
        };
        let signed = list.sign(&pair).unwrap();
        assert_eq!(KeyList::verify(&signed, &public, 1_000).unwrap(), list);
        let (_, other) = signer();
        assert!(matches!(
            KeyList::verify(&signed, &other, 1_000),
            Err(ApiKeysError::Signature)
        ));
        assert!(matches!(
            KeyList::verify(&signed, &public, 2_001),
            Err(ApiKeysError::Expired { .. })
        ));
        // A changed payload fails the signature.
        let mut env: serde_json::Value = serde_json::from_slice(&signed).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut payload = b64.decode(env["payload"].as_str().unwrap()).unwrap();
        let at = payload.iter().position(|b| *b == b'3').unwrap();
        payload[at] = b'9';
        env["payload"] = b64.encode(&payload).into();
        let tampered = serde_json::to_vec(&env).unwrap();
        assert!(matches!(
            KeyList::verify(&tampered, &public, 1_000),
            Err(ApiKeysError::Signature)
        ));
        assert!(matches!(
            KeyList::verify(b"{", &public, 0),
            Err(ApiKeysError::Parse(_))
        ));
        assert!(matches!(
            KeyList::verify(br#"{"payload":"!!","signature":""}"#, &public, 0),
            Err(ApiKeysError::Base64 {
                field: "payload",
                ..
            })
        ));
    }
}
