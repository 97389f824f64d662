//! `client proxy`: the OpenAI API on localhost, so that unmodified OpenAI SDKs and curl talk to
//! the enclave through the attested channel (DESIGN.md §4.4).
//!
//! - `POST /v1/chat/completions` and `POST /v1/completions` (streaming and not) and
//!   `GET /v1/models` are carried inside
//!   the encrypted channel, with the `authorization` header, and the enclave's status, content
//!   type and body come back as they are produced;
//! - `GET /v1/attestation` shows what was verified (`?fresh=1` attests again).
//!
//! Nothing is forwarded before an attestation verifies. Errors use OpenAI's error shape,
//! `{"error": {"message", "type", "param", "code"}}`. It listens on loopback by default: the
//! plaintext between the application and this proxy never leaves the machine.

use crate::{Client, ClientError};
use bytes::Bytes;
use common::bhttp;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Largest request body the proxy accepts, in bytes (the relay's and the enclave's default).
pub const DEFAULT_MAX_BODY: usize = common::wire::DEFAULT_MAX_REQUEST_BODY;

/// A response body: whole, or streamed from a task.
pub enum ProxyBody {
    /// All at once.
    Full(Option<Bytes>),
    /// As it is produced; an `Err` aborts the response.
    Stream(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match &mut *self {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ProxyBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Stream(_) => SizeHint::default(),
        }
    }
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Full(Some(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An OpenAI-shaped error.
fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    });
    json(status, body.to_string().into_bytes())
}

fn client_error(e: &ClientError) -> Response<ProxyBody> {
    let message = e.to_string();
    match e {
        ClientError::Attestation(_) => error(
            StatusCode::BAD_GATEWAY,
            "attestation_error",
            "attestation_failed",
            &message,
        ),
        ClientError::Relay { status, .. } => {
            let status = match status {
                429 | 503 | 504 | 413 => {
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
                }
                _ => StatusCode::BAD_GATEWAY,
            };
            error(status, "relay_error", "relay_error", &message)
        }
        ClientError::Config(_) | ClientError::Rng => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "proxy_misconfigured",
            &message,
        ),
        _ => error(
            StatusCode::BAD_GATEWAY,
            "channel_error",
            "enclave_channel_failed",
            &message,
        ),
    }
}

/// Serves the proxy on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    client: Arc<Client>,
    max_body: usize,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let client = client.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&client, req, max_body).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(client: &Client, req: Request<Incoming>, max_body: usize) -> Response<ProxyBody> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/v1/chat/completions" | "/v1/completions") => {
            forward(client, req, max_body).await
        }
        (Method::GET, "/v1/models") => forward(client, req, max_body).await,
        (Method::GET, "/v1/attestation") => {
            let fresh = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "fresh=1"));
            let attested = if fresh {
                client.attest().await
            } else {
                client.attested().await
            };
            match attested {
                Ok(a) => json(
                    StatusCode::OK,
                    serde_json::to_vec_pretty(&a.facts()).unwrap_or_default(),
                ),
                Err(e) => client_error(&e),
            }
        }
        (_, "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/v1/attestation") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "method not allowed",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_url",
            "unknown path; this proxy serves /v1/chat/completions, /v1/completions, /v1/models and /v1/attestation",
        ),
    }
}

async fn read_body(body: Incoming, max: usize) -> Result<Vec<u8>, Response<ProxyBody>> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            &format!("the request body exceeds {max} bytes"),
        )
    };
    if body.size_hint().lower() > max as u64 {
        return Err(too_large());
    }
    let mut out = Vec::new();
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_body",
                "the request body could not be read",
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(too_large());
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

async fn forward(client: &Client, req: Request<Incoming>, max_body: usize) -> Response<ProxyBody> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let auth = req.headers().get(hyper::header::AUTHORIZATION).cloned();
    let body = match read_body(req.into_body(), max_body).await {
        Ok(b) => zeroize::Zeroizing::new(b),
        Err(r) => return r,
    };
    let mut inner = bhttp::Request::new(&method, &path, body.to_vec());
    if method == "POST" {
        inner = inner.with_header("content-type", "application/json");
    }
    if let Some(a) = auth {
        inner = inner.with_header("authorization", a.as_bytes().to_vec());
    }
    let mut response = match client.send(&inner).await {
        Ok(r) => r,
        Err(e) => return client_error(&e),
    };
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = response
        .header("content-type")
        .and_then(|v| HeaderValue::from_bytes(v).ok())
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    let sse = content_type.as_bytes().starts_with(b"text/event-stream");
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(async move {
        while let Some(chunk) = response.chunk().await {
            match chunk {
                Ok(c) => {
                    if tx.send(Ok(Bytes::from(c))).await.is_err() {
                        return; // the application went away: dropping the response cancels
                    }
                }
                Err(e) => {
                    if sse {
                        let event = serde_json::json!({"error": {
                            "message": e.to_string(), "type": "channel_error",
                            "param": null, "code": "enclave_channel_failed"}});
                        let _ = tx.send(Ok(Bytes::from(format!("data: {event}\n\n")))).await;
                    }
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            }
        }
    });
    let mut r = Response::new(ProxyBody::Stream(rx));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, content_type);
    if sse {
        r.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    r
}
