//! The enclave's listener: one socket (vsock on Nitro, Unix in local mode) on which the host
//! opens a control connection (status, provisioning, pings, the enclave's events) and one
//! connection per client request (an attestation document, or one opaque request stream).
//! A connection says what it is with its first frame; see `common::transport` for why there
//! is one connection per request.
//!
//! Everything the host sends is untrusted: frames are bounded, request bodies are bounded,
//! concurrent streams are bounded, and failures are answered with content-free reasons.

use crate::provision::{answer, load_from_header, recipient_key, LoadedModel};
use common::nsm::{AttestationRequest, Nsm};
use common::transport::{BoxConn, Listener};
use common::wire::io::{read_frame, read_preface, write_frame, write_preface, ConnError};
use common::wire::{EnclaveState, EventKind, Message, DEFAULT_MAX_PAYLOAD};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncWriteExt, BufReader};

/// A host connection, read through a buffer (one read syscall per burst of frames).
type Conn = BufReader<BoxConn>;
use tokio::sync::{mpsc, Semaphore};

/// A loaded model and what identifies it.
pub struct Served {
    /// The inference engine on the unsealed weights.
    pub engine: engine::Engine,
    /// SHA-256 of the weights (PCR16's input).
    pub sha256: [u8; 32],
    /// The model's name from the sealed header.
    pub name: String,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("name", &self.name)
            .field("sha256", &hex::encode(self.sha256))
            .finish()
    }
}

/// A stream failure the host may see: an HTTP-like status and a content-free reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFailure {
    /// 400 (malformed request), 413 (too large), 503 (not ready or busy), 500 (internal).
    pub status: u16,
    /// Why, naming checks, never content.
    pub reason: String,
}

impl StreamFailure {
    /// A failure with `status` and `reason`.
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

/// The response to one request, as it is produced. Dropping the receiver cancels the work.
pub type ResponseStream = mpsc::Receiver<Result<Vec<u8>, StreamFailure>>;

/// Where content-free events (audit records, log lines) for the host go: the control
/// connection takes them in order. When its backlog is full an event is dropped and counted
/// locally rather than blocking serving.
#[derive(Debug, Clone)]
pub struct Events(mpsc::Sender<(EventKind, String)>);

impl Events {
    /// Queues one event.
    pub fn emit(&self, kind: EventKind, record: String) {
        if self.0.try_send((kind, record)).is_err() {
            tracing::warn!("event backlog full; an event was dropped");
        }
    }
}

/// What answers opaque client requests: the attested OHTTP gateway.
pub trait Gateway: Send + Sync + 'static {
    /// The public key that attestation documents for clients carry (`public_key`).
    fn public_key(&self) -> Option<Vec<u8>>;
    /// The `user_data` that binds the key to the model and configuration.
    fn user_data(&self, served: &Served) -> Option<Vec<u8>>;
    /// Starts answering one request; its audit record goes to `events`.
    fn open(
        &self,
        served: Arc<Served>,
        request: Vec<u8>,
        events: Events,
    ) -> Result<ResponseStream, StreamFailure>;
}

/// The listener's limits.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest model accepted, in bytes.
    pub max_model_bytes: u64,
    /// The engine's configuration.
    pub engine: engine::EngineConfig,
    /// Request streams served at once; more are refused with 503.
    pub max_streams: usize,
    /// Largest request body, in bytes.
    pub max_request_bytes: usize,
    /// Connections from the host open at once. The next is accepted only when one closes,
    /// so a host that opens thousands cannot make the enclave buffer for each.
    pub max_connections: usize,
    /// A connection that sends no frame for this long while the enclave waits for one (between
    /// exchanges, or inside a request body) is closed, and its buffers with it.
    pub idle_timeout_ms: u64,
    /// Events kept while no host is connected to take them.
    pub event_backlog: usize,
    /// Streamed tokens that arrive within this many milliseconds of the last sealed chunk
    /// wait and go out together: fewer, larger chunks (less per-token timing and size for
    /// the host to see, less work per token). The first token is never held.
    pub stream_flush_ms: u64,
    /// Every sealed response chunk's plaintext is padded to a multiple of this many bytes
    /// (0: no padding), so the sizes the host sees do not follow the lengths of the tokens in
    /// them (issue 15 §5). Streamed chunks are padded with JSON whitespace inside their last
    /// event, the final one with the zeros RFC 9292 §3.8 allows after a message. Measured.
    pub stream_pad_bytes: usize,
    /// The guardrail policy (measured); `None` runs without guardrails.
    pub guardrails: Option<Arc<guardrails::Guardrails>>,
    /// When set, every request needs an API key from a list signed by this Ed25519 key
    /// (measured; `common::apikeys`).
    pub api_key_signer: Option<[u8; 32]>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_model_bytes: 8 << 30,
            engine: engine::EngineConfig::default(),
            max_streams: 4096,
            max_request_bytes: common::wire::DEFAULT_MAX_REQUEST_BODY,
            max_connections: 1024,
            idle_timeout_ms: 300_000,
            event_backlog: 4096,
            stream_flush_ms: 20,
            // One bucket holds a one-token chat event (about 200 bytes with its framing).
            stream_pad_bytes: 256,
            // The built-in policy is checked by the guardrails crate's tests, so this is
            // `Some` in practice.
            guardrails: guardrails::Guardrails::default_policy().ok().map(Arc::new),
            api_key_signer: None,
        }
    }
}

enum Phase {
    Awaiting,
    Provisioning,
    Ready(Arc<Served>),
}

/// The enclave's serving state, shared by all connections.
pub struct Enclave {
    nsm: Arc<dyn Nsm>,
    cfg: Config,
    gateway: Arc<dyn Gateway>,
    phase: Mutex<Phase>,
    streams: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    auth: Option<Arc<crate::auth::Authorizer>>,
    events_tx: Events,
    events_rx: tokio::sync::Mutex<mpsc::Receiver<(EventKind, String)>>,
}

impl std::fmt::Debug for Enclave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enclave").finish_non_exhaustive()
    }
}

impl Enclave {
    /// An enclave waiting for its model; `auth` takes the API key lists the host delivers.
    pub fn new(
        nsm: Arc<dyn Nsm>,
        cfg: Config,
        gateway: Arc<dyn Gateway>,
        auth: Option<Arc<crate::auth::Authorizer>>,
    ) -> Arc<Self> {
        let (events_tx, events_rx) = mpsc::channel(cfg.event_backlog.max(1));
        let events_tx = Events(events_tx);
        Arc::new(Self {
            nsm,
            auth,
            streams: Arc::new(Semaphore::new(cfg.max_streams)),
            connections: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
            cfg,
            gateway,
            phase: Mutex::new(Phase::Awaiting),
            events_tx,
            events_rx: tokio::sync::Mutex::new(events_rx),
        })
    }

    /// The model, once provisioned.
    pub fn served(&self) -> Option<Arc<Served>> {
        match &*self.phase.lock().unwrap_or_else(|e| e.into_inner()) {
            Phase::Ready(s) => Some(s.clone()),
            _ => None,
        }
    }

    fn state(&self) -> EnclaveState {
        match &*self.phase.lock().unwrap_or_else(|e| e.into_inner()) {
            Phase::Awaiting => EnclaveState::AwaitingModel,
            Phase::Provisioning => EnclaveState::Provisioning,
            Phase::Ready(s) => EnclaveState::Ready {
                model_sha256: s.sha256,
                model_name: s.name.clone(),
            },
        }
    }

    /// Queues a content-free event for the host. When the backlog is full the event is
    /// dropped (and logged locally) rather than blocking serving.
    pub fn emit(&self, kind: EventKind, record: String) {
        self.events_tx.emit(kind, record);
    }

    /// A signed API key list from the host: verified, then in force. The answer says which
    /// serial is in force, or why the list was refused (the previous one stays).
    fn api_keys(&self, signed: &[u8]) -> Message {
        let Some(auth) = &self.auth else {
            return Message::Failed {
                reason: "this enclave does not take API keys (no signer is configured)".into(),
            };
        };
        match auth.load(signed) {
            Ok(serial) => {
                tracing::info!(serial, "API key list in force");
                Message::ApiKeysLoaded(serial)
            }
            Err(e) => {
                tracing::warn!(error = %e, "API key list refused");
                Message::Failed {
                    reason: format!("API key list refused: {e}"),
                }
            }
        }
    }

    /// Accepts connections until the listener fails, at most `max_connections` at once (the
    /// rest wait in the listener's backlog).
    pub async fn serve(self: Arc<Self>, listener: Listener) -> std::io::Result<()> {
        loop {
            let Ok(permit) = self.connections.clone().acquire_owned().await else {
                return Ok(());
            };
            let conn = listener.accept().await?;
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.connection(conn).await {
                    tracing::debug!(error = %e, "connection ended");
                }
                drop(permit);
            });
        }
    }

    /// The next frame of an exchange, or of the next one: the host has `idle_timeout_ms` to
    /// send it, and a frame may be no longer than `max` (its payload is buffered whole).
    async fn next_frame(&self, conn: &mut Conn, max: usize) -> Result<Message, ConnError> {
        let idle = std::time::Duration::from_millis(self.cfg.idle_timeout_ms);
        match tokio::time::timeout(idle, read_frame(conn, max)).await {
            Ok(frame) => frame,
            Err(_) => Err(ConnError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the host sent nothing within the idle timeout",
            ))),
        }
    }

    /// Largest frame that may open an exchange: a sealed header, a nonce, or the first piece
    /// of a request body.
    fn first_frame_max(&self) -> usize {
        // `clamp` cannot panic: the bounds are constants in order (checked at compile time).
        const _: () = assert!(common::sealed::MAX_HEADER_LEN <= DEFAULT_MAX_PAYLOAD);
        self.cfg
            .max_request_bytes
            .clamp(common::sealed::MAX_HEADER_LEN, DEFAULT_MAX_PAYLOAD)
    }

    /// One connection: its first frame says what it is. Request connections (attestation,
    /// streams) are reused by the host for one exchange after another; control and
    /// provisioning connections are not.
    async fn connection(self: Arc<Self>, conn: BoxConn) -> Result<(), ConnError> {
        let mut conn = BufReader::with_capacity(16 << 10, conn);
        read_preface(&mut conn).await?;
        write_preface(&mut conn).await?;
        let mut first = true;
        loop {
            let frame = match self.next_frame(&mut conn, self.first_frame_max()).await {
                Ok(f) => f,
                // The host closed an idle request connection.
                Err(ConnError::Io(e))
                    if !first && e.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            match frame {
                Message::StatusRequest if first => return self.control(conn).await,
                Message::SealedHeader(header) if first => {
                    // `host provision`: a one-shot provisioning connection.
                    self.provision(&mut conn, header).await;
                    return Ok(());
                }
                Message::AttestationRequest { nonce } => self.attest(&mut conn, nonce).await?,
                Message::RequestData(body) => {
                    if !self.stream(&mut conn, body).await? {
                        return Ok(());
                    }
                }
                got => {
                    let reason = format!("{got:?} cannot open an exchange");
                    return write_frame(&mut conn, &fail(400, reason)).await;
                }
            }
            first = false;
        }
    }

    /// Provisions on `conn` if no model is loaded or loading; answers `Ready` at once for the
    /// model already loaded, and `Failed` while another connection provisions.
    async fn provision(&self, conn: &mut Conn, header: Vec<u8>) {
        let claim = {
            let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
            match &*phase {
                Phase::Awaiting => {
                    *phase = Phase::Provisioning;
                    Ok(())
                }
                Phase::Provisioning => Err(Message::Failed {
                    reason: "another connection is provisioning this enclave".into(),
                }),
                Phase::Ready(s) => Err(Message::Ready {
                    model_sha256: s.sha256,
                    model_name: s.name.clone(),
                }),
            }
        };
        if let Err(answer) = claim {
            let _ = write_frame(conn, &answer).await;
            return;
        }
        let result = match recipient_key().await {
            Ok(key) => {
                let cfg = self.cfg.engine.clone();
                let load = move |m: LoadedModel| engine::load(m.weights, cfg);
                load_from_header(
                    conn,
                    header,
                    self.nsm.clone(),
                    self.cfg.max_model_bytes,
                    key,
                    load,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let reply = answer(&result);
        // The phase first, the answer after: a host that reads `Ready` (or `Failed`) may
        // connect again at once, and must find the enclave serving (or awaiting a model).
        {
            let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(l) => {
                    tracing::info!(
                        model = %l.model_name,
                        sha256 = %hex::encode(l.model_sha256),
                        context = l.value.context_length(),
                        weights = l.value.describe(),
                        kernels = engine::kernels::Kernels::detect().name(),
                        "ready"
                    );
                    *phase = Phase::Ready(Arc::new(Served {
                        engine: l.value,
                        sha256: l.model_sha256,
                        name: l.model_name,
                    }));
                }
                Err(e) => {
                    // Refuse to serve; the host may try again (e.g. after a key policy fix).
                    tracing::error!(error = %e, "provisioning failed; not serving");
                    *phase = Phase::Awaiting;
                }
            }
        }
        // Best effort: the connection may be what failed; the host can ask for the status.
        let _ = write_frame(conn, &reply).await;
    }

    /// The host's control connection: status and provisioning first, then, once a model is
    /// ready, pings and the event stream.
    async fn control(&self, mut conn: Conn) -> Result<(), ConnError> {
        write_frame(&mut conn, &Message::Status(self.state())).await?;
        while self.served().is_none() {
            match read_frame(&mut conn, DEFAULT_MAX_PAYLOAD).await? {
                Message::StatusRequest => {
                    write_frame(&mut conn, &Message::Status(self.state())).await?;
                }
                Message::Ping(n) => write_frame(&mut conn, &Message::Pong(n)).await?,
                Message::SealedHeader(header) => self.provision(&mut conn, header).await,
                Message::ApiKeys(signed) => write_frame(&mut conn, &self.api_keys(&signed)).await?,
                got => return refuse(&mut conn, got).await,
            }
        }
        // One control connection takes the events at a time; a second one waits for it.
        let mut events = self.events_rx.lock().await;
        let (mut rd, mut wr) = tokio::io::split(conn);
        // Frames are read by one task and handed over a channel, so the select below never
        // cancels a read mid-frame.
        let (tx, mut frames) = mpsc::channel(16);
        let reader = tokio::spawn(async move {
            loop {
                let frame = read_frame(&mut rd, DEFAULT_MAX_PAYLOAD).await;
                let stop = frame.is_err();
                if tx.send(frame).await.is_err() || stop {
                    return;
                }
            }
        });
        let result = loop {
            tokio::select! {
                frame = frames.recv() => match frame {
                    Some(Ok(Message::StatusRequest)) => {
                        write_frame(&mut wr, &Message::Status(self.state())).await?;
                    }
                    Some(Ok(Message::Ping(n))) => write_frame(&mut wr, &Message::Pong(n)).await?,
                    Some(Ok(Message::ApiKeys(signed))) => {
                        write_frame(&mut wr, &self.api_keys(&signed)).await?;
                    }
                    Some(Ok(got)) => break refuse(&mut wr, got).await,
                    Some(Err(e)) => break Err(e),
                    None => break Ok(()),
                },
                Some((kind, record)) = events.recv() => {
                    write_frame(&mut wr, &Message::Event { kind, record }).await?;
                }
            }
        };
        reader.abort();
        result
    }

    /// One attestation document for a client: the nonce it chose, the gateway's key, and the
    /// binding of that key to the model.
    async fn attest(&self, conn: &mut Conn, nonce: Vec<u8>) -> Result<(), ConnError> {
        let served = self.served();
        let public_key = self.gateway.public_key();
        let user_data = served.as_deref().and_then(|s| self.gateway.user_data(s));
        let nsm = self.nsm.clone();
        let doc = tokio::task::spawn_blocking(move || {
            nsm.attest(AttestationRequest {
                nonce: Some(&nonce),
                public_key: public_key.as_deref(),
                user_data: user_data.as_deref(),
            })
        })
        .await;
        let answer = match doc {
            Ok(Ok(doc)) => Message::AttestationResponse(doc),
            Ok(Err(e)) => fail(500, format!("NSM: {e}")),
            Err(_) => fail(500, "attestation worker failed"),
        };
        write_frame(conn, &answer).await
    }

    /// One opaque request: the body (bounded), then the response as it is produced, frames
    /// that are ready together written together. EOF or `Cancel` from the host drops the
    /// response stream, which cancels the work. Returns whether the connection may carry
    /// another exchange.
    async fn stream(&self, conn: &mut Conn, first: Vec<u8>) -> Result<bool, ConnError> {
        let max = self.cfg.max_request_bytes;
        let mut body = first;
        loop {
            if body.len() > max {
                let too_large = fail(413, format!("request body exceeds {max} bytes"));
                write_frame(conn, &too_large).await?;
                return Ok(false);
            }
            // The frame may fill the body to one byte over the limit, which is answered 413;
            // anything longer is not buffered at all.
            let room = (max + 1 - body.len()).min(DEFAULT_MAX_PAYLOAD);
            let frame = match self.next_frame(conn, room.max(1)).await {
                Err(ConnError::Wire(common::wire::WireError::TooLarge { .. })) => {
                    // Its payload is not read: answer, then end the connection.
                    let too_large = fail(413, format!("request body exceeds {max} bytes"));
                    write_frame(conn, &too_large).await?;
                    return Ok(false);
                }
                frame => frame?,
            };
            match frame {
                Message::RequestData(more) => body.extend_from_slice(&more),
                Message::RequestEnd => break,
                Message::Cancel => return Ok(false),
                got => {
                    let reason = format!("{got:?} inside a request body");
                    write_frame(conn, &fail(400, reason)).await?;
                    return Ok(false);
                }
            }
        }
        let Ok(_permit) = self.streams.clone().try_acquire_owned() else {
            write_frame(conn, &fail(503, "enclave is at its stream limit")).await?;
            return Ok(true);
        };
        let Some(served) = self.served() else {
            write_frame(conn, &fail(503, "model not ready")).await?;
            return Ok(true);
        };
        let mut response = match self.gateway.open(served, body, self.events_tx.clone()) {
            Ok(r) => r,
            Err(f) => {
                write_frame(conn, &fail(f.status, f.reason)).await?;
                return Ok(true);
            }
        };
        let (mut rd, mut wr) = tokio::io::split(conn);
        // The host sends nothing after `RequestEnd` until the response ends: whatever arrives
        // here (Cancel, EOF, garbage) means the client went away. One pinned read, never
        // restarted while the response lasts.
        let gone = read_frame(&mut rd, 64);
        tokio::pin!(gone);
        let mut out = Vec::new();
        loop {
            tokio::select! {
                chunk = response.recv() => {
                    let mut next = Some(chunk);
                    let mut last = false;
                    // Everything ready now goes out in one write.
                    while let Some(chunk) = next.take() {
                        let msg = match chunk {
                            Some(Ok(bytes)) => Message::ResponseData(bytes),
                            Some(Err(f)) => fail(f.status, f.reason),
                            None => Message::ResponseEnd,
                        };
                        last = !matches!(msg, Message::ResponseData(_));
                        out.extend_from_slice(&msg.encode());
                        if !last {
                            next = match response.try_recv() {
                                Ok(c) => Some(Some(c)),
                                Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
                                Err(mpsc::error::TryRecvError::Empty) => None,
                            };
                        }
                    }
                    wr.write_all(&out).await?;
                    wr.flush().await?;
                    out.clear();
                    if last {
                        return Ok(true);
                    }
                }
                _ = &mut gone => return Ok(false),
            }
        }
    }
}

/// Answers a message that has no place on this connection, and ends it.
async fn refuse<W: tokio::io::AsyncWrite + Unpin>(
    conn: &mut W,
    got: Message,
) -> Result<(), ConnError> {
    let reason = format!("{got:?} is not a control message");
    write_frame(conn, &Message::Failed { reason }).await
}

/// A `StreamError` (the codec cuts the reason to `MAX_REASON` at a character boundary).
fn fail(status: u16, reason: impl Into<String>) -> Message {
    Message::StreamError {
        status,
        reason: reason.into(),
    }
}
