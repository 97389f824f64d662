//! The enclave application: everything that runs inside the Nitro Enclave. Provisioning
//! (attested key release and in-memory unsealing), the measured runtime configuration (PCR17),
//! the listener that serves the host's control connection, attestation documents and opaque
//! request streams, and the attested OHTTP gateway that answers OpenAI API requests.
//!
//! Everything from the host is untrusted input: bounded, checked, and answered with
//! content-free errors.

#![forbid(unsafe_code)]

pub mod auth;
pub mod gateway;
pub mod openai;
pub mod provision;
pub mod replay;
pub mod runtime;
pub mod server;

use common::nsm::Nsm;
use std::sync::Arc;

/// A booted enclave: configuration measured, key generated, listener state ready.
#[derive(Debug)]
pub struct Booted {
    /// The serving state.
    pub enclave: Arc<server::Enclave>,
    /// The runtime configuration's SHA-256 (in PCR17).
    pub config_sha256: [u8; 32],
    /// The OHTTP key id.
    pub key_id: u8,
}

/// Why the enclave could not boot. Each is fatal: the enclave exits and the host restarts it.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// PCR17 could not be extended and locked (or already holds another configuration).
    #[error("measuring the runtime configuration into PCR17: {0}")]
    Measure(#[from] common::nsm::MeasureError),
    /// The secret that keys the audit log's client ids could not be drawn.
    #[error("drawing the audit id secret failed")]
    AuditSecret,
    /// The OHTTP key pair could not be generated.
    #[error("OHTTP key: {0}")]
    OhttpKey(#[from] common::channel::ChannelError),
}

/// Boots the enclave: measures the runtime configuration into PCR17 and locks it (before any
/// attestation document can be made), then generates the OHTTP key.
pub fn boot(nsm: Arc<dyn Nsm>, cfg: server::Config) -> Result<Booted, BootError> {
    let config_sha256 = runtime::RuntimeConfig::of(&cfg).sha256();
    runtime::measure(nsm.as_ref(), &config_sha256)?;
    let flush = std::time::Duration::from_millis(cfg.stream_flush_ms);
    let auth = cfg
        .api_key_signer
        .map(auth::Authorizer::new)
        .transpose()
        .map_err(|_| BootError::AuditSecret)?
        .map(Arc::new);
    let policy = gateway::Policy {
        guardrails: cfg.guardrails.clone(),
        auth: auth.clone(),
    };
    let gateway = gateway::OhttpGateway::new(config_sha256, flush, cfg.stream_pad_bytes, policy)?;
    let key_id = gateway.key_id();
    Ok(Booted {
        enclave: server::Enclave::new(nsm, cfg, Arc::new(gateway), auth),
        config_sha256,
        key_id,
    })
}
