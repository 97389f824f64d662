//! The attested OHTTP gateway (DESIGN.md §4.3-4.4): the only place where client requests are
//! decrypted. Its key is generated at boot and attested in every client attestation document,
//! bound to the model and the runtime configuration (`common::binding`).
//!
//! A request is a chunked-OHTTP message to that key; inside is a binary HTTP request
//! (RFC 9292) for the OpenAI API: `POST /v1/chat/completions`, `POST /v1/completions` (legacy,
//! for base models) or `GET /v1/models`. The answer
//! is a binary HTTP response sealed chunk by chunk as tokens are produced: the head and the
//! first server-sent event at once, then one chunk per batch of tokens. Content errors (bad
//! JSON, unknown model, context too long) are answered inside the channel with OpenAI's error
//! shape; the host sees only transport failures (a request that does not decrypt: 400, or one
//! for another key: 422, RFC 9458 §5.3).

use crate::auth::{Authorizer, Grant};
use crate::openai::{self, ApiError, Completion};
use crate::server::{Events, Gateway, ResponseStream, Served, StreamFailure};
use common::audit::{AuditHit, AuditRecord, Finish, HitAction, HitDirection, Route};
use common::bhttp::{self, ResponseHead};
use common::binding::Binding;
use common::channel::{ChannelError, GatewayKey, ResponseSealer};
use common::wire::EventKind;
use guardrails::{Guardrails, Hit};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    pad: usize,
    policy: Policy,
    replay: Arc<crate::replay::ReplayGuard>,
}

/// What the gateway enforces on every request: the guardrail policy and, when API keys are
/// required, the authorizer. Both are part of the measured configuration.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The guardrails, if any.
    pub guardrails: Option<Arc<Guardrails>>,
    /// API key checks, if required.
    pub auth: Option<Arc<Authorizer>>,
}

impl OhttpGateway {
    /// A gateway with a fresh key, bound to the runtime configuration `config_sha256`;
    /// streamed tokens within `flush` of the last sealed chunk are sealed together, and sealed
    /// chunks are padded to multiples of `pad` bytes.
    pub fn new(
        config_sha256: [u8; 32],
        flush: Duration,
        pad: usize,
        policy: Policy,
    ) -> Result<Self, ChannelError> {
        Ok(Self {
            key: GatewayKey::generate()?,
            config_sha256,
            booted: common::clock::unix_seconds(),
            flush,
            pad,
            policy,
            replay: Arc::default(),
        })
    }

    /// The OHTTP key id.
    pub fn key_id(&self) -> u8 {
        self.key.key_id()
    }
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

    fn open(
        &self,
        served: Arc<Served>,
        request: Vec<u8>,
        events: Events,
    ) -> Result<ResponseStream, StreamFailure> {
        let (plain, sealer) = self
            .key
            .decapsulate(&request)
            .map_err(|e| StreamFailure::new(e.status(), e.to_string()))?;
        let (tx, rx) = mpsc::channel(RESPONSE_BACKLOG);
        let pad = self.pad;
        let replay = self.replay.clone();
        // The request's header and encapsulated key, for the replay check.
        let head: Vec<u8> = request.get(..64).unwrap_or(&request).to_vec();
        let ctx = Ctx {
            served,
            policy: self.policy.clone(),
            booted: self.booted,
            flush: self.flush,
        };
        tokio::spawn(async move {
            let started = Instant::now();
            let mut out = Out {
                sealer: Some(sealer),
                tx,
                pending: Vec::new(),
                pad,
            };
            let mut audit = new_audit(&ctx.served.name);
            let request = bhttp::Request::decode(&plain, plain.len());
            drop(plain);
            match request {
                Ok(mut req) => {
                    match replay.admit(&head, req.header("date"), common::clock::unix_seconds()) {
                        Ok(()) => route(&ctx, &req, &mut out, &mut audit).await,
                        Err(e) => {
                            audit.status = e.status;
                            if e.status == 409 {
                                audit.finish_reason = Finish::Replayed;
                            }
                            out.error(&e).await;
                        }
                    }
                    req.body.zeroize();
                }
                Err(e) => {
                    let e = ApiError::invalid(None, e.to_string());
                    audit.status = e.status;
                    out.error(&e).await;
                }
            }
            audit.latency_ms = started.elapsed().as_millis() as u64;
            events.emit(
                EventKind::Audit,
                serde_json::to_string(&audit).unwrap_or_default(),
            );
        });
        Ok(rx)
    }
}

/// One request's context.
struct Ctx {
    served: Arc<Served>,
    policy: Policy,
    booted: u64,
    flush: Duration,
}

/// One request's audit record (issue 8 §3; [`common::audit`]).
type Audit = AuditRecord;

fn new_audit(model: &str) -> Audit {
    let mut id = [0u8; 12];
    // An id needs no secrecy; a failed RNG leaves zeros.
    let _ = aws_lc_rs::rand::fill(&mut id);
    AuditRecord::new(format!("req-{}", hex::encode(id)), model)
}

fn audit_hits(audit: &mut Audit, hits: &[Hit]) {
    for h in hits {
        audit.guardrails.push(AuditHit {
            rule: h.rule.to_string(),
            action: match h.action {
                guardrails::Action::Block => HitAction::Block,
                guardrails::Action::Redact => HitAction::Redact,
                guardrails::Action::Flag => HitAction::Flag,
            },
            direction: match h.direction {
                guardrails::Direction::Input => HitDirection::Input,
                guardrails::Direction::Output => HitDirection::Output,
            },
        });
    }
}

/// The sealed response being written.
struct Out {
    sealer: Option<ResponseSealer>,
    tx: mpsc::Sender<Result<Vec<u8>, StreamFailure>>,
    pending: Vec<u8>,
    /// Sealed plaintexts are padded to multiples of this (0: not padded).
    pad: usize,
}

impl Out {
    fn head(&mut self, status: u16, content_type: &str) {
        ResponseHead::new(status, content_type).encode(&mut self.pending);
    }

    fn data(&mut self, bytes: &[u8]) {
        bhttp::encode_chunk(&mut self.pending, bytes);
    }

    /// Server-sent `events` as one content chunk, padded with spaces before their final blank
    /// line (whitespace after a JSON value, which JSON and SSE readers ignore) so that what is
    /// pending is a whole number of pad buckets: the size of the sealed chunk then tells the
    /// host how many buckets, not how long the tokens were.
    fn events(&mut self, events: &mut Vec<u8>) {
        if self.pad > 0 && events.ends_with(b"\n\n") {
            let mut spaces = 0;
            loop {
                let n = events.len() + spaces;
                let mut prefix = Vec::new();
                bhttp::varint(&mut prefix, n as u64);
                let r = (self.pending.len() + prefix.len() + n) % self.pad;
                if r == 0 {
                    break;
                }
                spaces += self.pad - r;
            }
            let at = events.len() - 2;
            events.splice(at..at, std::iter::repeat_n(b' ', spaces));
        }
        self.data(events);
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
        if self.pad > 0 {
            let n = self.pending.len().next_multiple_of(self.pad);
            self.pending.resize(n, 0);
        }
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

    /// [`Out::error`], returning the status for the audit record.
    async fn reply_error(&mut self, e: &ApiError) -> u16 {
        self.error(e).await;
        e.status
    }
}

async fn route(ctx: &Ctx, req: &bhttp::Request, out: &mut Out, audit: &mut Audit) {
    let path = req.path.split('?').next().unwrap_or_default();
    let status = match (req.method.as_str(), path) {
        ("POST", "/v1/chat/completions") => {
            audit.route = Route::ChatCompletions;
            generate(ctx, req, Api::Chat, out, audit).await
        }
        ("POST", "/v1/completions") => {
            audit.route = Route::Completions;
            generate(ctx, req, Api::Text, out, audit).await
        }
        ("GET", "/v1/models") => {
            audit.route = Route::Models;
            match authorize(ctx, req, audit) {
                Ok(_) => {
                    let body = openai::models(&ctx.served.name, ctx.booted);
                    out.whole(200, "application/json", &body).await;
                    200
                }
                Err(e) => out.reply_error(&e).await,
            }
        }
        (_, "/v1/chat/completions" | "/v1/completions" | "/v1/models") => {
            let e = ApiError::new(405, "invalid_request_error", None, "method not allowed");
            out.reply_error(&e).await
        }
        _ => {
            let e = ApiError::new(404, "invalid_request_error", None, "unknown path");
            out.reply_error(&e).await
        }
    };
    audit.status = status;
}

/// The API key check, when keys are required.
fn authorize(
    ctx: &Ctx,
    req: &bhttp::Request,
    audit: &mut Audit,
) -> Result<Option<Grant>, ApiError> {
    let Some(auth) = &ctx.policy.auth else {
        return Ok(None);
    };
    let grant = auth.authorize(req.header("authorization"), &ctx.served.name)?;
    audit.key = Some(grant.audit_id.clone());
    Ok(Some(grant))
}

/// Which generation API a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    /// `/v1/chat/completions`: messages through the model's chat template.
    Chat,
    /// `/v1/completions`: a raw prompt.
    Text,
}

async fn generate(
    ctx: &Ctx,
    req: &bhttp::Request,
    api: Api,
    out: &mut Out,
    audit: &mut Audit,
) -> u16 {
    let served = &ctx.served;
    let grant = match authorize(ctx, req, audit) {
        Ok(g) => g,
        Err(e) => return out.reply_error(&e).await,
    };
    let prepared = match api {
        Api::Chat => openai::prepare(&req.body, &served.name),
        Api::Text => openai::prepare_text(&req.body, &served.name),
    };
    let mut prepared = match prepared {
        Ok(p) => p,
        Err(e) => return out.reply_error(&e).await,
    };
    if let Some(g) = &ctx.policy.guardrails {
        let tokenizer = served.engine.tokenizer();
        let count = |s: &str| tokenizer.encode(s).map_or(s.len(), |t| t.len());
        let mut texts = prepared.input.texts();
        let verdict = g.check_input(&mut texts, &count);
        audit_hits(audit, &verdict.hits);
        if let Some(b) = verdict.blocked {
            audit.finish_reason = Finish::ContentFilter;
            prepared.input.zeroize();
            return out.reply_error(&ApiError::content_filter(&b.message)).await;
        }
    }
    let (want_stream, include_usage) = (prepared.stream, prepared.include_usage);
    let generation = match &prepared.input {
        openai::Input::Chat(messages) => served.engine.chat(messages, prepared.params),
        openai::Input::Text(prompt) => served.engine.complete(prompt, prepared.params),
    };
    prepared.input.zeroize();
    let mut generation = match generation {
        Ok(g) => g,
        Err(e) => return out.reply_error(&ApiError::from_engine(&e)).await,
    };
    audit.prompt_tokens = generation.prompt_tokens();
    // The worst case is taken from the key's token quota before the first step (dropping the
    // generation on a refusal cancels it), and the unused part is refunded at the end.
    let reservation = match &grant {
        Some(g) => match g.reserve(generation.prompt_tokens() + generation.max_tokens()) {
            Ok(r) => Some(r),
            Err(e) => return out.reply_error(&e).await,
        },
        None => None,
    };
    let mut filter = ctx.policy.guardrails.as_ref().map(|g| g.output_filter());
    let c = match api {
        Api::Chat => Completion::new(&served.name),
        Api::Text => Completion::new_text(&served.name),
    };
    audit.request_id = c.id.clone();
    let status = if want_stream {
        stream(
            ctx.flush,
            &mut generation,
            include_usage,
            &c,
            filter.as_mut(),
            out,
            audit,
        )
        .await
    } else {
        whole(&mut generation, &c, filter.as_mut(), out, audit).await
    };
    if let Some(f) = &filter {
        // Output hits (input hits were recorded before generation).
        audit_hits(audit, f.hits());
    }
    if let Some(r) = reservation {
        r.settle(audit.prompt_tokens + audit.completion_tokens);
    }
    status
}

/// A piece of generated text through the output filter: what may go out, and whether a rule
/// blocked the rest (with its message).
fn filtered(
    filter: Option<&mut guardrails::OutputFilter>,
    text: String,
) -> (String, Option<String>) {
    match filter {
        Some(f) => {
            let mut text = text;
            let o = f.push(&text);
            text.zeroize();
            (o.text, o.blocked.map(|b| b.message))
        }
        None => (text, None),
    }
}

/// The end of an answer: the text the filter still held, the finish reason for the client and
/// the audit record (`content_filter` when an output rule blocked at the very end), and the
/// refusal message if one did. Records the completion token count.
fn filter_end(
    filter: Option<&mut guardrails::OutputFilter>,
    finish_reason: engine::FinishReason,
    usage: &engine::Usage,
    audit: &mut Audit,
) -> (String, &'static str, Option<String>) {
    audit.completion_tokens = usage.completion_tokens;
    let (rest, refusal) = match filter {
        Some(f) => {
            let o = f.finish();
            (o.text, o.blocked.map(|b| b.message))
        }
        None => (String::new(), None),
    };
    let reason = match refusal {
        Some(_) => Finish::ContentFilter,
        None => openai::finish(finish_reason),
    };
    audit.finish_reason = reason;
    (rest, reason.name(), refusal)
}

async fn whole(
    generation: &mut engine::Generation,
    c: &Completion,
    mut filter: Option<&mut guardrails::OutputFilter>,
    out: &mut Out,
    audit: &mut Audit,
) -> u16 {
    let mut text = String::new();
    let answer = loop {
        // Nothing is sent until the end: watch for the client going away meanwhile, so
        // that dropping `generation` cancels the work.
        let next = tokio::select! {
            next = generation.next() => next,
            _ = out.tx.closed() => {
                text.zeroize();
                audit.finish_reason = Finish::Cancelled;
                return 499;
            }
        };
        match next {
            Some(engine::Event::Text(t)) => {
                audit.completion_tokens += 1;
                let (piece, blocked) = filtered(filter.as_deref_mut(), t);
                text.push_str(&piece);
                if let Some(m) = blocked {
                    audit.finish_reason = Finish::ContentFilter;
                    let usage = usage_so_far(audit);
                    break Ok(c.whole(&text, "content_filter", Some(&m), &usage));
                }
            }
            Some(engine::Event::Done {
                finish_reason,
                usage,
                ..
            }) => {
                let (rest, reason, blocked) =
                    filter_end(filter.as_deref_mut(), finish_reason, &usage, audit);
                text.push_str(&rest);
                break Ok(c.whole(&text, reason, blocked.as_deref(), &usage));
            }
            Some(engine::Event::Failed(e)) => break Err(ApiError::from_engine(&e)),
            None => break Err(ApiError::from_engine(&engine::Error::Stopped)),
        }
    };
    text.zeroize();
    match answer {
        Ok(mut body) => {
            out.whole(200, "application/json", &body).await;
            body.zeroize();
            200
        }
        Err(e) => {
            audit.finish_reason = Finish::Error;
            out.reply_error(&e).await
        }
    }
}

fn usage_so_far(audit: &Audit) -> engine::Usage {
    engine::Usage {
        prompt_tokens: audit.prompt_tokens,
        completion_tokens: audit.completion_tokens,
        total_tokens: audit.prompt_tokens + audit.completion_tokens,
    }
}

async fn stream(
    flush: Duration,
    generation: &mut engine::Generation,
    include_usage: bool,
    c: &Completion,
    mut filter: Option<&mut guardrails::OutputFilter>,
    out: &mut Out,
    audit: &mut Audit,
) -> u16 {
    // Streaming: the head and the role event go out at once. Then events are sealed in
    // batches: one that arrives after a quiet `flush` interval goes out at once (so the first
    // token is never held), and the ones that follow within `flush` of the last chunk join
    // the next one.
    out.head(200, "text/event-stream");
    let mut role = c.role_event();
    if !role.is_empty() {
        out.events(&mut role);
    }
    if !out.flush().await {
        audit.finish_reason = Finish::Cancelled;
        return 200;
    }
    let mut last_flush = tokio::time::Instant::now();
    loop {
        let mut events = Vec::new();
        let mut next = generation.next().await;
        let finished = loop {
            let done = match next {
                Some(engine::Event::Text(t)) => {
                    audit.completion_tokens += 1;
                    let (piece, blocked) = filtered(filter.as_deref_mut(), t);
                    if !piece.is_empty() {
                        events.extend(c.text_event(&piece));
                    }
                    match blocked {
                        Some(m) => {
                            events.extend(c.refusal_event(&m));
                            audit.finish_reason = Finish::ContentFilter;
                            let usage = usage_so_far(audit);
                            events.extend(c.done_events("content_filter", &usage, include_usage));
                            true
                        }
                        None => false,
                    }
                }
                Some(engine::Event::Done {
                    finish_reason,
                    usage,
                    ..
                }) => {
                    let (rest, reason, refusal) =
                        filter_end(filter.as_deref_mut(), finish_reason, &usage, audit);
                    if !rest.is_empty() {
                        events.extend(c.text_event(&rest));
                    }
                    if let Some(m) = refusal {
                        events.extend(c.refusal_event(&m));
                    }
                    events.extend(c.done_events(reason, &usage, include_usage));
                    true
                }
                Some(engine::Event::Failed(e)) => {
                    audit.finish_reason = Finish::Error;
                    events.extend(c.error_event(&ApiError::from_engine(&e)));
                    true
                }
                None => {
                    audit.finish_reason = Finish::Error;
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
        if finished {
            out.data(&events);
        } else {
            out.events(&mut events);
        }
        events.zeroize();
        if finished {
            out.end().await;
            return 200;
        }
        // Dropping `generation` on return cancels the work when the client is gone.
        if !out.flush().await {
            audit.finish_reason = Finish::Cancelled;
            return 200;
        }
        last_flush = tokio::time::Instant::now();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use common::bhttp::{ResponseDecoder, ResponsePart};

    /// Seals a streamed answer whose tokens have very different lengths, one token per chunk
    /// (decode slower than the flush interval), and returns the sealed chunks as the host
    /// carries them and the body the client reads.
    async fn stream_tokens(pad: usize, tokens: &[&str]) -> (Vec<usize>, String) {
        let key = GatewayKey::generate().unwrap();
        let request = bhttp::Request::new("POST", "/v1/chat/completions", b"{}".to_vec());
        let (body, mut opener) =
            common::channel::encapsulate(key.encoded_config(), &request.encode()).unwrap();
        let (_, sealer) = key.decapsulate(&body).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let mut out = Out {
            sealer: Some(sealer),
            tx,
            pending: Vec::new(),
            pad,
        };
        out.head(200, "text/event-stream");
        let mut role = b"data: {\"role\":\"assistant\"}\n\n".to_vec();
        out.events(&mut role);
        assert!(out.flush().await);
        for t in tokens {
            let mut ev = format!("data: {}\n\n", serde_json::json!({ "content": t })).into_bytes();
            out.events(&mut ev);
            assert!(out.flush().await);
        }
        out.data(b"data: [DONE]\n\n");
        out.end().await;
        drop(out);
        let mut sizes = Vec::new();
        let mut decoder = ResponseDecoder::new();
        let mut text = Vec::new();
        while let Some(sealed) = rx.recv().await {
            let sealed = sealed.unwrap();
            sizes.push(sealed.len());
            let plain = opener.push(&sealed, 1 << 20).unwrap();
            for part in decoder.push(&plain).unwrap() {
                if let ResponsePart::Data(d) = part {
                    text.extend(d);
                }
            }
        }
        for part in decoder.push(&opener.finish(1 << 20).unwrap()).unwrap() {
            if let ResponsePart::Data(d) = part {
                text.extend(d);
            }
        }
        assert!(decoder.is_done());
        (sizes, String::from_utf8(text).unwrap())
    }

    #[tokio::test]
    async fn padded_chunks_do_not_show_token_lengths() {
        let tokens = [
            "a",
            " extraordinarily",
            ",",
            " antidisestablishmentarianism",
            ".",
        ];
        let (sizes, body) = stream_tokens(256, &tokens).await;
        // The first chunk carries the response nonce and the head; the token chunks between it
        // and the last are all the same size, whatever the token.
        let middle = &sizes[1..sizes.len() - 1];
        assert_eq!(middle.len(), tokens.len());
        assert!(middle.iter().all(|s| *s == middle[0]), "{sizes:?}");
        // The client reads the same events: whitespace after each JSON value, nothing else.
        let contents: Vec<String> = body
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| {
                let v: serde_json::Value = serde_json::from_str(d).unwrap();
                v["content"].as_str().map(str::to_string)
            })
            .collect();
        assert_eq!(contents, tokens);
        assert!(body.ends_with("data: [DONE]\n\n"));

        // Unpadded, the sizes follow the tokens: what the padding takes away.
        let (sizes, _) = stream_tokens(0, &tokens).await;
        let middle = &sizes[1..sizes.len() - 1];
        assert!(middle.iter().any(|s| *s != middle[0]), "{sizes:?}");
    }
}
