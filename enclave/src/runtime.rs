//! The enclave's runtime configuration, as clients see it: every setting that changes what the
//! enclave does with a request (limits, the engine's bounds, the channel's suites, and the
//! guardrail policy once there is one) in one canonical JSON document. Its SHA-256 is extended
//! into PCR17 and locked at boot, before any attestation, and is bound in the `user_data` of
//! client attestation documents (`common::binding`), so a client pins the configuration it
//! accepts as it pins the image (PCR0-2) and the model (PCR16).
//!
//! Settings that change only speed (worker threads) are left out, so one policy covers every
//! instance size.

use common::binding::{config_pcr17, CONFIG_PCR};
use common::nsm::{measure_once, MeasureError, Nsm};
use common::sealed::sha256;
use serde::Serialize;

/// Version of the document's schema.
pub const CONFIG_VERSION: u32 = 1;

/// The measured configuration. Field order is the serialization order: do not reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeConfig {
    /// Schema version.
    pub v: u32,
    /// The client channel: chunked OHTTP, its KEM and symmetric suites.
    pub channel: ChannelConfig,
    /// Request limits.
    pub limits: Limits,
    /// The engine's bounds.
    pub engine: EngineBounds,
    /// The guardrail policy's SHA-256 (hex, of the policy file's bytes), when one is loaded.
    pub guardrails: Option<String>,
    /// Client authorization: the Ed25519 public key (hex) that signs API key lists, when keys
    /// are required.
    pub api_key_signer: Option<String>,
}

/// The channel's algorithms (RFC 9458 §3, RFC 9180 §7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelConfig {
    /// Encapsulation.
    pub protocol: &'static str,
    /// The KEM.
    pub kem: &'static str,
    /// KDF/AEAD pairs offered.
    pub suites: Vec<&'static str>,
    /// Streamed tokens are sealed together at most this often (ms).
    pub stream_flush_ms: u64,
    /// Sealed chunks' plaintext is padded to a multiple of this (0: none).
    pub stream_pad_bytes: usize,
}

/// Request limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Largest encapsulated request, in bytes.
    pub max_request_bytes: usize,
    /// Request streams served at once.
    pub max_streams: usize,
    /// Largest model accepted, in bytes.
    pub max_model_bytes: u64,
    /// Host connections open at once.
    pub max_connections: usize,
    /// A host connection silent this long while a frame is awaited is closed (ms).
    pub idle_timeout_ms: u64,
    /// Audit events kept while no host takes them.
    pub event_backlog: usize,
}

/// The engine's bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineBounds {
    /// Sequences decoded together.
    pub max_sequences: usize,
    /// Requests allowed to wait.
    pub queue_capacity: usize,
    /// KV-cache bytes.
    pub kv_budget_bytes: usize,
    /// Longest sequence, in tokens.
    pub max_context: usize,
    /// `max_tokens` when a request does not say.
    pub default_max_tokens: usize,
    /// Prompt tokens processed per step.
    pub prefill_chunk: usize,
}

impl RuntimeConfig {
    /// The configuration of an enclave started with `cfg`. Both structures are taken apart
    /// field by field, without `..`: a field added to either does not compile until it is
    /// measured here or named as not measured, so PCR17 cannot silently miss a setting.
    pub fn of(cfg: &crate::server::Config) -> Self {
        let crate::server::Config {
            max_model_bytes,
            engine,
            max_streams,
            max_request_bytes,
            max_connections,
            idle_timeout_ms,
            event_backlog,
            stream_flush_ms,
            stream_pad_bytes,
            guardrails,
            api_key_signer,
        } = cfg;
        let engine::EngineConfig {
            // Speed only: the same policy covers every instance size and CPU.
            threads: _,
            kernels: _,
            max_sequences,
            queue_capacity,
            kv_budget_bytes,
            max_context,
            default_max_tokens,
            prefill_chunk,
        } = engine;
        Self {
            v: CONFIG_VERSION,
            channel: ChannelConfig {
                protocol: "chunked-ohttp (draft-ietf-ohai-chunked-ohttp), binary HTTP (RFC 9292)",
                kem: common::channel::KEM_NAME,
                suites: common::channel::suite_names(),
                stream_flush_ms: *stream_flush_ms,
                stream_pad_bytes: *stream_pad_bytes,
            },
            limits: Limits {
                max_request_bytes: *max_request_bytes,
                max_streams: *max_streams,
                max_model_bytes: *max_model_bytes,
                max_connections: *max_connections,
                idle_timeout_ms: *idle_timeout_ms,
                event_backlog: *event_backlog,
            },
            engine: EngineBounds {
                max_sequences: *max_sequences,
                queue_capacity: *queue_capacity,
                kv_budget_bytes: *kv_budget_bytes,
                max_context: *max_context,
                default_max_tokens: *default_max_tokens,
                prefill_chunk: *prefill_chunk,
            },
            guardrails: guardrails.as_ref().map(|g| hex::encode(g.sha256())),
            api_key_signer: api_key_signer.map(hex::encode),
        }
    }

    /// The canonical bytes: compact JSON in field order.
    pub fn canonical(&self) -> Vec<u8> {
        // Serializing these plain fields cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// SHA-256 of [`RuntimeConfig::canonical`]: PCR17's input.
    pub fn sha256(&self) -> [u8; 32] {
        sha256(&self.canonical())
    }

    /// PCR17 as an enclave with this configuration reports it.
    pub fn pcr17(&self) -> [u8; 48] {
        config_pcr17(&self.sha256())
    }
}

/// Extends PCR17 with the configuration's SHA-256 and locks it. Run once at boot, before the
/// first attestation document is made.
pub fn measure(nsm: &dyn Nsm, config_sha256: &[u8; 32]) -> Result<(), MeasureError> {
    measure_once(nsm, CONFIG_PCR, config_sha256)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::Config;

    #[test]
    fn canonical_json_is_stable_and_every_limit_counts() {
        let base = RuntimeConfig::of(&Config::default());
        let json = String::from_utf8(base.canonical()).unwrap();
        assert!(
            json.starts_with(r#"{"v":1,"channel":{"protocol":"#),
            "{json}"
        );
        let policy = hex::encode(guardrails::Guardrails::default_policy().unwrap().sha256());
        assert!(
            json.ends_with(&format!(
                r#""guardrails":"{policy}","api_key_signer":null}}"#
            )),
            "{json}"
        );
        // A changed policy, or requiring keys, changes the digest.
        let cfg = Config {
            guardrails: None,
            ..Config::default()
        };
        assert_ne!(RuntimeConfig::of(&cfg).sha256(), base.sha256());
        let cfg = Config {
            api_key_signer: Some([7; 32]),
            ..Config::default()
        };
        assert_ne!(RuntimeConfig::of(&cfg).sha256(), base.sha256());
        let mut cfg = Config::default();
        cfg.engine.max_context += 1;
        assert_ne!(RuntimeConfig::of(&cfg).sha256(), base.sha256());
        // Every measured number, one at a time.
        let edits: [fn(&mut Config); 13] = [
            |c| c.max_model_bytes += 1,
            |c| c.max_streams += 1,
            |c| c.max_request_bytes += 1,
            |c| c.max_connections += 1,
            |c| c.idle_timeout_ms += 1,
            |c| c.event_backlog += 1,
            |c| c.stream_flush_ms += 1,
            |c| c.stream_pad_bytes += 1,
            |c| c.engine.max_sequences += 1,
            |c| c.engine.queue_capacity += 1,
            |c| c.engine.kv_budget_bytes += 1,
            |c| c.engine.default_max_tokens += 1,
            |c| c.engine.prefill_chunk += 1,
        ];
        let mut seen = std::collections::HashSet::from([base.sha256()]);
        for (i, edit) in edits.iter().enumerate() {
            let mut cfg = Config::default();
            edit(&mut cfg);
            assert!(seen.insert(RuntimeConfig::of(&cfg).sha256()), "edit {i}");
        }
        // Threads change speed, not behaviour: not measured.
        let mut cfg = Config::default();
        cfg.engine.threads += 1;
        assert_eq!(RuntimeConfig::of(&cfg).sha256(), base.sha256());
        assert_eq!(base.pcr17(), config_pcr17(&base.sha256()));
    }
}
