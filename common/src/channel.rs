//! Chunked Oblivious HTTP to the enclave's attested key: RFC 9458 key configurations and HPKE
//! (RFC 9180) encapsulation, in the chunked form of draft-ietf-ohai-chunked-ohttp, with the
//! `ohttp` crate (pure-Rust HPKE backend).
//!
//! - The enclave generates a [`GatewayKey`] at boot: X25519 with HKDF-SHA256, and AES-128-GCM or
//!   ChaCha20-Poly1305, under a random key id. Its encoded configuration is the `public_key` of
//!   every attestation document for clients, and the private key never leaves the enclave.
//! - A request arrives whole (the enclave bounds its size) and [`GatewayKey::decapsulate`] opens
//!   it. The answer is sealed chunk by chunk as it is produced ([`ResponseSealer`]), each chunk
//!   authenticated, the last one marked final, so the client detects reordering, tampering and
//!   truncation (draft-ietf-ohai-chunked-ohttp §6: a stream that ends without its final chunk
//!   is an error).
//! - The client encapsulates to the attested configuration ([`encapsulate`]) and opens the
//!   response incrementally ([`ResponseOpener`]).
//!
//! The `ohttp` crate's streams are `futures` readers and writers; here they run over memory
//! buffers and are polled to completion at once, so this module has no I/O and no runtime.

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Cursor};
use futures::FutureExt;
use ohttp::hpke::{Aead, Kdf, Kem};
use ohttp::{KeyConfig, SymmetricSuite};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use zeroize::Zeroizing;

pub use crate::media::{REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE};
/// Largest plaintext the `ohttp` crate puts in one chunk.
pub const MAX_CHUNK: usize = 1 << 14;

/// The gateway's KEM, as RFC 9180 §7.1 names it (the enclave's attested configuration says
/// it; [`GatewayKey`] uses it).
pub const KEM_NAME: &str = "DHKEM(X25519, HKDF-SHA256)";
const KEM: Kem = Kem::X25519Sha256;

/// The suites the gateway offers, most preferred first (the client takes the first), with
/// their RFC 9180 §7.2–7.3 names: one list, so the attested configuration cannot name other
/// suites than the gateway offers.
const SUITES: [(Kdf, Aead, &str); 2] = [
    (Kdf::HkdfSha256, Aead::Aes128Gcm, "HKDF-SHA256/AES-128-GCM"),
    (
        Kdf::HkdfSha256,
        Aead::ChaCha20Poly1305,
        "HKDF-SHA256/ChaCha20Poly1305",
    ),
];

fn suites() -> Vec<SymmetricSuite> {
    SUITES
        .iter()
        .map(|&(kdf, aead, _)| SymmetricSuite::new(kdf, aead))
        .collect()
}

/// The names of the suites the gateway offers, most preferred first.
pub fn suite_names() -> Vec<&'static str> {
    SUITES.iter().map(|&(_, _, name)| name).collect()
}

/// Why an encapsulated message was refused. The kinds carry no content.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The request is for another key id or an unsupported suite: the client holds a stale
    /// configuration (RFC 9458 §5.3 answers this with 422 and the `ohttp-key` problem type).
    #[error("the request is not for this gateway's key configuration")]
    KeyMismatch,
    /// The message does not decrypt or authenticate, or its chunks are malformed or
    /// reordered (the `ohttp` crate's error, inside the stream's I/O error).
    #[error("the encapsulated message does not authenticate: {0}")]
    Decrypt(#[source] std::io::Error),
    /// The message ended before its final chunk (RFC 9458's chunked form marks the last one,
    /// so a truncation is detected, not taken for the whole).
    #[error("the encapsulated message ended before its final chunk")]
    Truncated,
    /// A key configuration that cannot be used.
    #[error("invalid OHTTP key configuration: {0}")]
    Config(#[source] ohttp::Error),
    /// The response is larger than the caller allows.
    #[error("the response exceeds {0} bytes")]
    TooLarge(usize),
    /// An internal failure of the HPKE implementation.
    #[error("HPKE: {0}")]
    Internal(#[source] ohttp::Error),
    /// Sealing failed in the stream that writes the chunks.
    #[error("sealing: {0}")]
    Seal(#[source] std::io::Error),
    /// The system's random generator failed.
    #[error("the random generator failed")]
    Rng,
    /// An in-memory stream did not complete in one poll (it always does: a bug if seen).
    #[error("an in-memory OHTTP stream did not complete")]
    Incomplete,
}

impl ChannelError {
    /// The HTTP status a gateway answers with (RFC 9458 §5.2, §5.3).
    pub fn status(&self) -> u16 {
        match self {
            Self::KeyMismatch => 422,
            Self::Internal(_) | Self::Seal(_) | Self::Rng | Self::Incomplete => 500,
            _ => 400,
        }
    }

    fn from_io(e: std::io::Error) -> Self {
        match e.get_ref().and_then(|i| i.downcast_ref::<ohttp::Error>()) {
            Some(ohttp::Error::KeyId | ohttp::Error::Unsupported | ohttp::Error::InvalidKem) => {
                Self::KeyMismatch
            }
            _ => Self::Decrypt(e),
        }
    }
}

/// A buffer a sealing stream writes into and the caller drains.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Sink {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl AsyncWrite for Sink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Bytes that arrive over time for an opening stream: reads return what is there, `Pending`
/// when nothing is there yet, and end of stream once the caller says so.
#[derive(Clone, Default)]
struct Feed(Arc<Mutex<FeedState>>);

#[derive(Default)]
struct FeedState {
    buf: Vec<u8>,
    pos: usize,
    closed: bool,
}

impl Feed {
    fn push(&self, bytes: &[u8]) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.pos == s.buf.len() {
            s.buf.clear();
            s.pos = 0;
        }
        s.buf.extend_from_slice(bytes);
    }
    fn close(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
    }
}

impl AsyncRead for Feed {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let available = s.buf.get(s.pos..).unwrap_or_default();
        if available.is_empty() {
            // The opener is polled again by `push`/`finish`, not by a waker.
            return if s.closed {
                Poll::Ready(Ok(0))
            } else {
                Poll::Pending
            };
        }
        let n = available.len().min(out.len());
        if let (Some(dst), Some(src)) = (out.get_mut(..n), available.get(..n)) {
            dst.copy_from_slice(src);
        }
        s.pos += n;
        Poll::Ready(Ok(n))
    }
}

/// The enclave's OHTTP key pair and its encoded configuration.
pub struct GatewayKey {
    config: KeyConfig,
    encoded: Vec<u8>,
    key_id: u8,
}

impl std::fmt::Debug for GatewayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl GatewayKey {
    /// A fresh X25519 key under a random key id.
    pub fn generate() -> Result<Self, ChannelError> {
        let mut id = [0u8; 1];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| ChannelError::Rng)?;
        Self::generate_with_id(id[0])
    }

    /// A fresh X25519 key under `key_id`.
    pub fn generate_with_id(key_id: u8) -> Result<Self, ChannelError> {
        let config = KeyConfig::new(key_id, KEM, suites()).map_err(ChannelError::Internal)?;
        let encoded = config.encode().map_err(ChannelError::Internal)?;
        Ok(Self {
            config,
            encoded,
            key_id,
        })
    }

    /// The key id.
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// The encoded key configuration (RFC 9458 §3): what attestation documents carry.
    pub fn encoded_config(&self) -> &[u8] {
        &self.encoded
    }

    /// Opens a whole chunked request and prepares the sealer of its response.
    pub fn decapsulate(
        &self,
        body: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, ResponseSealer), ChannelError> {
        let server = ohttp::Server::new(self.config.clone()).map_err(ChannelError::Internal)?;
        let mut request = server.decapsulate_stream(Cursor::new(body));
        let mut plain = Zeroizing::new(Vec::with_capacity(body.len()));
        // The source is in memory: the read completes on its first poll.
        match request.read_to_end(&mut plain).now_or_never() {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(ChannelError::from_io(e)),
            None => return Err(ChannelError::Incomplete),
        }
        let sink = Sink::default();
        let writer = request
            .response(sink.clone())
            .map_err(ChannelError::Internal)?;
        Ok((
            plain,
            ResponseSealer {
                writer: Box::pin(writer),
                sink,
            },
        ))
    }
}

/// Seals one response, chunk by chunk.
pub struct ResponseSealer {
    writer: Pin<Box<dyn AsyncWrite + Send>>,
    sink: Sink,
}

impl std::fmt::Debug for ResponseSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseSealer").finish_non_exhaustive()
    }
}

impl ResponseSealer {
    /// Seals `data` (in chunks of at most [`MAX_CHUNK`]) and returns the bytes to send; the
    /// first call's bytes begin with the response nonce.
    pub fn seal(&mut self, data: &[u8]) -> Result<Vec<u8>, ChannelError> {
        if !data.is_empty() {
            match self.writer.write_all(data).now_or_never() {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(ChannelError::Seal(e)),
                None => return Err(ChannelError::Incomplete),
            }
        }
        Ok(self.sink.take())
    }

    /// Seals the final chunk (`data`, possibly empty): the response is complete.
    pub fn finish(mut self, data: &[u8]) -> Result<Vec<u8>, ChannelError> {
        let mut out = self.seal(data)?;
        match self.writer.close().now_or_never() {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(ChannelError::Seal(e)),
            None => return Err(ChannelError::Incomplete),
        }
        out.extend_from_slice(&self.sink.take());
        Ok(out)
    }
}

/// Encapsulates a whole request to the encoded key configuration `key_config` (as attested).
/// Returns the chunked-OHTTP request body and the opener of its response.
pub fn encapsulate(
    key_config: &[u8],
    request: &[u8],
) -> Result<(Vec<u8>, ResponseOpener), ChannelError> {
    let client =
        ohttp::ClientRequest::from_encoded_config(key_config).map_err(ChannelError::Config)?;
    let sink = Sink::default();
    let mut writer = client
        .encapsulate_stream(sink.clone())
        .map_err(ChannelError::Internal)?;
    let written = async {
        writer.write_all(request).await?;
        writer.close().await
    }
    .now_or_never();
    match written {
        Some(Ok(())) => {}
        Some(Err(e)) => return Err(ChannelError::Seal(e)),
        None => return Err(ChannelError::Incomplete),
    }
    let feed = Feed::default();
    let reader = writer
        .response(feed.clone())
        .map_err(ChannelError::Internal)?;
    Ok((
        sink.take(),
        ResponseOpener {
            reader: Box::pin(reader),
            feed,
            total: 0,
            done: false,
        },
    ))
}

/// Opens a chunked response as its bytes arrive.
pub struct ResponseOpener {
    reader: Pin<Box<dyn AsyncRead + Send>>,
    feed: Feed,
    total: usize,
    done: bool,
}

impl std::fmt::Debug for ResponseOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseOpener")
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl ResponseOpener {
    /// Takes the next bytes of the encapsulated response; returns the plaintext they complete.
    /// `max_total` bounds the whole response's plaintext.
    pub fn push(&mut self, bytes: &[u8], max_total: usize) -> Result<Vec<u8>, ChannelError> {
        self.feed.push(bytes);
        self.drain(max_total)
    }

    /// The stream has ended: returns the last plaintext, or an error if the final chunk is
    /// missing or does not authenticate (truncation).
    pub fn finish(&mut self, max_total: usize) -> Result<Vec<u8>, ChannelError> {
        self.feed.close();
        let out = self.drain(max_total)?;
        if !self.done {
            return Err(ChannelError::Truncated);
        }
        Ok(out)
    }

    fn drain(&mut self, max_total: usize) -> Result<Vec<u8>, ChannelError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_CHUNK + 64];
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while !self.done {
            match self.reader.as_mut().poll_read(&mut cx, &mut buf) {
                Poll::Pending => break,
                Poll::Ready(Ok(0)) => self.done = true,
                Poll::Ready(Ok(n)) => {
                    self.total += n;
                    if self.total > max_total {
                        return Err(ChannelError::TooLarge(max_total));
                    }
                    out.extend_from_slice(buf.get(..n).unwrap_or_default());
                }
                Poll::Ready(Err(e)) => return Err(ChannelError::from_io(e)),
            }
        }
        Ok(out)
    }
}

/// Parses an encoded key configuration: its key id, and whether its KEM and suites are the
/// ones this gateway uses.
pub fn key_config_id(key_config: &[u8]) -> Result<u8, ChannelError> {
    // The key id is the first byte (RFC 9458 §3.1); decoding checks the rest.
    KeyConfig::decode(key_config).map_err(ChannelError::Config)?;
    key_config
        .first()
        .copied()
        .ok_or(ChannelError::Config(ohttp::Error::Truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    fn exchange(key: &GatewayKey, request: &[u8], chunks: &[&[u8]]) -> (Vec<u8>, Vec<u8>) {
        let (body, mut opener) = encapsulate(key.encoded_config(), request).unwrap();
        let (plain, mut sealer) = key.decapsulate(&body).unwrap();
        assert_eq!(&plain[..], request);
        let mut wire = Vec::new();
        for c in chunks {
            wire.extend(sealer.seal(c).unwrap());
        }
        wire.extend(sealer.finish(b"").unwrap());
        let mut got = opener.push(&wire, LIMIT).unwrap();
        got.extend(opener.finish(LIMIT).unwrap());
        (got, wire)
    }

    #[test]
    fn round_trip_streams_chunks() {
        let key = GatewayKey::generate().unwrap();
        let big = vec![7u8; 40_000];
        let (got, _) = exchange(&key, b"hello enclave", &[b"one ", b"two", &big]);
        let mut want = b"one two".to_vec();
        want.extend_from_slice(&big);
        assert_eq!(got, want);
    }

    #[test]
    fn response_opens_byte_by_byte_as_it_arrives() {
        let key = GatewayKey::generate().unwrap();
        let (body, mut opener) = encapsulate(key.encoded_config(), b"q").unwrap();
        let (_, mut sealer) = key.decapsulate(&body).unwrap();
        let first = sealer.seal(b"token").unwrap();
        let mut got = Vec::new();
        for b in &first {
            got.extend(opener.push(std::slice::from_ref(b), LIMIT).unwrap());
        }
        // A non-final chunk is delivered as soon as it is complete.
        assert_eq!(got, b"token");
        let last = sealer.finish(b"").unwrap();
        assert!(opener.push(&last, LIMIT).unwrap().is_empty());
        assert!(opener.finish(LIMIT).unwrap().is_empty());
    }

    #[test]
    fn another_key_is_refused() {
        let key = GatewayKey::generate_with_id(1).unwrap();
        let other = GatewayKey::generate_with_id(2).unwrap();
        let same_id = GatewayKey::generate_with_id(1).unwrap();
        let (body, _) = encapsulate(other.encoded_config(), b"q").unwrap();
        let e = key.decapsulate(&body).unwrap_err();
        assert!(matches!(e, ChannelError::KeyMismatch), "{e}");
        assert_eq!(e.status(), 422);
        let (body, _) = encapsulate(same_id.encoded_config(), b"q").unwrap();
        let e = key.decapsulate(&body).unwrap_err();
        assert!(matches!(e, ChannelError::Decrypt(_)), "{e}");
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn tampered_truncated_or_extended_requests_are_refused() {
        let key = GatewayKey::generate().unwrap();
        let (body, _) = encapsulate(key.encoded_config(), &[1u8; 100]).unwrap();
        for i in 0..body.len() {
            let mut t = body.clone();
            t[i] ^= 0x80;
            assert!(key.decapsulate(&t).is_err(), "flip at {i}");
        }
        for cut in 0..body.len() {
            assert!(key.decapsulate(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = body.clone();
        longer.push(0);
        assert!(key.decapsulate(&longer).is_err());
    }

    #[test]
    fn tampered_reordered_or_truncated_responses_fail() {
        let key = GatewayKey::generate().unwrap();
        let seal_all = |opener_body: &[u8]| {
            let (_, mut sealer) = key.decapsulate(opener_body).unwrap();
            let a = sealer.seal(b"first").unwrap();
            let b = sealer.seal(b"second").unwrap();
            let c = sealer.finish(b"").unwrap();
            (a, b, c)
        };
        // Each case gets a fresh exchange (the opener is bound to its request).
        let run = |mutate: &dyn Fn(Vec<u8>, Vec<u8>, Vec<u8>) -> Vec<u8>| {
            let (body, mut opener) = encapsulate(key.encoded_config(), b"q").unwrap();
            let (a, b, c) = seal_all(&body);
            let wire = mutate(a, b, c);
            let mut got = opener.push(&wire, LIMIT)?;
            got.extend(opener.finish(LIMIT)?);
            Ok::<_, ChannelError>(got)
        };
        assert_eq!(run(&|a, b, c| [a, b, c].concat()).unwrap(), b"firstsecond");
        // Truncated: no final chunk.
        assert!(run(&|a, b, _| [a, b].concat()).is_err());
        // Reordered chunks (the nonce stays first).
        assert!(run(&|a, b, c| {
            let nonce = 16;
            let (n, first) = a.split_at(nonce);
            [n.to_vec(), b, first.to_vec(), c].concat()
        })
        .is_err());
        // Any flipped bit.
        let len = {
            let (body, _) = encapsulate(key.encoded_config(), b"q").unwrap();
            let (a, b, c) = seal_all(&body);
            a.len() + b.len() + c.len()
        };
        for i in 0..len {
            let flipped = run(&|a, b, c| {
                let mut w = [a, b, c].concat();
                w[i] ^= 1;
                w
            });
            assert!(flipped.is_err(), "flip at {i}");
        }
        // Data after the final chunk.
        assert!(run(&|a, b, c| [a, b, c, vec![0]].concat()).is_err());
    }

    #[test]
    fn response_size_is_bounded() {
        let key = GatewayKey::generate().unwrap();
        let (body, mut opener) = encapsulate(key.encoded_config(), b"q").unwrap();
        let (_, mut sealer) = key.decapsulate(&body).unwrap();
        let wire = sealer.seal(&[0u8; 1000]).unwrap();
        assert!(matches!(
            opener.push(&wire, 999),
            Err(ChannelError::TooLarge(999))
        ));
    }

    #[test]
    fn key_config_is_rfc9458() {
        let key = GatewayKey::generate_with_id(9).unwrap();
        let c = key.encoded_config();
        // key id, KEM 0x0020 (X25519), 32-byte key, suites length 8, two suites.
        assert_eq!(c[0], 9);
        assert_eq!(&c[1..3], &[0x00, 0x20]);
        assert_eq!(c.len(), 1 + 2 + 32 + 2 + 8);
        assert_eq!(&c[35..37], &[0, 8]);
        assert_eq!(&c[37..], &[0, 1, 0, 1, 0, 1, 0, 3]);
        assert_eq!(key_config_id(c).unwrap(), 9);
        assert!(key_config_id(&c[..10]).is_err());
    }
}
