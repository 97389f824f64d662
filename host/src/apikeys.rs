//! `host api-keys`: the offline administration of client API keys (issue 8 §2). The signer's
//! private key and the unsigned key list stay with the administrator; only the signed list
//! goes to the relay, which delivers it to the enclave (`common::apikeys` has the format and
//! the trust argument).
//!
//! ```text
//! host api-keys init-signer --out signer.p8          # prints the public key for --api-key-signer
//! host api-keys issue --list keys.json --id team-a [--model M]... [--rpm N] [--tpm N]
//! host api-keys revoke --list keys.json --id team-a
//! host api-keys sign --list keys.json --signer signer.p8 [--valid-days 30] --out api-keys.signed
//! ```

use common::apikeys::{issue, new_signer, ApiKey, KeyList, LIST_VERSION};
use std::io::Write as _;
use std::path::Path;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not what it should be.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The key format refused something.
    #[error(transparent)]
    Keys(#[from] common::apikeys::ApiKeysError),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> AdminError + '_ {
    move |source| AdminError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AdminError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Creates a signer key pair at `out` (mode 0600, never overwritten); returns the public key.
pub fn init_signer(out: &Path) -> Result<[u8; 32], AdminError> {
    if out.exists() {
        return Err(AdminError::Invalid {
            path: out.display().to_string(),
            reason: "already exists; a new signer needs a new enclave configuration".into(),
        });
    }
    let (pkcs8, public) = new_signer()?;
    write_atomic(out, &pkcs8, 0o600)?;
    Ok(public)
}

/// The public key of a signer file.
pub fn signer_public(path: &Path) -> Result<[u8; 32], AdminError> {
    use aws_lc_rs::signature::KeyPair;
    let pair = load_signer(path)?;
    Ok(pair.public_key().as_ref().try_into().unwrap_or([0; 32]))
}

fn load_signer(path: &Path) -> Result<aws_lc_rs::signature::Ed25519KeyPair, AdminError> {
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(io(path))?);
    aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| AdminError::Invalid {
        path: path.display().to_string(),
        reason: format!("not an Ed25519 PKCS#8 key: {e}"),
    })
}

fn load_list(path: &Path) -> Result<KeyList, AdminError> {
    if !path.exists() {
        return Ok(KeyList {
            v: LIST_VERSION,
            serial: 0,
            not_after: 0,
            keys: Vec::new(),
        });
    }
    let bytes = std::fs::read(path).map_err(io(path))?;
    let list: KeyList = serde_json::from_slice(&bytes).map_err(|e| AdminError::Invalid {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    list.check()?;
    Ok(list)
}

fn save_list(path: &Path, list: &KeyList) -> Result<(), AdminError> {
    let mut json = serde_json::to_vec_pretty(list).map_err(|e| AdminError::Invalid {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    json.push(b'\n');
    write_atomic(path, &json, 0o600)
}

/// Adds a new key to the list; returns the key, to be shown once.
pub fn issue_key(
    list_path: &Path,
    id: &str,
    models: Vec<String>,
    rpm: u32,
    tpm: u32,
) -> Result<ApiKey, AdminError> {
    let mut list = load_list(list_path)?;
    if list.keys.iter().any(|k| k.id == id) {
        return Err(AdminError::Invalid {
            path: list_path.display().to_string(),
            reason: format!("a key with id {id:?} exists; revoke it first"),
        });
    }
    let models = if models.is_empty() {
        vec!["*".to_string()]
    } else {
        models
    };
    let (key, entry) = issue(id, models, rpm, tpm)?;
    list.keys.push(entry);
    save_list(list_path, &list)?;
    Ok(key)
}

/// Removes a key from the list (it stops working once a list signed after this is in force).
pub fn revoke_key(list_path: &Path, id: &str) -> Result<(), AdminError> {
    let mut list = load_list(list_path)?;
    let before = list.keys.len();
    list.keys.retain(|k| k.id != id);
    if list.keys.len() == before {
        return Err(AdminError::Invalid {
            path: list_path.display().to_string(),
            reason: format!("no key with id {id:?}"),
        });
    }
    save_list(list_path, &list)
}

/// Signs the list with the next serial, valid for `valid_secs` from `now`; writes the signed
/// file and records the serial in the list. Returns the serial.
pub fn sign_list(
    list_path: &Path,
    signer: &Path,
    out: &Path,
    now: u64,
    valid_secs: u64,
) -> Result<u64, AdminError> {
    let mut list = load_list(list_path)?;
    list.serial += 1;
    list.not_after = now.saturating_add(valid_secs);
    let signed = list.sign(&load_signer(signer)?)?;
    save_list(list_path, &list)?;
    write_atomic(out, &signed, 0o644)?;
    Ok(list.serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_sign_revoke_and_verify() {
        let dir = std::env::temp_dir().join(format!("apikeys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (signer, list, out) = (
            dir.join("s.p8"),
            dir.join("keys.json"),
            dir.join("k.signed"),
        );
        let _ = std::fs::remove_file(&signer);
        let _ = std::fs::remove_file(&list);
        let public = init_signer(&signer).unwrap();
        assert!(init_signer(&signer).is_err());
        assert_eq!(signer_public(&signer).unwrap(), public);
        let key = issue_key(&list, "team-a", vec![], 5, 0).unwrap();
        assert!(issue_key(&list, "team-a", vec![], 5, 0).is_err());
        assert_eq!(sign_list(&list, &signer, &out, 100, 60).unwrap(), 1);
        let signed = std::fs::read(&out).unwrap();
        let got = KeyList::verify(&signed, &public, 150).unwrap();
        let (id, secret) = common::apikeys::parse_key(key.expose()).unwrap();
        assert!(got.keys.iter().any(|k| k.id == id && k.matches(&secret)));
        revoke_key(&list, "team-a").unwrap();
        assert_eq!(sign_list(&list, &signer, &out, 100, 60).unwrap(), 2);
        let got = KeyList::verify(&std::fs::read(&out).unwrap(), &public, 150).unwrap();
        assert!(got.keys.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
