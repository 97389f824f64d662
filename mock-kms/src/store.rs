//! Persisted keys, policies and aliases: one JSON file per key and one for the aliases in the
//! state directory, each written atomically (temporary file, fsync, rename) so that a crash
//! never leaves a half-written key and a restart finds every key it had.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// A symmetric KMS key.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    /// UUID key id.
    pub key_id: String,
    /// Seconds since the epoch.
    pub creation_date: u64,
    /// Free text.
    pub description: String,
    /// The key policy document (JSON text).
    pub policy: String,
    /// AES-256 key material, hex. Mock only: real KMS never exports it.
    pub material_hex: String,
    /// Whether the key may be used.
    pub enabled: bool,
    /// The account that owns the key: the creator's (keys written before accounts were
    /// modelled belong to the default account).
    #[serde(default = "default_account")]
    pub account: String,
    /// The key's grants (AWS KMS Developer Guide, "Grants in AWS KMS").
    #[serde(default)]
    pub grants: Vec<Grant>,
}

fn default_account() -> String {
    crate::identity::DEFAULT_ACCOUNT.to_owned()
}

/// Encryption-context constraints of a grant (AWS KMS API Reference, `GrantConstraints`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct GrantConstraints {
    /// The request's context must equal this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_context_equals: Option<BTreeMap<String, String>>,
    /// The request's context must include this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_context_subset: Option<BTreeMap<String, String>>,
}

impl GrantConstraints {
    /// Whether a request with `context` satisfies the constraints.
    pub fn hold(&self, context: &BTreeMap<String, String>) -> bool {
        self.encryption_context_equals
            .as_ref()
            .is_none_or(|e| e == context)
            && self
                .encryption_context_subset
                .as_ref()
                .is_none_or(|sub| sub.iter().all(|(k, v)| context.get(k) == Some(v)))
    }
}

/// A grant: `grantee_principal` may perform `operations` on the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The grant id.
    pub grant_id: String,
    /// Free text.
    pub name: String,
    /// Who the grant lets in (an account, user, role or role session ARN).
    pub grantee_principal: String,
    /// Who may retire it.
    pub retiring_principal: Option<String>,
    /// Operation names without the `kms:` prefix, e.g. `Decrypt`.
    pub operations: Vec<String>,
    /// Encryption-context constraints.
    pub constraints: Option<GrantConstraints>,
    /// The account of the principal that created it.
    pub issuing_account: String,
    /// Seconds since the epoch.
    pub creation_date: u64,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl StoredKey {
    /// The key material.
    pub fn material(&self) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let m =
            Zeroizing::new(
                hex::decode(&self.material_hex).map_err(|_| StoreError::Corrupt {
                    path: PathBuf::from(&self.key_id),
                    reason: "key material is not hex".into(),
                })?,
            );
        if m.len() != 32 {
            return Err(StoreError::Corrupt {
                path: PathBuf::from(&self.key_id),
                reason: "key material is not 32 bytes".into(),
            });
        }
        Ok(m)
    }
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file is not what this store writes.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The state directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    keys: BTreeMap<String, StoredKey>,
    aliases: BTreeMap<String, String>,
}

const ALIASES: &str = "aliases.json";
const KEYS: &str = "keys";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to `path` atomically, readable by the owner only.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    file.write_all(data).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the state directory and loads every key and alias.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let keys_dir = dir.join(KEYS);
        std::fs::create_dir_all(&keys_dir).map_err(io(&keys_dir))?;
        let mut keys = BTreeMap::new();
        for entry in std::fs::read_dir(&keys_dir).map_err(io(&keys_dir))? {
            let path = entry.map_err(io(&keys_dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue; // temporary files of an interrupted write
            }
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let key: StoredKey = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            key.material()?;
            keys.insert(key.key_id.clone(), key);
        }
        let alias_path = dir.join(ALIASES);
        let aliases = match std::fs::read_to_string(&alias_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                path: alias_path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(&alias_path)(e)),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            keys,
            aliases,
        })
    }

    /// A key by id.
    pub fn key(&self, key_id: &str) -> Option<&StoredKey> {
        self.keys.get(key_id)
    }

    /// The key an alias points to.
    pub fn alias(&self, alias: &str) -> Option<&str> {
        self.aliases.get(alias).map(String::as_str)
    }

    /// Saves (creates or replaces) a key.
    pub fn put_key(&mut self, key: StoredKey) -> Result<(), StoreError> {
        let path = self.dir.join(KEYS).join(format!("{}.json", key.key_id));
        let json =
            Zeroizing::new(
                serde_json::to_vec_pretty(&key).map_err(|e| StoreError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?,
            );
        write_atomic(&path, &json)?;
        self.keys.insert(key.key_id.clone(), key);
        Ok(())
    }

    /// Creates an alias; fails if it exists.
    pub fn put_alias(&mut self, alias: &str, key_id: &str) -> Result<bool, StoreError> {
        if self.aliases.contains_key(alias) {
            return Ok(false);
        }
        let mut next = self.aliases.clone();
        next.insert(alias.to_owned(), key_id.to_owned());
        let path = self.dir.join(ALIASES);
        let json = serde_json::to_vec_pretty(&next).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &json)?;
        self.aliases = next;
        Ok(true)
    }
}
