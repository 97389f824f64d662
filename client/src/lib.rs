//! The client: verifies the enclave's attestation, then talks to it end to end through the
//! untrusted relay (DESIGN.md §4.3-4.4); also a local OpenAI-compatible proxy ([`proxy`]).
//!
//! [`Client::send`] takes a binary HTTP request for the enclave (RFC 9292), and:
//! 1. uses the cached verified key, or attests afresh: a random 32-byte nonce to
//!    `GET /v1/attestation`, then [`attest::verify`] against the [`policy`];
//! 2. encapsulates the request to that key (chunked OHTTP) and posts it to `/v1/ohttp`;
//! 3. opens the response chunk by chunk as it arrives ([`Response::chunk`]): the relay cannot
//!    read, alter, reorder or truncate it without the client noticing.
//!
//! Nothing is sent before a document verifies. The verified key is cached for a bounded time
//! (`ClientConfig::attestation_ttl`). When the gateway refuses the encapsulation (its key
//! changed: the enclave restarted), the client re-attests once and retries only if the new
//! verified key differs; otherwise the error is final.

#![forbid(unsafe_code)]

pub mod attest;
pub mod policy;
pub mod proxy;
mod transport;

use attest::{AttestError, Attested};
use attestation_verifier::UnixTime;
use common::bhttp::{self, BhttpError, Field, ResponseDecoder, ResponsePart};
use common::channel::{self, ChannelError, ResponseOpener};
use common::relay::{RelayErrorBody, RelayErrorCode};
use policy::ClientPolicy;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use transport::{ConfigError, Transport, TransportError};

/// Largest response plaintext accepted, in bytes.
pub const DEFAULT_MAX_RESPONSE: usize = 64 << 20;
/// Largest attestation document accepted from the relay, in bytes.
const MAX_DOCUMENT: usize = attestation_verifier::MAX_DOCUMENT_SIZE;

/// Everything that can go wrong. Messages never contain prompt or answer text.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The relay could not be reached or broke HTTP.
    #[error("relay: {0}")]
    Transport(#[from] TransportError),
    /// The relay answered with an error status.
    #[error("relay answered {status}: {message}")]
    Relay {
        /// HTTP status.
        status: u16,
        /// The relay's error message.
        message: String,
    },
    /// The attestation did not verify: nothing was sent.
    #[error(transparent)]
    Attestation(#[from] AttestError),
    /// The encrypted channel failed (tampering, truncation, a stale key).
    #[error("encrypted channel: {0}")]
    Channel(#[from] ChannelError),
    /// The decrypted response is not valid binary HTTP.
    #[error("enclave response: {0}")]
    Message(#[from] BhttpError),
    /// The gateway refused our key twice: even a fresh attestation's key is not accepted.
    #[error("the enclave refused the attested key again after re-attesting: {0}")]
    KeyRefused(KeyRefusal),
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The system's random number generator failed (no nonce can be drawn).
    #[error("the system RNG failed")]
    Rng,
}

/// How the enclave refused a key it had just attested.
#[derive(Debug, thiserror::Error)]
pub enum KeyRefusal {
    /// A fresh attestation returned the key the gateway had refused.
    #[error("the enclave still attests the key it refuses")]
    SameKey,
    /// The gateway refused the freshly attested key too.
    #[error("relay answered {status}: {message}")]
    Refused {
        /// HTTP status of the refusal.
        status: u16,
        /// The relay's message, without control characters.
        message: String,
    },
}

/// How to reach the enclave and what to accept.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The relay's base URL, `http://host:port` or `https://host:port`.
    pub url: String,
    /// What the enclave must prove.
    pub policy: ClientPolicy,
    /// How long a verified key is reused before attesting again.
    pub attestation_ttl: Duration,
    /// Extra PEM roots for the relay's TLS certificate (beyond the system's).
    pub tls_roots: Vec<std::path::PathBuf>,
    /// Time allowed for the relay to connect and answer headers.
    pub timeout: Duration,
    /// Largest response plaintext.
    pub max_response: usize,
}

impl ClientConfig {
    /// Defaults for `url` and `policy`: keys reused for 60 s, 30 s timeout.
    pub fn new(url: impl Into<String>, policy: ClientPolicy) -> Self {
        Self {
            url: url.into(),
            policy,
            attestation_ttl: Duration::from_secs(60),
            tls_roots: Vec::new(),
            timeout: Duration::from_secs(30),
            max_response: DEFAULT_MAX_RESPONSE,
        }
    }
}

struct Cached {
    attested: Arc<Attested>,
    at: Instant,
}

/// A client of one enclave (through its relay).
pub struct Client {
    cfg: ClientConfig,
    transport: Transport,
    cache: Mutex<Option<Cached>>,
    attestations: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.cfg.url)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `cfg`; nothing is contacted yet.
    pub fn new(cfg: ClientConfig) -> Result<Self, ClientError> {
        let transport = Transport::new(&cfg.url, &cfg.tls_roots, cfg.timeout)?;
        Ok(Self {
            cfg,
            transport,
            cache: Mutex::new(None),
            attestations: Default::default(),
        })
    }

    /// How many attestation documents this client has fetched.
    pub fn attestation_count(&self) -> u64 {
        self.attestations.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Attests afresh: a new nonce, a new document, full verification. The result is cached.
    pub async fn attest(&self) -> Result<Arc<Attested>, ClientError> {
        let mut nonce = [0u8; 32];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| ClientError::Rng)?;
        let path = format!("/v1/attestation?nonce={}", hex::encode(nonce));
        self.attestations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (status, body) = self.transport.get(&path, MAX_DOCUMENT).await?;
        if status != 200 {
            return Err(relay_error(status, &body));
        }
        let attested = Arc::new(attest::verify(
            &body,
            &self.cfg.policy,
            &nonce,
            UnixTime::now(),
        )?);
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(Cached {
            attested: attested.clone(),
            at: Instant::now(),
        });
        Ok(attested)
    }

    /// The cached verified key while it is fresh, else a new attestation.
    pub async fn attested(&self) -> Result<Arc<Attested>, ClientError> {
        let fresh = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .as_ref()
                .filter(|c| c.at.elapsed() < self.cfg.attestation_ttl)
                .map(|c| c.attested.clone())
        };
        match fresh {
            Some(a) => Ok(a),
            None => self.attest().await,
        }
    }

    fn forget(&self, key_config: &[u8]) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache
            .as_ref()
            .is_some_and(|c| c.attested.key_config == key_config)
        {
            *cache = None;
        }
    }

    /// Sends `request` to the enclave over the attested channel and returns the response once
    /// its head has arrived; its content follows with [`Response::chunk`].
    pub async fn send(&self, request: &bhttp::Request) -> Result<Response, ClientError> {
        // The date inside the encrypted request lets the enclave refuse replays (RFC 9458
        // §6.5); a caller's own Date header is kept.
        let plain = if request.header("date").is_some() {
            zeroize::Zeroizing::new(request.encode())
        } else {
            let mut dated = request.clone().with_header(
                "date",
                httpdate::fmt_http_date(std::time::SystemTime::now()),
            );
            let plain = zeroize::Zeroizing::new(dated.encode());
            zeroize::Zeroize::zeroize(&mut dated.body);
            plain
        };
        let mut previous: Option<Arc<Attested>> = None;
        loop {
            let attested = match &previous {
                None => self.attested().await?,
                Some(old) => {
                    let new = self.attest().await?;
                    if new.key_config == old.key_config {
                        return Err(ClientError::KeyRefused(KeyRefusal::SameKey));
                    }
                    new
                }
            };
            let (body, opener) = channel::encapsulate(&attested.key_config, &plain)?;
            let mut http = self
                .transport
                .post(
                    "/v1/ohttp",
                    channel::REQUEST_MEDIA_TYPE,
                    body,
                    &[("accept", channel::RESPONSE_MEDIA_TYPE)],
                )
                .await?;
            if http.status == 200 {
                let mut response = Response {
                    status: 0,
                    headers: Vec::new(),
                    http,
                    opener,
                    decoder: ResponseDecoder::new(),
                    queued: VecDeque::new(),
                    ended: false,
                    complete: false,
                    max: self.cfg.max_response,
                };
                response.read_head().await?;
                return Ok(response);
            }
            let body = http.read_all(64 << 10).await.unwrap_or_default();
            let key_refused = http.status == 422
                || (http.status == 400
                    && RelayErrorBody::parse(&body).map(|r| r.error.code)
                        == Some(RelayErrorCode::EnclaveRefused));
            if key_refused && previous.is_none() {
                // The enclave restarted with a new key (or the relay says so): re-attest once.
                self.forget(&attested.key_config);
                previous = Some(attested);
                continue;
            }
            if key_refused {
                return Err(ClientError::KeyRefused(KeyRefusal::Refused {
                    status: http.status,
                    message: relay_message(&body),
                }));
            }
            return Err(relay_error(http.status, &body));
        }
    }
}

fn relay_error(status: u16, body: &[u8]) -> ClientError {
    ClientError::Relay {
        status,
        message: relay_message(body),
    }
}

/// The relay's error message from its JSON body. The relay's text reaches the user's terminal
/// and logs: no control characters (a terminal escape or a line break is the relay's to forge
/// otherwise), and bounded.
fn relay_message(body: &[u8]) -> String {
    let message =
        RelayErrorBody::parse(body).map_or_else(|| "no error message".into(), |b| b.error.message);
    message
        .chars()
        .filter(|c| !c.is_control())
        .take(512)
        .collect()
}

/// The enclave's response, opened as it arrives.
pub struct Response {
    /// The enclave's status code (inside the channel: the relay never sees it).
    pub status: u16,
    /// The enclave's header fields.
    pub headers: Vec<Field>,
    http: transport::HttpResponse,
    opener: ResponseOpener,
    decoder: ResponseDecoder,
    queued: VecDeque<Vec<u8>>,
    ended: bool,
    complete: bool,
    max: usize,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Response {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    async fn read_head(&mut self) -> Result<(), ClientError> {
        while self.status == 0 {
            if !self.pull().await? {
                return Err(ChannelError::Truncated.into());
            }
        }
        Ok(())
    }

    /// Reads more of the encapsulated body and decodes what it completes. False at the end.
    async fn pull(&mut self) -> Result<bool, ClientError> {
        let (plain, more) = match self.http.next_bytes().await? {
            Some(bytes) => (self.opener.push(&bytes, self.max)?, true),
            None => (self.opener.finish(self.max)?, false),
        };
        for part in self.decoder.push(&plain)? {
            match part {
                ResponsePart::Head(h) => {
                    self.status = h.status;
                    self.headers = h.headers;
                }
                ResponsePart::Data(d) => self.queued.push_back(d),
                ResponsePart::End => self.ended = true,
            }
        }
        if !more && !self.ended {
            return Err(BhttpError::Truncated.into());
        }
        Ok(more)
    }

    /// The next piece of content, authenticated; `None` once the response is complete.
    pub async fn chunk(&mut self) -> Option<Result<Vec<u8>, ClientError>> {
        loop {
            if let Some(d) = self.queued.pop_front() {
                return Some(Ok(d));
            }
            if self.complete {
                return None;
            }
            if self.ended && self.decoder.is_done() {
                // Drain to the authenticated end of the stream: trailing data is an error.
                self.complete = true;
                return match self.pull_to_end().await {
                    Ok(()) => None,
                    Err(e) => Some(Err(e)),
                };
            }
            if let Err(e) = self.pull().await {
                self.complete = true;
                return Some(Err(e));
            }
        }
    }

    async fn pull_to_end(&mut self) -> Result<(), ClientError> {
        while self.pull().await? {
            if !self.queued.is_empty() {
                return Err(BhttpError::AfterEnd.into());
            }
        }
        Ok(())
    }

    /// The whole content.
    pub async fn bytes(mut self) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        while let Some(c) = self.chunk().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relays_error_text_loses_its_control_characters_and_is_bounded() {
        let body = serde_json::json!({"error": {
            "message": format!("busy\u{1b}]0;pwned\u{7}\r\nfake line{}", "x".repeat(600))
        }});
        let e = relay_error(503, body.to_string().as_bytes());
        let ClientError::Relay { status, message } = e else {
            panic!("not a relay error: {e:?}");
        };
        assert_eq!(status, 503);
        assert!(message.starts_with("busy]0;pwnedfake line"), "{message}");
        assert!(!message.chars().any(char::is_control));
        assert_eq!(message.chars().count(), 512);
        let e = relay_error(502, b"<html>");
        assert!(matches!(e, ClientError::Relay { message, .. } if message == "no error message"));
    }
}
