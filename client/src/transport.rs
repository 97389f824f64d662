//! HTTP/1.1 to the relay, plain or over TLS (rustls with the system's roots plus any given).
//! One connection per exchange: the relay is usually on loopback or a nearby load balancer,
//! and a fresh connection never carries state from a failed exchange. TLS here protects only
//! metadata; the content is end-to-end encrypted either way.

use crate::ClientError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Where the relay is and how to reach it.
#[derive(Clone)]
pub struct Transport {
    host: String,
    port: u16,
    authority: String,
    prefix: String,
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("authority", &self.authority)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A response whose body is read as it arrives.
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    body: Option<Incoming>,
    timeout: Duration,
}

impl HttpResponse {
    /// The next bytes of the body; `None` at its end (and after).
    pub async fn next_bytes(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            let Some(body) = self.body.as_mut() else {
                return Ok(None);
            };
            // Between chunks the enclave may be generating: the timeout is per chunk.
            let frame = tokio::time::timeout(self.timeout, body.frame())
                .await
                .map_err(|_| ClientError::Transport("the response stalled".into()))?;
            match frame {
                None => {
                    self.body = None;
                    return Ok(None);
                }
                Some(Err(e)) => {
                    self.body = None;
                    return Err(ClientError::Transport(format!("the response failed: {e}")));
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }

    /// The whole body, at most `max` bytes.
    pub async fn read_all(&mut self, max: usize) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        while let Some(b) = self.next_bytes().await? {
            if out.len() + b.len() > max {
                return Err(ClientError::Transport(format!(
                    "the response exceeds {max} bytes"
                )));
            }
            out.extend_from_slice(&b);
        }
        Ok(out)
    }
}

fn tls_config(roots: &[PathBuf]) -> Result<rustls::ClientConfig, ClientError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot use is skipped, as browsers do.
        let _ = store.add(cert);
    }
    for path in roots {
        let pem = std::fs::read(path)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        use rustls::pki_types::pem::PemObject;
        let mut any = false;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
            store
                .add(cert)
                .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
            any = true;
        }
        if !any {
            return Err(ClientError::Config(format!(
                "{}: no certificate",
                path.display()
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth())
}

impl Transport {
    /// Parses `url` (`http://host[:port][/prefix]` or `https://…`).
    pub fn new(url: &str, tls_roots: &[PathBuf], timeout: Duration) -> Result<Self, ClientError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| ClientError::Config(format!("relay URL {url:?}: {e}")))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => Some(tokio_rustls::TlsConnector::from(Arc::new(tls_config(
                tls_roots,
            )?))),
            _ => {
                return Err(ClientError::Config(format!(
                    "relay URL {url:?}: the scheme must be http or https"
                )))
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| ClientError::Config(format!("relay URL {url:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        Ok(Self {
            host,
            port,
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
            tls,
            timeout,
        })
    }

    async fn exchange(&self, req: Request<Full<Bytes>>) -> Result<HttpResponse, ClientError> {
        let connect = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| {
                    ClientError::Transport(format!("connect to {}: {e}", self.authority))
                })?;
            let _ = tcp.set_nodelay(true);
            let response = match &self.tls {
                None => send(TokioIo::new(tcp), req).await?,
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                        .map_err(|e| ClientError::Config(format!("TLS server name: {e}")))?;
                    let stream = tls
                        .connect(name, tcp)
                        .await
                        .map_err(|e| ClientError::Transport(format!("TLS: {e}")))?;
                    send(TokioIo::new(stream), req).await?
                }
            };
            Ok::<_, ClientError>(response)
        };
        let response = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| {
                ClientError::Transport(format!("{} did not answer in time", self.authority))
            })??;
        Ok(HttpResponse {
            status: response.status().as_u16(),
            body: Some(response.into_body()),
            timeout: self.timeout,
        })
    }

    fn request(&self, method: &str, path: &str) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(hyper::header::HOST, &self.authority)
    }

    /// `GET path`, the body read whole (at most `max` bytes).
    pub async fn get(&self, path: &str, max: usize) -> Result<(u16, Vec<u8>), ClientError> {
        let req = self
            .request("GET", path)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let mut response = self.exchange(req).await?;
        let body = response.read_all(max).await?;
        Ok((response.status, body))
    }

    /// `POST path` with `body`; the response body is read by the caller.
    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse, ClientError> {
        let mut builder = self
            .request("POST", path)
            .header(hyper::header::CONTENT_TYPE, content_type);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let req = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Config(e.to_string()))?;
        self.exchange(req).await
    }
}

async fn send<I>(io: I, req: Request<Full<Bytes>>) -> Result<hyper::Response<Incoming>, ClientError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| ClientError::Transport(format!("HTTP handshake: {e}")))?;
    // The connection task ends when the response body is done or dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Transport(format!("HTTP: {e}")))
}
