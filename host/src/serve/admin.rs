//! The operator's listener: `/metrics` in Prometheus text format and the health probes, on an
//! address of its own (loopback by default). The metrics are sizes, timings and counts of
//! every client's requests; the clients' listener does not give them to whoever asks.

use super::link::Link;
use super::metrics::Metrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Time a scraper has to send its request head, and the longest a connection lives: the
/// listener is the operator's, but it must not be pinned by a stuck peer either.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// Serves the operator's routes on `listener` until `shutdown` says true.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    link: Arc<Link>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = super::stopped(&mut shutdown) => return,
        };
        let (metrics, link) = (metrics.clone(), link.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let answer = answer(&req, &metrics, &link);
                async move { Ok::<_, Infallible>(answer) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

fn answer<B>(req: &Request<B>, metrics: &Metrics, link: &Link) -> Response<Full<Bytes>> {
    let (status, content_type, body): (StatusCode, &str, Bytes) =
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics.render().into(),
            ),
            (&Method::GET, "/healthz") => (
                StatusCode::OK,
                "application/json",
                Bytes::from_static(br#"{"status":"ok"}"#),
            ),
            (&Method::GET, "/readyz") if link.is_ready() => (
                StatusCode::OK,
                "application/json",
                Bytes::from_static(br#"{"status":"ready"}"#),
            ),
            (&Method::GET, "/readyz") => (
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                Bytes::from_static(br#"{"status":"not ready"}"#),
            ),
            (_, "/metrics" | "/healthz" | "/readyz") => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                Bytes::from_static(b"method not allowed\n"),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from_static(b"not found\n"),
            ),
        };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_str(content_type)
            .unwrap_or(hyper::header::HeaderValue::from_static("text/plain")),
    );
    response
}
