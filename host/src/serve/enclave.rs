//! The relay's side of the enclave: a supervisor that keeps one control connection (status,
//! provisioning, pings, the enclave's events) and re-provisions with backoff whenever the
//! enclave restarts or the connection drops; and the per-request connections that carry
//! attestation documents and opaque streams (one connection per request, see
//! `common::transport`).

use super::config::{ms, ServeConfig};
use super::metrics::Metrics;
use super::stopped;
use crate::provision::send_model;
use common::transport::{BoxConn, Endpoint};
use common::wire::io::{open, read_frame, read_preface, write_frame, ConnError};
use common::wire::{
    decode_header, EnclaveState, EventKind, Message, DEFAULT_MAX_PAYLOAD, HEADER_LEN, PREFACE,
};
use std::collections::HashMap;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWriteExt, BufReader, ReadBuf};
use tokio::sync::watch;

/// Idle per-request connections kept for reuse.
const MAX_IDLE: usize = 512;

/// What the HTTP side knows of the enclave, and its idle request connections.
#[derive(Debug)]
pub struct Link {
    /// Where it listens.
    pub endpoint: Endpoint,
    ready: AtomicBool,
    /// Bumped whenever the control connection drops: pooled connections of an older
    /// generation may lead to a dead enclave and are not reused.
    generation: AtomicU64,
    /// Idle connections by the thread (and so the runtime, whose reactor they are
    /// registered with) that made them: each relay worker reuses its own.
    idle: Mutex<HashMap<std::thread::ThreadId, Vec<Upstream>, ByThread>>,
}

/// Hashes a `ThreadId` as the number it is: the table has one entry per worker, and SipHash
/// on every request's lookup bought nothing.
#[derive(Debug, Default, Clone, Copy)]
struct ByThread;

impl std::hash::BuildHasher for ByThread {
    type Hasher = ThreadHasher;
    fn build_hasher(&self) -> ThreadHasher {
        ThreadHasher(0)
    }
}

/// See [`ByThread`].
struct ThreadHasher(u64);

impl std::hash::Hasher for ThreadHasher {
    fn finish(&self) -> u64 {
        // Spread the small sequential ids over the table's high bits too.
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
}

impl Link {
    /// A link to `endpoint`, not ready.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            ready: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            idle: Mutex::new(HashMap::with_hasher(ByThread)),
        }
    }

    /// Whether the control connection is up and the model is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn set_ready(&self, ready: bool, metrics: &Metrics) {
        if !ready {
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        self.ready.store(ready, Ordering::Release);
        metrics.ready.store(i64::from(ready), Ordering::Relaxed);
    }

    /// An idle connection that is still open, if there is one.
    pub fn pooled(&self) -> Option<Upstream> {
        let generation = self.generation.load(Ordering::Acquire);
        loop {
            let mut c = self
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&std::thread::current().id())?
                .pop()?;
            if c.generation == generation && c.is_open() {
                return Some(c);
            }
        }
    }

    /// A connection for one request: an idle one that is still open, or a new one made
    /// within `limit`.
    pub async fn upstream(&self, limit: Duration) -> Result<Upstream, UpstreamError> {
        if let Some(c) = self.pooled() {
            return Ok(c);
        }
        let generation = self.generation.load(Ordering::Acquire);
        let conn = tokio::time::timeout(limit, self.endpoint.connect())
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(UpstreamError::Unavailable)?;
        Ok(Upstream {
            io: BufReader::with_capacity(16 << 10, conn),
            generation,
            fresh: true,
            awaiting_preface: true,
        })
    }

    /// Returns a connection whose exchange ended cleanly, for the next request.
    pub fn recycle(&self, c: Upstream) {
        if c.generation != self.generation.load(Ordering::Acquire) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mine = idle.entry(std::thread::current().id()).or_default();
        if mine.len() < MAX_IDLE {
            mine.push(c);
        }
    }
}

/// One connection to the enclave for one request at a time. A connection is reused only
/// after its exchange ended cleanly (`ResponseEnd`, or an attestation document); one cut
/// short is dropped, and its closing is what cancels the enclave's work.
pub struct Upstream {
    io: BufReader<BoxConn>,
    generation: u64,
    /// Our preface is still to be sent.
    fresh: bool,
    /// The enclave's preface is still to be read.
    awaiting_preface: bool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Whether the enclave has not closed this idle connection (a read would block). Any byte
    /// waiting on an idle connection is a protocol error, so it counts as closed too.
    fn is_open(&mut self) -> bool {
        if !self.io.buffer().is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        matches!(
            Pin::new(self.io.get_mut()).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    /// Writes `frames` (encoded, concatenated), after our preface on a new connection, in one
    /// write.
    pub async fn send(&mut self, frames: &[u8]) -> Result<(), UpstreamError> {
        let conn = self.io.get_mut();
        if self.fresh {
            self.fresh = false;
            let mut buf = Vec::with_capacity(PREFACE.len() + frames.len());
            buf.extend_from_slice(&PREFACE);
            buf.extend_from_slice(frames);
            conn.write_all(&buf).await.map_err(ConnError::Io)?;
        } else {
            conn.write_all(frames).await.map_err(ConnError::Io)?;
        }
        Ok(())
    }

    /// The next frame from the enclave (its preface first, on a new connection). A
    /// `StreamError` is returned as [`UpstreamError::Refused`].
    pub async fn next(&mut self) -> Result<Message, UpstreamError> {
        if self.awaiting_preface {
            read_preface(&mut self.io).await?;
            self.awaiting_preface = false;
        }
        match read_frame(&mut self.io, DEFAULT_MAX_PAYLOAD).await? {
            Message::StreamError { status, reason } => {
                Err(UpstreamError::Refused { status, reason })
            }
            m => Ok(m),
        }
    }

    /// Whether a whole frame is already buffered (so [`Upstream::next`] will not wait).
    pub fn has_buffered_frame(&self) -> bool {
        let b = self.io.buffer();
        match b
            .first_chunk::<HEADER_LEN>()
            .map(|h| decode_header(h, DEFAULT_MAX_PAYLOAD))
        {
            Some(Ok((_, len))) => b.len() >= HEADER_LEN + len,
            // `next` fails at once on a header it refuses: it does not wait either.
            Some(Err(_)) => true,
            None => false,
        }
    }
}

/// Why a per-request exchange with the enclave failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The enclave could not be reached.
    #[error("enclave unavailable: {0}")]
    Unavailable(std::io::Error),
    /// The enclave did not answer in time.
    #[error("enclave timed out")]
    Timeout,
    /// The enclave refused the stream, and said why (content-free).
    #[error("enclave: {reason}")]
    Refused {
        /// Its status.
        status: u16,
        /// Its reason.
        reason: String,
    },
    /// The connection failed or the enclave broke the protocol.
    #[error("enclave connection: {0}")]
    Conn(#[from] ConnError),
}

/// Runs `f` within `limit`.
pub async fn timed<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| UpstreamError::Timeout)?
}

/// A fresh attestation document with `nonce`.
pub async fn attest(
    link: &Link,
    nonce: Vec<u8>,
    limit: Duration,
) -> Result<Vec<u8>, UpstreamError> {
    let mut up = link.upstream(limit).await?;
    up.send(&Message::AttestationRequest { nonce }.encode())
        .await?;
    match timed(limit, up.next()).await? {
        Message::AttestationResponse(doc) => {
            link.recycle(up);
            Ok(doc)
        }
        _ => Err(UpstreamError::Conn(ConnError::Wire(
            common::wire::WireError::Invalid {
                what: "AttestationResponse",
                reason: "unexpected answer",
            },
        ))),
    }
}

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
