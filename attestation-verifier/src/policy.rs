//! What a verifier requires of a genuine document, and the policy file that says it.
//!
//! [`Policy`] has no `Default`: a caller writes every field, so each decision (which PCRs,
//! debug or not, how old, which nonce) is made on purpose. A PCR that is not listed is not
//! checked; a listed value is compared exactly, so zero is never a wildcard.

use crate::document::{Fields, Pcr, MAX_PCRS, PCR_LEN};
use crate::error::VerifyError;
use crate::UnixTime;
use aws_lc_rs::constant_time::verify_slices_are_equal;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a document must satisfy once it is known to be genuine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Expected PCR values by index. Unlisted PCRs are not checked.
    pub pcrs: BTreeMap<u8, Pcr>,
    /// Accept documents from debug-mode enclaves (PCR0, PCR1 and PCR2 all zero).
    pub allow_debug: bool,
    /// Reject documents older than this, measured from `now`. `None`: no age limit beyond
    /// the certificates' own validity.
    pub max_age: Option<Duration>,
    /// How far in the future of `now` a document's timestamp may be.
    pub max_clock_skew: Duration,
    /// The nonce the document must carry, compared in constant time. `None`: not checked.
    pub nonce: Option<Vec<u8>>,
    /// The public key the document must carry. `None`: not checked.
    pub public_key: Option<Vec<u8>>,
    /// The user data the document must carry. `None`: not checked.
    pub user_data: Option<Vec<u8>>,
}

/// The clock skew allowed when a policy file or the CLI does not say.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

fn debug_mode(pcrs: &BTreeMap<u8, Pcr>) -> Result<bool, VerifyError> {
    let mut zero = true;
    for index in 0..3u8 {
        let pcr = pcrs.get(&index).ok_or(VerifyError::PcrMissing { index })?;
        zero &= pcr.iter().all(|&b| b == 0);
    }
    Ok(zero)
}

fn optional_field(
    field: &'static str,
    expected: &Option<Vec<u8>>,
    got: &Option<Vec<u8>>,
) -> Result<(), VerifyError> {
    match (expected, got) {
        (None, _) => Ok(()),
        (Some(_), None) => Err(VerifyError::PolicyFieldMissing { field }),
        (Some(e), Some(g)) => {
            verify_slices_are_equal(e, g).map_err(|_| VerifyError::PolicyFieldMismatch { field })
        }
    }
}

impl Policy {
    /// Checks the policy against a genuine document's fields.
    pub(crate) fn check(&self, fields: &Fields, now: UnixTime) -> Result<(), VerifyError> {
        if !self.allow_debug && debug_mode(&fields.pcrs)? {
            return Err(VerifyError::DebugMode);
        }
        for (&index, expected) in &self.pcrs {
            let got = fields
                .pcrs
                .get(&index)
                .ok_or(VerifyError::PcrMissing { index })?;
            if got != expected {
                return Err(VerifyError::PcrMismatch {
                    index,
                    expected: expected.to_vec(),
                    got: got.to_vec(),
                });
            }
        }
        let now_ms = now.as_millis();
        let skew_ms = u64::try_from(self.max_clock_skew.as_millis()).unwrap_or(u64::MAX);
        if fields.timestamp > now_ms.saturating_add(skew_ms) {
            return Err(VerifyError::FromTheFuture {
                ahead_ms: fields.timestamp - now_ms,
                skew_ms,
            });
        }
        if let Some(max_age) = self.max_age {
            let age_ms = now_ms.saturating_sub(fields.timestamp);
            let max_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
            if age_ms > max_ms {
                return Err(VerifyError::TooOld { age_ms, max_ms });
            }
        }
        optional_field("nonce", &self.nonce, &fields.nonce)?;
        optional_field("public_key", &self.public_key, &fields.public_key)?;
        optional_field("user_data", &self.user_data, &fields.user_data)?;
        Ok(())
    }
}

/// A policy file (TOML, or JSON when the name ends in `.json`). Unknown keys are rejected.
///
/// ```toml
/// # Roots to trust instead of the embedded AWS Nitro root (PEM files; relative paths are
/// # relative to this file). Omit to trust the AWS root only.
/// roots = ["mock-ca/root.pem"]
/// allow_debug = false
/// max_age_secs = 300
/// max_clock_skew_secs = 60
/// # Expected PCRs by index, 96 hex digits each.
/// [pcrs]
/// 0 = "…"
/// # Optional, hex: nonce, public_key, user_data.
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// PEM root certificates to trust instead of the AWS root.
    #[serde(default)]
    pub roots: Vec<PathBuf>,
    /// Accept debug-mode enclaves.
    #[serde(default)]
    pub allow_debug: bool,
    /// Maximum document age in seconds.
    pub max_age_secs: Option<u64>,
    /// Allowed clock skew in seconds (default 60).
    pub max_clock_skew_secs: Option<u64>,
    /// Expected PCRs: index → hex.
    #[serde(default)]
    pub pcrs: BTreeMap<String, String>,
    /// Expected nonce, hex.
    pub nonce: Option<String>,
    /// Expected public key, hex.
    pub public_key: Option<String>,
    /// Expected user data, hex.
    pub user_data: Option<String>,
}

/// Why a policy file or a policy flag is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML/JSON for this format.
    #[error("{path}: {reason}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A PCR index is not 0..32.
    #[error("PCR index {0:?} is not an integer in 0..32")]
    PcrIndex(String),
    /// A measurements file is not nitro-cli's JSON.
    #[error("measurements file: {0}")]
    Measurements(String),
    /// A hex value does not decode or has the wrong length.
    #[error("{field}: {reason}")]
    Hex {
        /// Which value.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// Parses a PCR index (`"0"`..`"31"`).
pub fn parse_pcr_index(s: &str) -> Result<u8, PolicyError> {
    s.trim()
        .parse::<u8>()
        .ok()
        .filter(|&i| usize::from(i) < MAX_PCRS)
        .ok_or_else(|| PolicyError::PcrIndex(s.to_owned()))
}

/// Parses a 48-byte PCR value from hex.
pub fn parse_pcr_value(field: &str, s: &str) -> Result<Pcr, PolicyError> {
    let bytes = parse_hex(field, s)?;
    bytes.try_into().map_err(|b: Vec<u8>| PolicyError::Hex {
        field: field.to_owned(),
        reason: format!("{} bytes; a SHA-384 PCR is {PCR_LEN}", b.len()),
    })
}

/// Parses hex (upper or lower case, no prefix).
pub fn parse_hex(field: &str, s: &str) -> Result<Vec<u8>, PolicyError> {
    hex::decode(s.trim()).map_err(|e| PolicyError::Hex {
        field: field.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads the PCRs of a measurements file: `nitro-cli build-enclave` / `describe-eif` output
/// (`{"Measurements": {"HashAlgorithm": …, "PCR0": "…"}}`) or the same object without the
/// wrapper. Values must be 96 hex digits, and PCR0, PCR1 and PCR2 must be present.
pub fn parse_measurements(json_text: &str) -> Result<BTreeMap<u8, Pcr>, PolicyError> {
    let bad = |reason: String| PolicyError::Measurements(reason);
    let v: serde_json::Value = serde_json::from_str(json_text).map_err(|e| bad(e.to_string()))?;
    let m = v.get("Measurements").unwrap_or(&v);
    let obj = m
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        let Some(index) = k.strip_prefix("PCR") else {
            continue; // HashAlgorithm and the like
        };
        let index = parse_pcr_index(index).map_err(|_| bad(format!("{k} is not PCR0..PCR31")))?;
        let value = v
            .as_str()
            .ok_or_else(|| bad(format!("{k} is not a string")))?;
        out.insert(index, parse_pcr_value(k, value)?);
    }
    for required in [0u8, 1, 2] {
        if !out.contains_key(&required) {
            return Err(bad(format!("PCR{required} is missing")));
        }
    }
    Ok(out)
}

/// Reads a configuration file: JSON when its name ends in `.json`, TOML otherwise (the
/// format of policy files, here and in the client).
pub fn load_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_owned(),
        source,
    })?;
    let syntax = |reason: String| PolicyError::Syntax {
        path: path.to_owned(),
        reason,
    };
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| syntax(e.to_string()))
    } else {
        toml::from_str(&text).map_err(|e| syntax(e.to_string()))
    }
}

/// Makes relative `paths` named in the file `file` relative to that file's directory.
pub fn resolve_against(file: &Path, paths: &mut [PathBuf]) {
    let base = file.parent().unwrap_or(Path::new("."));
    for p in paths {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
}

impl PolicyFile {
    /// Reads a policy file; `roots` come back resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let mut file: Self = load_file(path)?;
        resolve_against(path, &mut file.roots);
        Ok(file)
    }

    /// The [`Policy`] this file describes.
    pub fn to_policy(&self) -> Result<Policy, PolicyError> {
        let mut pcrs = BTreeMap::new();
        for (index, value) in &self.pcrs {
            let i = parse_pcr_index(index)?;
            pcrs.insert(i, parse_pcr_value(&format!("pcrs.{i}"), value)?);
        }
        let hex_opt =
            |field: &str, v: &Option<String>| v.as_deref().map(|s| parse_hex(field, s)).transpose();
        Ok(Policy {
            pcrs,
            allow_debug: self.allow_debug,
            max_age: self.max_age_secs.map(Duration::from_secs),
            max_clock_skew: self
                .max_clock_skew_secs
                .map_or(DEFAULT_MAX_CLOCK_SKEW, Duration::from_secs),
            nonce: hex_opt("nonce", &self.nonce)?,
            public_key: hex_opt("public_key", &self.public_key)?,
            user_data: hex_opt("user_data", &self.user_data)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_file_round_trip() {
        let toml = r#"
            roots = ["ca/root.pem"]
            max_age_secs = 300
            [pcrs]
            0 = "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000001"
        "#;
        let file: PolicyFile = toml::from_str(toml).unwrap();
        let policy = file.to_policy().unwrap();
        assert_eq!(policy.max_age, Some(Duration::from_secs(300)));
        assert_eq!(policy.max_clock_skew, DEFAULT_MAX_CLOCK_SKEW);
        assert_eq!(policy.pcrs[&0][47], 1);
        assert!(!policy.allow_debug);
    }

    #[test]
    fn measurements_files() {
        let pcr = |b: &str| b.repeat(48);
        let json = format!(
            r#"{{"Measurements":{{"HashAlgorithm":"Sha384 {{ ... }}","PCR0":"{}","PCR1":"{}","PCR2":"{}","PCR8":"{}"}}}}"#,
            pcr("0A"),
            pcr("01"),
            pcr("02"),
            pcr("08")
        );
        let m = parse_measurements(&json).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[&0][0], 0x0a);
        let bare = format!(
            r#"{{"PCR0":"{}","PCR1":"{}","PCR2":"{}"}}"#,
            pcr("00"),
            pcr("01"),
            pcr("02")
        );
        assert_eq!(parse_measurements(&bare).unwrap().len(), 3);
        let missing = format!(r#"{{"PCR0":"{}","PCR1":"{}"}}"#, pcr("00"), pcr("01"));
        assert!(parse_measurements(&missing).is_err());
        let short = format!(
            r#"{{"PCR0":"00","PCR1":"{}","PCR2":"{}"}}"#,
            pcr("01"),
            pcr("02")
        );
        assert!(parse_measurements(&short).is_err());
        assert!(parse_measurements(r#"{"PCR99":"00"}"#).is_err());
        assert!(parse_measurements("[]").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(toml::from_str::<PolicyFile>("allow_debugg = true").is_err());
        let bad_index: PolicyFile = toml::from_str("[pcrs]\n32 = \"00\"").unwrap();
        assert!(matches!(
            bad_index.to_policy(),
            Err(PolicyError::PcrIndex(_))
        ));
        let short: PolicyFile = toml::from_str("[pcrs]\n1 = \"00\"").unwrap();
        assert!(matches!(short.to_policy(), Err(PolicyError::Hex { .. })));
        let nonce: PolicyFile = toml::from_str("nonce = \"zz\"").unwrap();
        assert!(matches!(nonce.to_policy(), Err(PolicyError::Hex { .. })));
    }
}
