//! The relay's per-request connections to the enclave: attestation documents and opaque
//! request streams, one request per connection at a time (see `common::transport`), and the
//! pool of idle ones each relay worker thread reuses. The supervisor
//! ([`super::supervisor`]) says when the enclave is ready and invalidates the pool when it
//! restarts.

use super::metrics::Metrics;
use common::transport::{BoxConn, Endpoint};
use common::wire::io::{read_frame, read_preface, ConnError};
use common::wire::{decode_header, Message, DEFAULT_MAX_PAYLOAD, HEADER_LEN, PREFACE};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWriteExt, BufReader, ReadBuf};

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

    /// Marks the enclave ready or not (the supervisor's to say); not ready also empties the
    /// pool, whose connections may lead to an enclave that is gone.
    pub(super) fn set_ready(&self, ready: bool, metrics: &Metrics) {
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
