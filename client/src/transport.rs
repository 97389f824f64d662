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

/// Why an exchange with the relay failed below HTTP's status line.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The TCP connection was refused or failed.
    #[error("connect to {authority}: {source}")]
    Connect {
        /// `host:port` of the relay.
        authority: String,
        /// The socket's error.
        source: std::io::Error,
    },
    /// The TLS handshake failed (an untrusted certificate, a protocol error).
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// The HTTP/1.1 handshake failed.
    #[error("HTTP handshake: {0}")]
    Handshake(hyper::Error),
    /// The request could not be sent or the response head not read.
    #[error("HTTP: {0}")]
    Http(hyper::Error),
    /// Connecting and reading the response head took longer than the timeout.
    #[error("{authority} did not answer in time")]
    Timeout {
        /// `host:port` of the relay.
        authority: String,
    },
    /// No part of the body arrived within the timeout.
    #[error("the response stalled")]
    Stalled,
    /// The body broke off.
    #[error("the response failed: {0}")]
    Body(hyper::Error),
    /// The body is larger than the caller accepts.
    #[error("the response exceeds {max} bytes")]
    TooLarge {
        /// The caller's limit, in bytes.
        max: usize,
    },
}

/// Why the relay's address or TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The relay URL does not parse.
    #[error("relay URL {url:?}: {source}")]
    Url {
        /// The URL as given.
        url: String,
        /// The parser's error.
        source: hyper::http::uri::InvalidUri,
    },
    /// The relay URL is not `http://` or `https://` with a host.
    #[error("relay URL {url:?}: {reason}")]
    UrlForm {
        /// The URL as given.
        url: String,
        /// What is missing.
        reason: &'static str,
    },
    /// A TLS root file could not be read.
    #[error("{path}: {source}")]
    RootFile {
        /// The file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// A TLS root file holds a malformed PEM section.
    #[error("{path}: {source}")]
    RootPem {
        /// The file.
        path: PathBuf,
        /// The PEM parser's error.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate in a TLS root file cannot be a root.
    #[error("{path}: {source}")]
    Root {
        /// The file.
        path: PathBuf,
        /// Why rustls refused it.
        source: rustls::Error,
    },
    /// A TLS root file holds no certificate.
    #[error("{path}: no certificate")]
    NoRoot {
        /// The file.
        path: PathBuf,
    },
    /// The TLS provider supports none of the safe protocol versions.
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    /// The relay's host is not a valid TLS server name.
    #[error("TLS server name: {0}")]
    ServerName(rustls::pki_types::InvalidDnsNameError),
    /// A request could not be built (a header value the caller gave is not valid HTTP).
    #[error("request: {0}")]
    Request(hyper::http::Error),
}

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
                .map_err(|_| TransportError::Stalled)?;
            match frame {
                None => {
                    self.body = None;
                    return Ok(None);
                }
                Some(Err(e)) => {
                    self.body = None;
                    return Err(TransportError::Body(e).into());
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
                return Err(TransportError::TooLarge { max }.into());
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
        let pem = std::fs::read(path).map_err(|source| ConfigError::RootFile {
            path: path.clone(),
            source,
        })?;
        use rustls::pki_types::pem::PemObject;
        let mut any = false;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|source| ConfigError::RootPem {
                path: path.clone(),
                source,
            })?;
            store.add(cert).map_err(|source| ConfigError::Root {
                path: path.clone(),
                source,
            })?;
            any = true;
        }
        if !any {
            return Err(ConfigError::NoRoot { path: path.clone() }.into());
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ConfigError::Tls)?
        .with_root_certificates(store)
        .with_no_client_auth())
}

impl Transport {
    /// Parses `url` (`http://host[:port][/prefix]` or `https://…`).
    pub fn new(url: &str, tls_roots: &[PathBuf], timeout: Duration) -> Result<Self, ClientError> {
        let uri: hyper::Uri = url.parse().map_err(|source| ConfigError::Url {
            url: url.to_owned(),
            source,
        })?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => Some(tokio_rustls::TlsConnector::from(Arc::new(tls_config(
                tls_roots,
            )?))),
            _ => {
                return Err(ConfigError::UrlForm {
                    url: url.to_owned(),
                    reason: "the scheme must be http or https",
                }
                .into())
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| ConfigError::UrlForm {
                url: url.to_owned(),
                reason: "no host",
            })?
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
                .map_err(|source| TransportError::Connect {
                    authority: self.authority.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let response = match &self.tls {
                None => send(TokioIo::new(tcp), req).await?,
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                        .map_err(ConfigError::ServerName)?;
                    let stream = tls.connect(name, tcp).await.map_err(TransportError::Tls)?;
                    send(TokioIo::new(stream), req).await?
                }
            };
            Ok::<_, ClientError>(response)
        };
        let response = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| TransportError::Timeout {
                authority: self.authority.clone(),
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
            .map_err(ConfigError::Request)?;
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
            .map_err(ConfigError::Request)?;
        self.exchange(req).await
    }
}

async fn send<I>(io: I, req: Request<Full<Bytes>>) -> Result<hyper::Response<Incoming>, ClientError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(TransportError::Handshake)?;
    // The connection task ends when the response body is done or dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| TransportError::Http(e).into())
}
