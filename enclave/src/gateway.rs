//! The attested OHTTP gateway (DESIGN.md §4.3-4.4): the only place where client requests are
//! decrypted. Its key is generated at boot and attested in every client attestation document,
//! bound to the model and the runtime configuration (`common::binding`).
//!
//! A request is a chunked-OHTTP message to that key; inside is a binary HTTP request
//! (RFC 9292) for the OpenAI API: `POST /v1/chat/completions` or `GET /v1/models`. The answer
//! is a binary HTTP response sealed chunk by chunk as tokens are produced: the head and the
//! first server-sent event at once, then one chunk per batch of tokens. Content errors (bad
//! JSON, unknown model, context too long) are answered inside the channel with OpenAI's error
//! shape; the host sees only transport failures (a request that does not decrypt: 400, or one
//! for another key: 422, RFC 9458 §5.3).

use crate::openai::{self, ApiError, Completion};
use crate::server::{Gateway, ResponseStream, Served, StreamFailure};
use common::bhttp::{self, ResponseHead};
use common::binding::Binding;
use common::channel::{ChannelError, GatewayKey, ResponseSealer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use zeroize::Zeroize;

/// Response chunks buffered per request before generation waits for the host.
const RESPONSE_BACKLOG: usize = 64;

/// The gateway: the enclave's OHTTP key and what it is bound to.
#[derive(Debug)]
pub struct OhttpGateway {
    key: GatewayKey,
    config_sha256: [u8; 32],
    booted: u64,
    flush: Duration,
}

impl OhttpGateway {
    /// A gateway with a fresh key, bound to the runtime configuration `config_sha256`;
    /// streamed tokens within `flush` of the last sealed chunk are sealed together.
    pub fn new(config_sha256: [u8; 32], flush: Duration) -> Result<Self, ChannelError> {
        Ok(Self {
            key: GatewayKey::generate()?,
            config_sha256,
            booted: unix_now(),
            flush,
        })
    }

    /// The OHTTP key id.
    pub fn key_id(&self) -> u8 {
        self.key.key_id()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Gateway for OhttpGateway {
    fn public_key(&self) -> Option<Vec<u8>> {
        Some(self.key.encoded_config().to_vec())
    }

    fn user_data(&self, served: &Served) -> Option<Vec<u8>> {
        let binding = Binding::for_key(
            &served.name,
            served.sha256,
            self.config_sha256,
            self.key.key_id(),
            self.key.encoded_config(),
        );
        Some(binding.encode())
    }

    fn open(&self, served: Arc<Served>, request: Vec<u8>) -> Result<ResponseStream, StreamFailure> {
        let (plain, sealer) = self
            .key
            .decapsulate(&request)
            .map_err(|e| StreamFailure::new(e.status(), e.to_string()))?;
        let (tx, rx) = mpsc::channel(RESPONSE_BACKLOG);
        let booted = self.booted;
        let flush = self.flush;
        tokio::spawn(async move {
            let mut out = Out {
                sealer: Some(sealer),
                tx,
                pending: Vec::new(),
            };
            let request = bhttp::Request::decode(&plain, plain.len());
            drop(plain);
            match request {
                Ok(mut req) => {
                    route(&served, &req, &mut out, booted, flush).await;
                    req.body.zeroize();
                }
                Err(e) => out.error(&ApiError::invalid(None, e.to_string())).await,
            }
        });
        Ok(rx)
    }
}

/// The sealed response being written.
struct Out {
    sealer: Option<ResponseSealer>,
    tx: mpsc::Sender<Result<Vec<u8>, StreamFailure>>,
    pending: Vec<u8>,
}

impl Out {
    fn head(&mut self, status: u16, content_type: &str) {
        ResponseHead::new(status, content_type).encode(&mut self.pending);
    }

    fn data(&mut self, bytes: &[u8]) {
        bhttp::encode_chunk(&mut self.pending, bytes);
    }

    /// Seals what is pending as one chunk and sends it. False when the client is gone.
    async fn flush(&mut self) -> bool {
        let Some(sealer) = self.sealer.as_mut() else {
            return false;
        };
        let sealed = sealer.seal(&self.pending);
        self.pending.zeroize();
        self.pending.clear();
        self.send(sealed).await
    }

    /// Ends the response: the bhttp terminators in the final chunk.
    async fn end(&mut self) {
        bhttp::encode_end(&mut self.pending);
        if let Some(sealer) = self.sealer.take() {
            let sealed = sealer.finish(&self.pending);
            self.pending.zeroize();
            self.send(sealed).await;
        }
    }

    async fn send(&mut self, sealed: Result<Vec<u8>, ChannelError>) -> bool {
        let msg = sealed.map_err(|e| StreamFailure::new(500, e.to_string()));
        let failed = msg.is_err();
        self.tx.send(msg).await.is_ok() && !failed
    }

    /// A whole response.
    async fn whole(&mut self, status: u16, content_type: &str, body: &[u8]) {
        self.head(status, content_type);
        self.data(body);
        self.end().await;
    }

    async fn error(&mut self, e: &ApiError) {
        self.whole(e.status, "application/json", &e.body()).await;
    }
}

async fn route(served: &Served, req: &bhttp::Request, out: &mut Out, booted: u64, flush: Duration) {
    let path = req.path.split('?').next().unwrap_or_default();
    match (req.method.as_str(), path) {
        ("POST", "/v1/chat/completions") => chat(served, &req.body, out, flush).await,
        ("GET", "/v1/models") => {
            let body = openai::models(&served.name, booted);
            out.whole(200, "application/json", &body).await;
        }
        (_, "/v1/chat/completions" | "/v1/models") => {
            let e = ApiError::new(405, "invalid_request_error", None, "method not allowed");
            out.error(&e).await;
        }
        _ => {
            let e = ApiError::new(404, "invalid_request_error", None, "unknown path");
            out.error(&e).await;
        }
    }
}

async fn chat(served: &Served, body: &[u8], out: &mut Out, flush: Duration) {
    let prepared = match openai::prepare(body, &served.name) {
        Ok(p) => p,
        Err(e) => return out.error(&e).await,
    };
    let mut generation = match served.engine.chat(&prepared.messages, prepared.params) {
        Ok(g) => g,
        Err(e) => return out.error(&ApiError::from_engine(&e)).await,
    };
    let c = Completion::new(&served.name);
    if !prepared.stream {
        let mut text = String::new();
        let answer = loop {
            match generation.next().await {
                Some(engine::Event::Text(t)) => text.push_str(&t),
                Some(engine::Event::Done {
                    finish_reason,
                    usage,
                    ..
                }) => break Ok(c.whole(&text, finish_reason, &usage)),
                Some(engine::Event::Failed(e)) => break Err(ApiError::from_engine(&e)),
                None => break Err(ApiError::from_engine(&engine::Error::Stopped)),
            }
        };
        text.zeroize();
        return match answer {
            Ok(body) => out.whole(200, "application/json", &body).await,
            Err(e) => out.error(&e).await,
        };
    }
    // Streaming: the head and the role event go out at once. Then events are sealed in
    // batches: one that arrives after a quiet `flush` interval goes out at once (so the first
    // token is never held), and the ones that follow within `flush` of the last chunk join
    // the next one.
    out.head(200, "text/event-stream");
    out.data(&c.role_event());
    if !out.flush().await {
        return;
    }
    let mut last_flush = tokio::time::Instant::now();
    loop {
        let mut events = Vec::new();
        let mut next = generation.next().await;
        let finished = loop {
            let done = match next {
                Some(engine::Event::Text(t)) => {
                    events.extend(c.text_event(&t));
                    false
                }
                Some(engine::Event::Done {
                    finish_reason,
                    usage,
                    ..
                }) => {
                    events.extend(c.done_events(finish_reason, &usage, prepared.include_usage));
                    true
                }
                Some(engine::Event::Failed(e)) => {
                    events.extend(c.error_event(&ApiError::from_engine(&e)));
                    true
                }
                None => {
                    let stopped = ApiError::from_engine(&engine::Error::Stopped);
                    events.extend(c.error_event(&stopped));
                    true
                }
            };
            if done {
                break true;
            }
            next = match generation.try_next() {
                Some(ev) => Some(ev),
                None => {
                    match tokio::time::timeout_at(last_flush + flush, generation.next()).await {
                        Ok(ev) => ev,
                        Err(_) => break false, // the interval is over: send what there is
                    }
                }
            };
        };
        out.data(&events);
        events.zeroize();
        if finished {
            return out.end().await;
        }
        // Dropping `generation` on return cancels the work when the client is gone.
        if !out.flush().await {
            return;
        }
        last_flush = tokio::time::Instant::now();
    }
}
