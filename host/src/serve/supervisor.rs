//! The relay's supervisor of the enclave: it keeps one control connection (status,
//! provisioning, pings, the enclave's events, the API key file) and re-provisions with backoff
//! whenever the enclave restarts or the connection drops.

use super::config::{ms, ServeConfig};
use super::link::{timed, Link, UpstreamError};
use super::metrics::Metrics;
use super::stopped;
use crate::provision::send_model;
use common::wire::io::{open, read_frame, read_preface, write_frame, ConnError};
use common::wire::{EnclaveState, EventKind, Message, DEFAULT_MAX_PAYLOAD};
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Where the enclave's audit records go.
pub enum AuditSink {
    /// Into the log (target `audit`).
    Log,
    /// Appended to a file as JSON lines.
    File(std::fs::File),
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Log => "AuditSink::Log",
            Self::File(_) => "AuditSink::File",
        })
    }
}

impl AuditSink {
    fn write(&mut self, record: &str) {
        match self {
            Self::Log => tracing::info!(target: "audit", record),
            Self::File(f) => {
                if let Err(e) = writeln!(f, "{record}") {
                    tracing::error!(error = %e, "audit log write failed");
                }
            }
        }
    }
}

/// Keeps the enclave provisioned and the control connection up until `shutdown` turns true.
pub async fn supervise(
    cfg: ServeConfig,
    link: Arc<Link>,
    metrics: Arc<Metrics>,
    kms: Option<aws_sdk_kms::Client>,
    mut audit: AuditSink,
    mut shutdown: watch::Receiver<bool>,
) {
    let initial = Duration::from_millis(100);
    let mut backoff = initial;
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = control(&cfg, &link, &metrics, kms.as_ref(), &mut audit) => r,
            _ = stopped(&mut shutdown) => return,
        };
        link.set_ready(false, &metrics);
        match result {
            Ok(()) => tracing::warn!("enclave closed the control connection"),
            Err(e) => tracing::warn!(error = %e, "enclave control connection lost"),
        }
        // A connection that stayed up a while earns a fast reconnect.
        if started.elapsed() > Duration::from_secs(30) {
            backoff = initial;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut shutdown) => return,
        }
        backoff = (backoff * 2).min(ms(cfg.max_backoff_ms));
    }
}

/// Why the control connection ended.
#[derive(Debug, thiserror::Error)]
enum ControlError {
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("{0}")]
    Conn(#[from] ConnError),
    #[error("provisioning failed: {0}")]
    Provision(#[from] crate::provision::ProvisionError),
    #[error("enclave awaits a model, and no sealed model is configured")]
    NoModel,
    #[error("enclave did not answer a ping in time")]
    PingTimeout,
    #[error("unexpected {0:?} on the control connection")]
    Unexpected(Message),
}

async fn control(
    cfg: &ServeConfig,
    link: &Link,
    metrics: &Metrics,
    kms: Option<&aws_sdk_kms::Client>,
    audit: &mut AuditSink,
) -> Result<(), ControlError> {
    let limit = ms(cfg.enclave_timeout_ms);
    let mut conn = timed(limit, async {
        let mut conn = link
            .endpoint
            .connect()
            .await
            .map_err(UpstreamError::Unavailable)?;
        open(&mut conn, &Message::StatusRequest).await?;
        read_preface(&mut conn).await?;
        Ok(conn)
    })
    .await?;
    let mut state = match timed(limit, async {
        Ok(read_frame(&mut conn, DEFAULT_MAX_PAYLOAD).await?)
    })
    .await?
    {
        Message::Status(s) => s,
        other => return Err(ControlError::Unexpected(other)),
    };
    metrics.enclave_connects.fetch_add(1, Ordering::Relaxed);
    let phase = match &state {
        EnclaveState::AwaitingModel => "awaiting a model",
        EnclaveState::Provisioning => "provisioning",
        EnclaveState::Ready { .. } => "ready",
    };
    tracing::info!(endpoint = %link.endpoint, state = phase, "enclave connected");
    loop {
        match state {
            EnclaveState::Ready { model_name, .. } => {
                tracing::info!(model = %model_name, "enclave ready");
                break;
            }
            EnclaveState::Provisioning => {
                // Someone else (`host provision`) is at it: ask again shortly.
                tokio::time::sleep(Duration::from_millis(500)).await;
                write_frame(&mut conn, &Message::StatusRequest).await?;
                state = match read_control(&mut conn, metrics, audit).await? {
                    Message::Status(s) => s,
                    other => return Err(ControlError::Unexpected(other)),
                };
            }
            EnclaveState::AwaitingModel => {
                let (Some(sealed), Some(kms)) = (&cfg.sealed, kms) else {
                    return Err(ControlError::NoModel);
                };
                let t0 = Instant::now();
                match send_model(&mut conn, kms, sealed).await {
                    Ok(p) => {
                        metrics.provisioned_ok.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            model = %p.model_name,
                            sha256 = %hex::encode(p.model_sha256),
                            ms = t0.elapsed().as_millis() as u64,
                            "enclave provisioned"
                        );
                        state = EnclaveState::Ready {
                            model_sha256: p.model_sha256,
                            model_name: p.model_name,
                        };
                    }
                    Err(e) => {
                        metrics.provisioned_failed.fetch_add(1, Ordering::Relaxed);
                        return Err(e.into());
                    }
                }
            }
        }
    }
    let mut keys = KeysFile::new(cfg.api_keys.clone());
    if let Some(signed) = keys.changed() {
        write_frame(&mut conn, &Message::ApiKeys(signed)).await?;
        let answer = timed(limit, async {
            Ok(read_control(&mut conn, metrics, audit).await?)
        })
        .await?;
        keys_answer(answer, metrics)?;
    }
    link.set_ready(true, metrics);
    // Reads and pings run side by side on the two halves; the reader is one long-lived
    // future, never cancelled mid-frame.
    let (mut rd, mut wr) = tokio::io::split(conn);
    let pong = std::sync::atomic::AtomicU64::new(0);
    let reader = async {
        loop {
            match read_control(&mut rd, metrics, audit).await? {
                Message::Pong(k) => pong.store(k, Ordering::Relaxed),
                other => keys_answer(other, metrics)?,
            }
        }
    };
    tokio::pin!(reader);
    let mut ping = tokio::time::interval(ms(cfg.ping_interval_ms));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut n, mut sent) = (0u64, Instant::now());
    loop {
        tokio::select! {
            r = &mut reader => return r,
            _ = ping.tick() => {
                if pong.load(Ordering::Relaxed) != n {
                    if sent.elapsed() > limit {
                        return Err(ControlError::PingTimeout);
                    }
                    continue;
                }
                n = n.wrapping_add(1);
                sent = Instant::now();
                write_frame(&mut wr, &Message::Ping(n)).await?;
                if let Some(signed) = keys.changed() {
                    write_frame(&mut wr, &Message::ApiKeys(signed)).await?;
                }
            }
        }
    }
}

/// The signed API key list file, re-read when its size or modification time changes.
struct KeysFile {
    path: Option<std::path::PathBuf>,
    seen: Option<(u64, std::time::SystemTime)>,
}

impl KeysFile {
    fn new(path: Option<std::path::PathBuf>) -> Self {
        Self { path, seen: None }
    }

    /// The file's bytes when it is new or changed since the last call (and readable).
    fn changed(&mut self) -> Option<Vec<u8>> {
        let path = self.path.as_ref()?;
        let meta = std::fs::metadata(path)
            .map_err(
                |e| tracing::error!(path = %path.display(), error = %e, "API key list unreadable"),
            )
            .ok()?;
        let stamp = (meta.len(), meta.modified().ok()?);
        if self.seen == Some(stamp) {
            return None;
        }
        if meta.len() > common::apikeys::MAX_SIGNED_BYTES as u64 {
            tracing::error!(path = %path.display(), "API key list too large; not sent");
            self.seen = Some(stamp);
            return None;
        }
        let bytes = std::fs::read(path)
            .map_err(
                |e| tracing::error!(path = %path.display(), error = %e, "API key list unreadable"),
            )
            .ok()?;
        self.seen = Some(stamp);
        Some(bytes)
    }
}

/// The enclave's answer to an API key list: in force, or refused (the enclave keeps the list
/// it had; the relay keeps serving and says why).
fn keys_answer(m: Message, metrics: &Metrics) -> Result<(), ControlError> {
    match m {
        Message::ApiKeysLoaded(serial) => {
            metrics.api_keys_serial.store(serial, Ordering::Relaxed);
            tracing::info!(serial, "enclave took the API key list");
            Ok(())
        }
        Message::Failed { reason } => {
            metrics.api_keys_refused.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%reason, "enclave refused the API key list");
            Ok(())
        }
        other => Err(ControlError::Unexpected(other)),
    }
}

/// The next control message that is not an event; events are written out on the way.
async fn read_control<S: tokio::io::AsyncRead + Unpin>(
    conn: &mut S,
    metrics: &Metrics,
    audit: &mut AuditSink,
) -> Result<Message, ConnError> {
    loop {
        match read_frame(conn, DEFAULT_MAX_PAYLOAD).await? {
            Message::Event {
                kind: EventKind::Audit,
                record,
            } => {
                metrics.audit_events.fetch_add(1, Ordering::Relaxed);
                metrics.audit.record(&record);
                audit.write(&record);
            }
            Message::Event {
                kind: EventKind::Log,
                record,
            } => tracing::info!(target: "enclave", record),
            m => return Ok(m),
        }
    }
}
