//! The client-facing HTTP/1.1 server of `host serve`: routes, limits, and the streaming relay
//! of opaque OHTTP bodies (RFC 9458; chunked OHTTP, draft-ietf-ohai-chunked-ohttp) to the
//! enclave. The relay never looks inside a body: it counts bytes, forwards them as they come,
//! and streams the response back as the enclave produces it.

use super::config::{ms, ServeConfig};
use super::limit::RateLimiter;
use super::link::{self, Link, UpstreamError};
use super::metrics::{route_of, Metrics};
use bytes::Bytes;
use common::wire::{
    Message, MessageType, DEFAULT_MAX_PAYLOAD, HEADER_LEN, MAX_NONCE, REQUEST_END_FRAME,
};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

pub use common::media::{REQUEST_MEDIA_TYPE as OHTTP_REQ, RESPONSE_MEDIA_TYPE as OHTTP_RES};
use common::relay::{RelayErrorBody, RelayErrorCode};

/// Shared state of the HTTP side.
#[derive(Debug)]
pub struct App {
    /// The configuration.
    pub cfg: ServeConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The enclave.
    pub link: Arc<Link>,
    limiter: RateLimiter,
    in_flight: Arc<Semaphore>,
    per_client: Clients,
}

/// Requests in flight per client IP.
type Clients = Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>;

/// A request's place in flight: one of the relay's slots and one of its client's, both given
/// back when the response is finished or dropped.
#[derive(Debug)]
pub struct Admission {
    _slot: OwnedSemaphorePermit,
    /// Boxed: answers carry their admission, and stay small.
    client: Option<Box<(IpAddr, Clients)>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let (ip, map) = *client;
            let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }
}

impl App {
    /// The HTTP side for `cfg`.
    pub fn new(cfg: ServeConfig, metrics: Arc<Metrics>, link: Arc<Link>) -> Self {
        Self {
            limiter: RateLimiter::new(cfg.rate_per_second, cfg.rate_burst),
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight)),
            per_client: Arc::default(),
            cfg,
            metrics,
            link,
        }
    }
}

/// A response body: a whole buffer, or the enclave's stream.
pub enum RelayBody {
    /// Bytes known in advance.
    Full(Full<Bytes>),
    /// Chunks as they arrive; an `Err` cuts the response so the client sees it fail.
    Stream(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

/// A response body that records the request's metrics and log line when it is finished or
/// dropped (a client that goes away mid-stream counts too).
pub struct Tracked {
    body: RelayBody,
    done: Option<Done>,
}

struct Done {
    app: Arc<App>,
    id: u64,
    route: &'static str,
    status: u16,
    start: Instant,
    bytes_in: u64,
    bytes_out: u64,
    complete: bool,
    _permit: Option<Admission>,
    activity: Arc<super::Activity>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let m = &self.app.metrics;
        let elapsed = self.start.elapsed();
        m.request_finished(self.route, self.status, elapsed, self.bytes_out);
        self.activity.done();
        tracing::info!(
            id = self.id,
            route = self.route,
            status = self.status,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            complete = self.complete,
            latency_us = elapsed.as_micros() as u64,
            "request"
        );
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let next = match &mut this.body {
            RelayBody::Full(f) => match Pin::new(f).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(frame.into_data().ok().map(Ok)),
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            RelayBody::Stream(rx) => rx.poll_recv(cx),
        };
        match next {
            Poll::Ready(Some(Ok(data))) => {
                let ended = matches!(&this.body, RelayBody::Full(f) if f.is_end_stream());
                if let Some(d) = &mut this.done {
                    d.bytes_out += data.len() as u64;
                    d.complete |= ended;
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            // `done.complete` stays false: the log line says the stream was cut.
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {
                if let Some(mut d) = this.done.take() {
                    d.complete = true;
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            RelayBody::Full(f) => f.is_end_stream(),
            RelayBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            RelayBody::Full(f) => f.size_hint(),
            RelayBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// What a handler produces before it is tracked.
struct Answer {
    status: StatusCode,
    headers: Vec<(hyper::header::HeaderName, HeaderValue)>,
    body: RelayBody,
    bytes_in: u64,
    permit: Option<Admission>,
}

impl Answer {
    fn new(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            headers: vec![(CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body: RelayBody::Full(Full::new(body.into())),
            bytes_in: 0,
            permit: None,
        }
    }

    /// A JSON error: `{"error": {"code": …, "message": …}}`.
    fn error(status: StatusCode, code: RelayErrorCode, message: impl Into<String>) -> Self {
        let body = RelayErrorBody::new(code, message).to_json();
        Self::new(status, "application/json", body)
    }

    fn retry_after(mut self, wait: Duration) -> Self {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            self.headers.push((RETRY_AFTER, v));
        }
        self
    }
}

/// Serves one request. Never fails: every problem is an HTTP answer.
pub async fn handle(
    app: Arc<App>,
    peer: IpAddr,
    req: Request<Incoming>,
    activity: Arc<super::Activity>,
) -> Result<Response<Tracked>, std::convert::Infallible> {
    let start = Instant::now();
    let id = app.metrics.request_started();
    let route = route_of(req.uri().path());
    let answer = route_request(&app, peer, route, req).await;
    let done = Done {
        app: app.clone(),
        id,
        route,
        status: answer.status.as_u16(),
        start,
        bytes_in: answer.bytes_in,
        bytes_out: 0,
        complete: false,
        _permit: answer.permit,
        activity,
    };
    let mut response = Response::new(Tracked {
        body: answer.body,
        done: Some(done),
    });
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    headers.reserve(answer.headers.len() + 1);
    for (k, v) in answer.headers {
        headers.append(k, v);
    }
    headers.insert("x-request-id", HeaderValue::from(id));
    Ok(response)
}

async fn route_request(
    app: &Arc<App>,
    peer: IpAddr,
    route: &'static str,
    req: Request<Incoming>,
) -> Answer {
    let method = req.method().clone();
    match (route, method) {
        ("/healthz", Method::GET) => {
            Answer::new(StatusCode::OK, "application/json", r#"{"status":"ok"}"#)
        }
        ("/readyz", Method::GET) => {
            if app.link.is_ready() {
                Answer::new(StatusCode::OK, "application/json", r#"{"status":"ready"}"#)
            } else {
                Answer::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    RelayErrorCode::NotReady,
                    "the enclave is not connected or its model is not ready",
                )
            }
        }
        ("/v1/attestation", Method::GET) => match admit(app, peer) {
            Ok(permit) => {
                let mut a = attestation(app, req.uri().query()).await;
                a.permit = Some(permit);
                a
            }
            Err(a) => a,
        },
        ("/v1/ohttp", Method::POST) => match admit(app, peer) {
            Ok(permit) => {
                let mut a = ohttp(app, req).await;
                if a.permit.is_none() {
                    a.permit = Some(permit);
                }
                a
            }
            Err(a) => a,
        },
        ("other", _) => Answer::error(
            StatusCode::NOT_FOUND,
            RelayErrorCode::NotFound,
            "no such route",
        ),
        _ => Answer::error(
            StatusCode::METHOD_NOT_ALLOWED,
            RelayErrorCode::MethodNotAllowed,
            "method not allowed on this route",
        ),
    }
}

/// The checks every enclave-bound request passes: the client's rate, readiness, and the
/// in-flight limit, cheapest first.
fn admit(app: &App, peer: IpAddr) -> Result<Admission, Answer> {
    if let Err(wait) = app.limiter.check(peer, Instant::now()) {
        app.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        return Err(Answer::error(
            StatusCode::TOO_MANY_REQUESTS,
            RelayErrorCode::RateLimited,
            "too many requests from this client",
        )
        .retry_after(wait));
    }
    if !app.link.is_ready() {
        return Err(Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            RelayErrorCode::NotReady,
            "the enclave is not ready",
        )
        .retry_after(Duration::from_secs(1)));
    }
    let slot = app.in_flight.clone().try_acquire_owned().map_err(|_| {
        Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            RelayErrorCode::Overloaded,
            "too many requests in flight",
        )
        .retry_after(Duration::from_secs(1))
    })?;
    {
        let mut m = app.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(peer).or_default();
        if *n >= app.cfg.max_in_flight_per_client {
            app.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(Answer::error(
                StatusCode::TOO_MANY_REQUESTS,
                RelayErrorCode::TooManyInFlight,
                "too many requests in flight from this client",
            )
            .retry_after(Duration::from_secs(1)));
        }
        *n += 1;
    }
    Ok(Admission {
        _slot: slot,
        client: Some(Box::new((peer, app.per_client.clone()))),
    })
}

fn upstream_error(app: &App, e: UpstreamError) -> Answer {
    match e {
        UpstreamError::Refused { status, reason } => {
            let status = match status {
                400 | 413 | 422 | 501 | 503 => {
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)
                }
                _ => StatusCode::BAD_GATEWAY,
            };
            Answer::error(status, RelayErrorCode::EnclaveRefused, reason)
        }
        UpstreamError::Timeout => Answer::error(
            StatusCode::GATEWAY_TIMEOUT,
            RelayErrorCode::EnclaveTimeout,
            "the enclave did not answer in time",
        ),
        UpstreamError::Unavailable(_) => {
            app.metrics
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            Answer::error(
                StatusCode::SERVICE_UNAVAILABLE,
                RelayErrorCode::EnclaveUnavailable,
                "the enclave cannot be reached",
            )
            .retry_after(Duration::from_secs(1))
        }
        UpstreamError::Conn(e) => {
            app.metrics
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "enclave connection failed");
            Answer::error(
                StatusCode::BAD_GATEWAY,
                RelayErrorCode::EnclaveFailed,
                "the enclave connection failed",
            )
        }
    }
}

async fn attestation(app: &App, query: Option<&str>) -> Answer {
    let nonce = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("nonce="));
    let Some(nonce) = nonce else {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            RelayErrorCode::BadNonce,
            "nonce=HEX is required",
        );
    };
    if nonce.len() > 2 * MAX_NONCE {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            RelayErrorCode::BadNonce,
            format!("the nonce is at most {MAX_NONCE} bytes"),
        );
    }
    let nonce = match hex::decode(nonce) {
        Ok(n) if !n.is_empty() => n,
        _ => {
            return Answer::error(
                StatusCode::BAD_REQUEST,
                RelayErrorCode::BadNonce,
                "the nonce must be non-empty hex",
            )
        }
    };
    match link::attest(&app.link, nonce, ms(app.cfg.enclave_timeout_ms)).await {
        Ok(doc) => {
            app.metrics.attestations.fetch_add(1, Ordering::Relaxed);
            let mut a = Answer::new(StatusCode::OK, "application/cbor", doc);
            a.headers.push((
                hyper::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            ));
            a
        }
        Err(e) => upstream_error(app, e),
    }
}

/// Forwards the request body to an enclave connection as it arrives, then streams the
/// response back. Small exchanges take one write and one read on the enclave side: the last
/// body piece goes out with `RequestEnd`, and a response already complete in the read buffer
/// is answered without a streaming task.
async fn ohttp(app: &Arc<App>, req: Request<Incoming>) -> Answer {
    let max = app.cfg.max_body_bytes;
    let ct = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if ct.map(|c| c.split(';').next().unwrap_or_default().trim()) != Some(OHTTP_REQ) {
        return Answer::error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RelayErrorCode::BadContentType,
            format!("the content type must be {OHTTP_REQ}"),
        );
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return too_large(max);
    }
    let limit = ms(app.cfg.enclave_timeout_ms);
    let mut body = req.into_body();
    let deadline = tokio::time::Instant::now() + ms(app.cfg.body_timeout_ms);
    let mut up: Option<link::Upstream> = None;
    let mut received = 0u64;
    // Room for a small body's frames and `RequestEnd`, so it is encoded without growing.
    let hint = declared.unwrap_or(0).min(64 << 10) as usize;
    let mut out = Vec::with_capacity(hint + 3 * HEADER_LEN);
    loop {
        let frame = if body.is_end_stream() {
            None
        } else {
            // A body already in hyper's buffer (the common small request) is taken without
            // arming a timer; the deadline runs from the request's start either way.
            let mut next = body.frame();
            let ready = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut next).poll(cx))).await;
            let got = match ready {
                Poll::Ready(f) => Ok(f),
                Poll::Pending => tokio::time::timeout_at(deadline, next).await,
            };
            match got {
                Err(_) => {
                    return Answer::error(
                        StatusCode::REQUEST_TIMEOUT,
                        RelayErrorCode::BodyTimeout,
                        "the request body took too long",
                    )
                }
                Ok(None) => None,
                Ok(Some(Err(_))) => {
                    return Answer::error(
                        StatusCode::BAD_REQUEST,
                        RelayErrorCode::BadBody,
                        "the request body could not be read",
                    )
                }
                Ok(Some(Ok(frame))) => Some(frame),
            }
        };
        let end = frame.is_none() || body.is_end_stream();
        if let Some(data) = frame.and_then(|f| f.into_data().ok()) {
            received += data.len() as u64;
            app.metrics.add_bytes_in(data.len() as u64);
            if received > max {
                return too_large(max);
            }
            // Frames stay under the enclave's limit whatever size the client's chunks are.
            for piece in data.chunks(DEFAULT_MAX_PAYLOAD / 2) {
                push_raw(&mut out, MessageType::RequestData, piece);
            }
        }
        if end {
            if received == 0 {
                push_raw(&mut out, MessageType::RequestData, &[]);
            }
            out.extend_from_slice(&REQUEST_END_FRAME);
        }
        if !out.is_empty() {
            let conn = match &mut up {
                Some(c) => c,
                None => match app.link.upstream(limit).await {
                    Ok(c) => up.insert(c),
                    Err(e) => return with_bytes(upstream_error(app, e), received),
                },
            };
            if let Err(e) = conn.send(&out).await {
                return with_bytes(upstream_error(app, e), received);
            }
            out.clear();
        }
        if end {
            break;
        }
    }
    let Some(mut up) = up else {
        return upstream_error(app, UpstreamError::Timeout);
    };
    let first = match link::timed(limit, up.next()).await {
        Ok(m) => m,
        Err(e) => return with_bytes(upstream_error(app, e), received),
    };
    let mut answer = Answer {
        status: StatusCode::OK,
        headers: vec![
            (CONTENT_TYPE, HeaderValue::from_static(OHTTP_RES)),
            (
                hyper::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            ),
        ],
        body: RelayBody::Full(Full::new(Bytes::new())),
        bytes_in: received,
        permit: None,
    };
    match first {
        Message::ResponseData(b) => {
            let b = Bytes::from(b);
            // The common small case: the whole response is already here.
            let next = if up.has_buffered_frame() {
                Some(up.next().await)
            } else {
                None
            };
            if let Some(Ok(Message::ResponseEnd)) = next {
                app.link.recycle(up);
                answer.body = RelayBody::Full(Full::new(b));
                return answer;
            }
            // Anything else streams (an error included, after the data that came first).
            let (tx, rx) = mpsc::channel(8);
            answer.body = RelayBody::Stream(rx);
            match next {
                None => {
                    let _ = tx.try_send(Ok(b));
                    tokio::spawn(pump(up, tx, app.clone()));
                }
                Some(Ok(Message::ResponseData(more))) => {
                    let _ = tx.try_send(Ok(b));
                    let _ = tx.try_send(Ok(Bytes::from(more)));
                    tokio::spawn(pump(up, tx, app.clone()));
                }
                Some(other) => {
                    app.metrics
                        .upstream_failures
                        .fetch_add(1, Ordering::Relaxed);
                    let e = match other {
                        Ok(m) => std::io::Error::other(format!("enclave sent {m:?}")),
                        Err(e) => std::io::Error::other(e.to_string()),
                    };
                    let _ = tx.try_send(Ok(b));
                    let _ = tx.try_send(Err(e));
                }
            }
        }
        Message::ResponseEnd => app.link.recycle(up),
        _ => {
            return with_bytes(
                upstream_error(
                    app,
                    UpstreamError::Conn(
                        common::wire::WireError::Invalid {
                            what: "response",
                            reason: "unexpected first frame",
                        }
                        .into(),
                    ),
                ),
                received,
            )
        }
    }
    answer
}

/// Appends a raw frame; `piece` is bounded by the frame limit, so this cannot fail.
fn push_raw(out: &mut Vec<u8>, ty: MessageType, piece: &[u8]) {
    let _ = common::wire::encode_raw_into(out, ty, piece);
}

fn with_bytes(mut a: Answer, bytes_in: u64) -> Answer {
    a.bytes_in = bytes_in;
    a
}

fn too_large(max: u64) -> Answer {
    let mut a = Answer::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        RelayErrorCode::BodyTooLarge,
        format!("the request body is over {max} bytes"),
    );
    // The rest of the body is not read: close the connection instead.
    a.headers
        .push((hyper::header::CONNECTION, HeaderValue::from_static("close")));
    a
}

/// Copies the enclave's response frames to the client's body until the end, an error, or
/// the client going away (the body's receiver dropped), which closes the enclave connection
/// and so cancels the work there. Only a connection whose response ended cleanly is reused.
async fn pump(
    mut up: link::Upstream,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    app: Arc<App>,
) {
    loop {
        let next = tokio::select! {
            f = up.next() => f,
            _ = tx.closed() => break,
        };
        let item = match next {
            Ok(Message::ResponseData(b)) => Ok(Bytes::from(b)),
            Ok(Message::ResponseEnd) => {
                app.link.recycle(up);
                return;
            }
            Ok(other) => Err(std::io::Error::other(format!("enclave sent {other:?}"))),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        let failed = item.is_err();
        if failed {
            app.metrics
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        if tx.send(item).await.is_err() || failed {
            break;
        }
    }
    // Best effort: say so explicitly; dropping the connection closes it either way.
    let _ = up.send(&Message::Cancel.encode()).await;
}
