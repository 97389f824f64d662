//! The client's policy: which enclaves it will talk to. It is the attestation verifier's policy
//! file (roots, debug, age, PCRs) plus the two digests this product measures: the model's
//! SHA-256 (PCR16) and the runtime configuration's SHA-256 (PCR17). TOML, or JSON when the
//! name ends in `.json`; unknown keys are rejected.
//!
//! ```toml
//! # PEM roots to trust instead of the AWS Nitro root (relative to this file). Omit for AWS.
//! roots = ["mock-ca/root.pem"]
//! allow_debug = false        # refuse debug-mode enclaves (PCR0-2 zero)
//! max_age_secs = 300         # refuse documents older than this
//! model_sha256 = "…64 hex…"  # the weights (PCR16 = SHA-384(0^48 ‖ model_sha256))
//! config_sha256 = "…64 hex…" # `enclave --print-config` (PCR17, likewise)
//! [pcrs]                     # the image, from nitro-cli's measurements
//! 0 = "…96 hex…"
//! 1 = "…"
//! 2 = "…"
//! ```
//!
//! `client policy` writes one from a measurements file and the two digests.

use attestation_verifier::{
    load_file, parse_pcr_index, parse_pcr_value, resolve_against, Pcr, Policy, PolicyFile,
    TrustAnchor,
};
use common::binding::config_pcr17;
use common::sealed::model_pcr16;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Document age accepted when the policy does not say, in seconds.
pub const DEFAULT_MAX_AGE_SECS: u64 = 300;

/// The policy file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientPolicyFile {
    /// PEM root certificates to trust instead of the AWS Nitro root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<PathBuf>,
    /// Accept debug-mode enclaves.
    #[serde(default)]
    pub allow_debug: bool,
    /// Maximum document age in seconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_secs: Option<u64>,
    /// Allowed clock skew in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_clock_skew_secs: Option<u64>,
    /// The model's SHA-256, hex.
    pub model_sha256: String,
    /// The runtime configuration's SHA-256, hex.
    pub config_sha256: String,
    /// Expected image PCRs (0, 1 and 2 at least): index → hex.
    pub pcrs: BTreeMap<String, String>,
}

/// Why a policy is unusable.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A value is invalid.
    #[error("policy: {0}")]
    Invalid(String),
}

/// A loaded policy: the verifier's policy (without a nonce, set per attestation), the roots,
/// and the expected digests.
#[derive(Debug, Clone)]
pub struct ClientPolicy {
    /// What every document must satisfy; PCR16 and PCR17 are included.
    pub verifier: Policy,
    /// Trusted roots.
    pub anchors: Vec<TrustAnchor>,
    /// The model's SHA-256.
    pub model_sha256: [u8; 32],
    /// The runtime configuration's SHA-256.
    pub config_sha256: [u8; 32],
}

fn digest(field: &str, s: &str) -> Result<[u8; 32], PolicyError> {
    hex::decode(s.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| PolicyError::Invalid(format!("{field} must be 64 hex digits")))
}

impl ClientPolicyFile {
    /// Reads a policy file; relative `roots` are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let mut file: Self = load_file(path).map_err(|e| PolicyError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        resolve_against(path, &mut file.roots);
        Ok(file)
    }

    /// Checks every value and loads the roots.
    pub fn to_policy(&self) -> Result<ClientPolicy, PolicyError> {
        let model_sha256 = digest("model_sha256", &self.model_sha256)?;
        let config_sha256 = digest("config_sha256", &self.config_sha256)?;
        let mut pcrs: BTreeMap<u8, Pcr> = BTreeMap::new();
        for (index, value) in &self.pcrs {
            let i = parse_pcr_index(index).map_err(|e| PolicyError::Invalid(e.to_string()))?;
            if i == 16 || i == 17 {
                return Err(PolicyError::Invalid(format!(
                    "pcrs.{i}: PCR16 and PCR17 come from model_sha256 and config_sha256"
                )));
            }
            let v = parse_pcr_value(&format!("pcrs.{i}"), value)
                .map_err(|e| PolicyError::Invalid(e.to_string()))?;
            pcrs.insert(i, v);
        }
        for required in [0u8, 1, 2] {
            if !pcrs.contains_key(&required) {
                return Err(PolicyError::Invalid(format!(
                    "pcrs.{required} is required: without PCR0-2 any image would pass"
                )));
            }
        }
        pcrs.insert(16, model_pcr16(&model_sha256));
        pcrs.insert(17, config_pcr17(&config_sha256));
        let base = PolicyFile {
            allow_debug: self.allow_debug,
            max_age_secs: Some(self.max_age_secs.unwrap_or(DEFAULT_MAX_AGE_SECS)),
            max_clock_skew_secs: self.max_clock_skew_secs,
            ..PolicyFile::default()
        };
        let mut verifier = base
            .to_policy()
            .map_err(|e| PolicyError::Invalid(e.to_string()))?;
        verifier.pcrs = pcrs;
        let mut anchors = Vec::new();
        for path in &self.roots {
            let pem = std::fs::read(path).map_err(|e| PolicyError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            anchors.push(TrustAnchor::from_pem(&pem).map_err(|e| PolicyError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?);
        }
        if anchors.is_empty() {
            anchors.push(TrustAnchor::aws_nitro_root());
        }
        Ok(ClientPolicy {
            verifier,
            anchors,
            model_sha256,
            config_sha256,
        })
    }

    /// A policy for an image's measurements and the given digests, as TOML.
    pub fn to_toml(&self) -> String {
        // Serializing strings, integers and a map cannot fail.
        toml::to_string(self).unwrap_or_default()
    }
}

impl ClientPolicy {
    /// The document age this policy accepts.
    pub fn max_age(&self) -> Duration {
        self.verifier
            .max_age
            .unwrap_or(Duration::from_secs(DEFAULT_MAX_AGE_SECS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> ClientPolicyFile {
        ClientPolicyFile {
            roots: vec![],
            allow_debug: false,
            max_age_secs: None,
            max_clock_skew_secs: None,
            model_sha256: "11".repeat(32),
            config_sha256: "22".repeat(32),
            pcrs: [0, 1, 2]
                .iter()
                .map(|i| (i.to_string(), format!("{i:02}").repeat(48)))
                .collect(),
        }
    }

    #[test]
    fn round_trip_and_derived_pcrs() {
        let text = file().to_toml();
        let back: ClientPolicyFile = toml::from_str(&text).unwrap();
        assert_eq!(back, file());
        let p = back.to_policy().unwrap();
        assert_eq!(p.verifier.pcrs[&16], model_pcr16(&[0x11; 32]));
        assert_eq!(p.verifier.pcrs[&17], config_pcr17(&[0x22; 32]));
        assert_eq!(p.max_age(), Duration::from_secs(DEFAULT_MAX_AGE_SECS));
        assert!(!p.verifier.allow_debug);
        assert_eq!(p.anchors.len(), 1);
    }

    #[test]
    fn incomplete_or_contradictory_policies_are_refused() {
        let mut f = file();
        f.pcrs.remove("1");
        assert!(f.to_policy().is_err());
        let mut f = file();
        f.pcrs.insert("16".into(), "00".repeat(48));
        assert!(f.to_policy().is_err());
        let mut f = file();
        f.model_sha256 = "11".into();
        assert!(f.to_policy().is_err());
        let text = file().to_toml().replace("allow_debug", "allow_debugg");
        assert!(toml::from_str::<ClientPolicyFile>(&text).is_err());
    }
}
