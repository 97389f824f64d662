//! Host↔enclave framing and messages (DESIGN.md §3). Everything the enclave reads here comes
//! from the untrusted host, so the codec bounds every size before allocating and refuses
//! unknown types, short payloads and trailing bytes.
//!
//! ```text
//! preface = "NEWIRE" | version u8 (1) | 0x00           sent once by each side on connect
//! frame   = type u8 | length u32 BE | payload[length]   length ≤ the decoder's maximum
//! ```
//! A message whose only field is bytes (header, chunk, attestation, envelope) carries them as
//! the whole payload, so a receiver takes the buffer it read without copying. Other payloads
//! are fields of `bytes` = u32 BE length + bytes, or `text` = bytes holding UTF-8.
//!
//! No I/O here: [`read_frame`]/[`write_frame`] in the `tokio` feature do the socket side.

use std::fmt;

/// Connection preface: magic, version, reserved.
pub const PREFACE: [u8; 8] = *b"NEWIRE\x01\x00";
/// Frame header length: type (1) + length (4).
pub const HEADER_LEN: usize = 5;
/// Largest payload by default: a 1 MiB sealed chunk and its tag fit with room to spare.
pub const DEFAULT_MAX_PAYLOAD: usize = 4 << 20;
/// The largest client request body each hop takes unless configured otherwise: the client's
/// proxy (plaintext), the relay and the enclave (encapsulated, in `RequestData` frames). One
/// figure, so the hops agree.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 1 << 20;
/// Longest human-readable reason carried in a frame.
pub const MAX_REASON: usize = 1024;

/// Longest nonce an attestation request may carry (the NSM accepts up to 512 bytes; clients
/// need 32).
pub const MAX_NONCE: usize = 64;
/// Longest event record (a JSON object) the enclave may send.
pub const MAX_EVENT: usize = 16 << 10;

/// Message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// host → enclave: the sealed model's header.
    SealedHeader = 0x01,
    /// enclave → host: an attestation document for KMS `Recipient`.
    KeyReleaseRequest = 0x02,
    /// host → enclave: KMS's `CiphertextForRecipient`.
    KeyReleaseResponse = 0x03,
    /// host → enclave: KMS refused; the error name.
    KeyReleaseFailed = 0x04,
    /// host → enclave: one sealed chunk.
    Chunk = 0x05,
    /// enclave → host: the model is unsealed and verified.
    Ready = 0x06,
    /// enclave → host: provisioning failed, and why.
    Failed = 0x07,
    /// host → enclave: opens a control connection; asks what state the enclave is in.
    StatusRequest = 0x08,
    /// enclave → host: the answer.
    Status = 0x09,
    /// host → enclave: liveness probe on the control connection.
    Ping = 0x0a,
    /// enclave → host: the answer, echoing the probe's number.
    Pong = 0x0b,
    /// host → enclave: opens a serving connection for one attestation document.
    AttestationRequest = 0x10,
    /// enclave → host: the COSE_Sign1 document.
    AttestationResponse = 0x11,
    /// host → enclave: opens (or continues) a serving connection for one opaque request.
    RequestData = 0x12,
    /// host → enclave: the request body is complete.
    RequestEnd = 0x13,
    /// enclave → host: part of the opaque response.
    ResponseData = 0x14,
    /// enclave → host: the response is complete.
    ResponseEnd = 0x15,
    /// either way: the stream failed at the transport level (never content).
    StreamError = 0x16,
    /// host → enclave: the client went away; stop the work.
    Cancel = 0x17,
    /// host → enclave: a signed API key list (`common::apikeys`), on the control connection.
    ApiKeys = 0x18,
    /// enclave → host: the list was verified and is in force; its serial.
    ApiKeysLoaded = 0x19,
    /// enclave → host: a content-free log or audit record.
    Event = 0x20,
}

/// How a message type's payload is laid out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// The whole payload is one byte string, taken without a copy.
    Raw,
    /// No payload.
    Empty,
    /// Length-prefixed fields.
    Fields,
}

impl MessageType {
    const ALL: [Self; 22] = [
        Self::SealedHeader,
        Self::KeyReleaseRequest,
        Self::KeyReleaseResponse,
        Self::KeyReleaseFailed,
        Self::Chunk,
        Self::Ready,
        Self::Failed,
        Self::StatusRequest,
        Self::Status,
        Self::Ping,
        Self::Pong,
        Self::AttestationRequest,
        Self::AttestationResponse,
        Self::RequestData,
        Self::RequestEnd,
        Self::ResponseData,
        Self::ResponseEnd,
        Self::StreamError,
        Self::Cancel,
        Self::ApiKeys,
        Self::ApiKeysLoaded,
        Self::Event,
    ];

    fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u8 == b)
    }

    fn layout(self) -> Layout {
        match self {
            Self::SealedHeader
            | Self::KeyReleaseRequest
            | Self::KeyReleaseResponse
            | Self::Chunk
            | Self::AttestationResponse
            | Self::RequestData
            | Self::ResponseData
            | Self::ApiKeys => Layout::Raw,
            Self::StatusRequest | Self::RequestEnd | Self::ResponseEnd | Self::Cancel => {
                Layout::Empty
            }
            Self::KeyReleaseFailed
            | Self::Ready
            | Self::Failed
            | Self::Status
            | Self::Ping
            | Self::Pong
            | Self::AttestationRequest
            | Self::StreamError
            | Self::ApiKeysLoaded
            | Self::Event => Layout::Fields,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::SealedHeader => "SealedHeader",
            Self::KeyReleaseRequest => "KeyReleaseRequest",
            Self::KeyReleaseResponse => "KeyReleaseResponse",
            Self::KeyReleaseFailed => "KeyReleaseFailed",
            Self::Chunk => "Chunk",
            Self::Ready => "Ready",
            Self::Failed => "Failed",
            Self::StatusRequest => "StatusRequest",
            Self::Status => "Status",
            Self::Ping => "Ping",
            Self::Pong => "Pong",
            Self::AttestationRequest => "AttestationRequest",
            Self::AttestationResponse => "AttestationResponse",
            Self::RequestData => "RequestData",
            Self::RequestEnd => "RequestEnd",
            Self::ResponseData => "ResponseData",
            Self::ResponseEnd => "ResponseEnd",
            Self::StreamError => "StreamError",
            Self::Cancel => "Cancel",
            Self::ApiKeys => "ApiKeys",
            Self::ApiKeysLoaded => "ApiKeysLoaded",
            Self::Event => "Event",
        }
    }
}

/// What an enclave is doing, as it tells a host that (re)connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnclaveState {
    /// No model yet: the host should provision one.
    AwaitingModel,
    /// Another connection is provisioning it.
    Provisioning,
    /// A model is loaded and serving.
    Ready {
        /// SHA-256 of the weights (PCR16's input).
        model_sha256: [u8; 32],
        /// The model's name.
        model_name: String,
    },
}

/// Kinds of [`Message::Event`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EventKind {
    /// An operational log line.
    Log = 1,
    /// One request's audit record.
    Audit = 2,
}

/// A decoded message.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    /// The sealed header bytes.
    SealedHeader(Vec<u8>),
    /// Attestation document (COSE_Sign1) whose public key is the enclave's RSA key.
    KeyReleaseRequest {
        /// The document.
        attestation: Vec<u8>,
    },
    /// KMS's `CiphertextForRecipient`.
    KeyReleaseResponse {
        /// CMS EnvelopedData.
        ciphertext_for_recipient: Vec<u8>,
    },
    /// KMS refused the key release.
    KeyReleaseFailed {
        /// The KMS error name and message, e.g. `AccessDeniedException: …`.
        error: String,
    },
    /// One sealed chunk (ciphertext and tag).
    Chunk(Vec<u8>),
    /// The model is ready.
    Ready {
        /// SHA-256 of the weights, as measured into PCR16.
        model_sha256: [u8; 32],
        /// The model's name.
        model_name: String,
    },
    /// Provisioning failed.
    Failed {
        /// Why, without any content.
        reason: String,
    },
    /// What state are you in?
    StatusRequest,
    /// The enclave's state.
    Status(EnclaveState),
    /// Liveness probe.
    Ping(u64),
    /// Its answer.
    Pong(u64),
    /// A fresh attestation document, please, with this nonce.
    AttestationRequest {
        /// At most [`MAX_NONCE`] bytes.
        nonce: Vec<u8>,
    },
    /// The document.
    AttestationResponse(Vec<u8>),
    /// Opaque request bytes.
    RequestData(Vec<u8>),
    /// End of the request.
    RequestEnd,
    /// Opaque response bytes.
    ResponseData(Vec<u8>),
    /// End of the response.
    ResponseEnd,
    /// A transport-level failure of this stream.
    StreamError {
        /// An HTTP status the relay answers with if nothing was sent yet (503 busy, 400 bad
        /// encapsulation, 500 internal).
        status: u16,
        /// Why, without any content.
        reason: String,
    },
    /// Stop the work for this connection's request.
    Cancel,
    /// A signed API key list.
    ApiKeys(Vec<u8>),
    /// The API key list with this serial is in force.
    ApiKeysLoaded(u64),
    /// A log or audit record: a JSON object of at most [`MAX_EVENT`] bytes, content-free by
    /// construction in the enclave.
    Event {
        /// Which.
        kind: EventKind,
        /// The JSON object.
        record: String,
    },
}

impl fmt::Debug for Message {
    // Sizes only: frames can carry ciphertext, and logs should not.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.message_type().name();
        match self {
            Self::KeyReleaseFailed { error } => write!(f, "{name}({error:?})"),
            Self::Ready { model_name, .. } => write!(f, "{name}({model_name:?})"),
            Self::Failed { reason } => write!(f, "{name}({reason:?})"),
            Self::Status(s) => write!(f, "{name}({s:?})"),
            Self::Ping(n) | Self::Pong(n) | Self::ApiKeysLoaded(n) => write!(f, "{name}({n})"),
            Self::AttestationRequest { nonce } => write!(f, "{name}({} byte nonce)", nonce.len()),
            Self::StreamError { status, reason } => write!(f, "{name}({status}, {reason:?})"),
            Self::Event { kind, record } => write!(f, "{name}({kind:?}, {} bytes)", record.len()),
            _ => match self.raw_payload() {
                Some(b) => write!(f, "{name}({} bytes)", b.len()),
                None => f.write_str(name),
            },
        }
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The peer's preface is wrong: another protocol, or another version.
    #[error("bad connection preface")]
    BadPreface,
    /// An unknown message type.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// The announced payload is larger than allowed (checked before allocating).
    #[error("frame of {len} bytes exceeds the maximum {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The payload ends inside a field.
    #[error("{0} payload is truncated")]
    Truncated(&'static str),
    /// Bytes follow the last field.
    #[error("{0} payload has trailing bytes")]
    TrailingBytes(&'static str),
    /// A field is invalid.
    #[error("{what}: {reason}")]
    Invalid {
        /// The message and field.
        what: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A message arrived that the protocol does not allow at this point.
    #[error("unexpected {got:?}; expected {expected}")]
    Unexpected {
        /// What arrived.
        got: MessageType,
        /// What the state machine wanted.
        expected: &'static str,
    },
}

/// Parses a frame header: the type, and the payload length after checking it against `max`.
pub fn decode_header(
    header: &[u8; HEADER_LEN],
    max: usize,
) -> Result<(MessageType, usize), WireError> {
    let [t, l0, l1, l2, l3] = *header;
    let ty = MessageType::from_u8(t).ok_or(WireError::UnknownType(t))?;
    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    Ok((ty, len))
}

/// The whole `RequestEnd` frame (it has no payload), for senders that batch frames.
pub const REQUEST_END_FRAME: [u8; HEADER_LEN] = [MessageType::RequestEnd as u8, 0, 0, 0, 0];

/// The header of a frame of a raw-payload type (`SealedHeader`, `Chunk`, `RequestData`, …)
/// whose payload is `len` bytes; structured types and lengths over `u32` are refused.
pub fn raw_header(ty: MessageType, len: usize) -> Result<[u8; HEADER_LEN], WireError> {
    if ty.layout() != Layout::Raw {
        return Err(WireError::Invalid {
            what: "raw frame",
            reason: "message type has structured fields",
        });
    }
    let l = u32::try_from(len)
        .map_err(|_| WireError::TooLarge {
            len,
            max: u32::MAX as usize,
        })?
        .to_be_bytes();
    Ok([ty as u8, l[0], l[1], l[2], l[3]])
}

/// Appends a frame of a raw-payload type to `out`, straight from `payload`: a sender that
/// batches frames into one write copies each byte once.
pub fn encode_raw_into(
    out: &mut Vec<u8>,
    ty: MessageType,
    payload: &[u8],
) -> Result<(), WireError> {
    let header = raw_header(ty, payload.len())?;
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(())
}

/// Checks a peer's preface.
pub fn check_preface(preface: &[u8; 8]) -> Result<(), WireError> {
    if *preface == PREFACE {
        Ok(())
    } else {
        Err(WireError::BadPreface)
    }
}

struct Fields<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let (len, rest) = self
            .buf
            .split_first_chunk::<4>()
            .ok_or(WireError::Truncated(self.what))?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return Err(WireError::Truncated(self.what));
        }
        let (field, rest) = rest.split_at(len);
        self.buf = rest;
        Ok(field)
    }
    fn array<const N: usize>(&mut self, reason: &'static str) -> Result<[u8; N], WireError> {
        self.bytes()?.try_into().map_err(|_| WireError::Invalid {
            what: self.what,
            reason,
        })
    }
    fn text(&mut self, max: usize) -> Result<String, WireError> {
        let raw = self.bytes()?;
        if raw.len() > max {
            return Err(WireError::Invalid {
                what: self.what,
                reason: "text too long",
            });
        }
        String::from_utf8(raw.to_vec()).map_err(|_| WireError::Invalid {
            what: self.what,
            reason: "text is not UTF-8",
        })
    }
    fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes(self.what))
        }
    }
}

fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
    out.extend_from_slice(field);
}

impl Message {
    /// Its type.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::SealedHeader(_) => MessageType::SealedHeader,
            Self::KeyReleaseRequest { .. } => MessageType::KeyReleaseRequest,
            Self::KeyReleaseResponse { .. } => MessageType::KeyReleaseResponse,
            Self::KeyReleaseFailed { .. } => MessageType::KeyReleaseFailed,
            Self::Chunk(_) => MessageType::Chunk,
            Self::Ready { .. } => MessageType::Ready,
            Self::Failed { .. } => MessageType::Failed,
            Self::StatusRequest => MessageType::StatusRequest,
            Self::Status(_) => MessageType::Status,
            Self::Ping(_) => MessageType::Ping,
            Self::Pong(_) => MessageType::Pong,
            Self::AttestationRequest { .. } => MessageType::AttestationRequest,
            Self::AttestationResponse(_) => MessageType::AttestationResponse,
            Self::RequestData(_) => MessageType::RequestData,
            Self::RequestEnd => MessageType::RequestEnd,
            Self::ResponseData(_) => MessageType::ResponseData,
            Self::ResponseEnd => MessageType::ResponseEnd,
            Self::StreamError { .. } => MessageType::StreamError,
            Self::Cancel => MessageType::Cancel,
            Self::ApiKeys(_) => MessageType::ApiKeys,
            Self::ApiKeysLoaded(_) => MessageType::ApiKeysLoaded,
            Self::Event { .. } => MessageType::Event,
        }
    }

    /// The payload when it is one raw byte field (no copy needed to send it).
    fn raw_payload(&self) -> Option<&[u8]> {
        match self {
            Self::SealedHeader(b)
            | Self::Chunk(b)
            | Self::AttestationResponse(b)
            | Self::RequestData(b)
            | Self::ResponseData(b)
            | Self::ApiKeys(b) => Some(b),
            Self::KeyReleaseRequest { attestation } => Some(attestation),
            Self::KeyReleaseResponse {
                ciphertext_for_recipient,
            } => Some(ciphertext_for_recipient),
            _ => None,
        }
    }

    /// The fields of a [`Layout::Fields`] message (empty for the others).
    fn fields(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Self::KeyReleaseFailed { error } => put(&mut p, truncate(error, MAX_REASON)),
            Self::Ready {
                model_sha256,
                model_name,
            } => {
                put(&mut p, model_sha256);
                put(&mut p, truncate(model_name, MAX_REASON));
            }
            Self::Failed { reason } => put(&mut p, truncate(reason, MAX_REASON)),
            Self::Status(state) => match state {
                EnclaveState::AwaitingModel => put(&mut p, &[0]),
                EnclaveState::Provisioning => put(&mut p, &[1]),
                EnclaveState::Ready {
                    model_sha256,
                    model_name,
                } => {
                    put(&mut p, &[2]);
                    put(&mut p, model_sha256);
                    put(&mut p, truncate(model_name, MAX_REASON));
                }
            },
            Self::Ping(n) | Self::Pong(n) | Self::ApiKeysLoaded(n) => put(&mut p, &n.to_be_bytes()),
            Self::AttestationRequest { nonce } => {
                put(&mut p, nonce.get(..MAX_NONCE).unwrap_or(nonce))
            }
            Self::StreamError { status, reason } => {
                put(&mut p, &status.to_be_bytes());
                put(&mut p, truncate(reason, MAX_REASON));
            }
            Self::Event { kind, record } => {
                put(&mut p, &[*kind as u8]);
                put(&mut p, truncate(record, MAX_EVENT));
            }
            _ => {}
        }
        p
    }

    /// The frame header for a payload of `len` bytes.
    fn frame_header(&self, len: usize) -> [u8; HEADER_LEN] {
        let l = (len as u32).to_be_bytes();
        [self.message_type() as u8, l[0], l[1], l[2], l[3]]
    }

    /// The complete frame: header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let fields;
        let payload = match self.raw_payload() {
            Some(raw) => raw,
            None => {
                fields = self.fields();
                &fields
            }
        };
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        frame.extend_from_slice(&self.frame_header(payload.len()));
        frame.extend_from_slice(payload);
        frame
    }

    /// Decodes a payload of type `ty`, taking ownership of it (raw messages keep the buffer).
    pub fn decode_owned(ty: MessageType, payload: Vec<u8>) -> Result<Self, WireError> {
        Ok(match ty {
            MessageType::SealedHeader => Self::SealedHeader(payload),
            MessageType::Chunk => Self::Chunk(payload),
            MessageType::KeyReleaseRequest => Self::KeyReleaseRequest {
                attestation: payload,
            },
            MessageType::KeyReleaseResponse => Self::KeyReleaseResponse {
                ciphertext_for_recipient: payload,
            },
            MessageType::AttestationResponse => Self::AttestationResponse(payload),
            MessageType::RequestData => Self::RequestData(payload),
            MessageType::ResponseData => Self::ResponseData(payload),
            MessageType::ApiKeys => Self::ApiKeys(payload),
            _ => Self::decode(ty, &payload)?,
        })
    }

    /// Decodes a payload of type `ty`.
    pub fn decode(ty: MessageType, payload: &[u8]) -> Result<Self, WireError> {
        let what = ty.name();
        match ty.layout() {
            Layout::Raw => return Self::decode_owned(ty, payload.to_vec()),
            Layout::Empty => {
                if !payload.is_empty() {
                    return Err(WireError::TrailingBytes(what));
                }
                return Ok(match ty {
                    MessageType::StatusRequest => Self::StatusRequest,
                    MessageType::RequestEnd => Self::RequestEnd,
                    MessageType::ResponseEnd => Self::ResponseEnd,
                    _ => Self::Cancel,
                });
            }
            Layout::Fields => {}
        }
        let mut f = Fields { buf: payload, what };
        let invalid = |reason| WireError::Invalid { what, reason };
        let msg = match ty {
            MessageType::KeyReleaseFailed => Self::KeyReleaseFailed {
                error: f.text(MAX_REASON)?,
            },
            MessageType::Ready => Self::Ready {
                model_sha256: f.array("model_sha256 is not 32 bytes")?,
                model_name: f.text(MAX_REASON)?,
            },
            MessageType::Status => Self::Status(match f.array("state is not one byte")? {
                [0] => EnclaveState::AwaitingModel,
                [1] => EnclaveState::Provisioning,
                [2] => EnclaveState::Ready {
                    model_sha256: f.array("model_sha256 is not 32 bytes")?,
                    model_name: f.text(MAX_REASON)?,
                },
                _ => return Err(invalid("unknown state")),
            }),
            MessageType::Ping => Self::Ping(u64::from_be_bytes(f.array("not 8 bytes")?)),
            MessageType::Pong => Self::Pong(u64::from_be_bytes(f.array("not 8 bytes")?)),
            MessageType::ApiKeysLoaded => {
                Self::ApiKeysLoaded(u64::from_be_bytes(f.array("not 8 bytes")?))
            }
            MessageType::AttestationRequest => {
                let nonce = f.bytes()?;
                if nonce.len() > MAX_NONCE {
                    return Err(invalid("nonce too long"));
                }
                Self::AttestationRequest {
                    nonce: nonce.to_vec(),
                }
            }
            MessageType::StreamError => Self::StreamError {
                status: u16::from_be_bytes(f.array("status is not 2 bytes")?),
                reason: f.text(MAX_REASON)?,
            },
            MessageType::Event => Self::Event {
                kind: match f.array("kind is not one byte")? {
                    [1] => EventKind::Log,
                    [2] => EventKind::Audit,
                    _ => return Err(invalid("unknown event kind")),
                },
                record: f.text(MAX_EVENT)?,
            },
            _ => Self::Failed {
                reason: f.text(MAX_REASON)?,
            },
        };
        f.finish()?;
        Ok(msg)
    }
}

/// Cuts text to `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> &[u8] {
    if s.len() <= max {
        return s.as_bytes();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default().as_bytes()
}

/// Async framing over a byte stream (Unix socket or vsock).
#[cfg(feature = "tokio")]
pub mod io {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// An I/O or protocol failure on a connection.
    #[derive(Debug, thiserror::Error)]
    pub enum ConnError {
        /// The socket failed or closed.
        #[error("connection: {0}")]
        Io(#[from] std::io::Error),
        /// The peer sent something invalid.
        #[error("protocol: {0}")]
        Wire(#[from] WireError),
    }

    /// Sends our preface and checks the peer's.
    pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<(), ConnError> {
        s.write_all(&PREFACE).await?;
        s.flush().await?;
        let mut p = [0u8; 8];
        s.read_exact(&mut p).await?;
        Ok(check_preface(&p)?)
    }

    /// Sends our preface and the first frame in one write, so opening a request costs no
    /// round trip; the peer's preface is checked by [`read_preface`] before its first answer.
    pub async fn open<S: AsyncWrite + Unpin>(s: &mut S, first: &Message) -> Result<(), ConnError> {
        let mut buf = PREFACE.to_vec();
        buf.extend_from_slice(&first.encode());
        s.write_all(&buf).await?;
        s.flush().await?;
        Ok(())
    }

    /// Reads and checks the peer's preface.
    pub async fn read_preface<S: AsyncRead + Unpin>(s: &mut S) -> Result<(), ConnError> {
        let mut p = [0u8; 8];
        s.read_exact(&mut p).await?;
        Ok(check_preface(&p)?)
    }

    /// Sends our preface (the side that answers).
    pub async fn write_preface<S: AsyncWrite + Unpin>(s: &mut S) -> Result<(), ConnError> {
        s.write_all(&PREFACE).await?;
        Ok(())
    }

    /// Reads one frame, refusing payloads over `max` before allocating them.
    pub async fn read_frame<S: AsyncRead + Unpin>(
        s: &mut S,
        max: usize,
    ) -> Result<Message, ConnError> {
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).await?;
        let (ty, len) = decode_header(&h, max)?;
        // `len` is bounded by `max` above. Zeroed, then filled in place: `read_to_end` into
        // exact capacity grows the vector (a reallocation and a copy of the whole payload) to
        // probe for more once it is full, and zeroing costs less than that copy.
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await?;
        Ok(Message::decode_owned(ty, payload)?)
    }

    /// Writes a frame of a raw-payload type (`SealedHeader`, `Chunk`, `RequestData`, …)
    /// straight from `payload`, so a sender can reuse one buffer. The caller flushes.
    pub async fn write_raw<S: AsyncWrite + Unpin>(
        s: &mut S,
        ty: MessageType,
        payload: &[u8],
    ) -> Result<(), ConnError> {
        s.write_all(&raw_header(ty, payload.len())?).await?;
        s.write_all(payload).await?;
        Ok(())
    }

    /// Writes one frame and flushes. Raw payloads are written from where they are.
    pub async fn write_frame<S: AsyncWrite + Unpin>(
        s: &mut S,
        m: &Message,
    ) -> Result<(), ConnError> {
        match m.raw_payload() {
            Some(raw) => write_raw(s, m.message_type(), raw).await?,
            None => s.write_all(&m.encode()).await?,
        }
        s.flush().await?;
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[tokio::test]
        async fn frames_are_read_whole_and_short_or_oversized_ones_are_errors() {
            let mut bytes = Message::RequestData(b"hello".to_vec()).encode();
            bytes.extend(Message::Ping(9).encode());
            bytes.extend(Message::ResponseData(Vec::new()).encode());
            let mut r = bytes.as_slice();
            let max = DEFAULT_MAX_PAYLOAD;
            assert_eq!(
                read_frame(&mut r, max).await.unwrap(),
                Message::RequestData(b"hello".to_vec())
            );
            assert_eq!(read_frame(&mut r, max).await.unwrap(), Message::Ping(9));
            assert_eq!(
                read_frame(&mut r, max).await.unwrap(),
                Message::ResponseData(Vec::new())
            );
            assert!(matches!(
                read_frame(&mut r, max).await,
                Err(ConnError::Io(_))
            ));

            // A payload cut short is an error, not a shorter message.
            let frame = Message::RequestData(vec![7; 100]).encode();
            let mut short = frame.get(..frame.len() - 1).unwrap();
            match read_frame(&mut short, max).await {
                Err(ConnError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
                other => panic!("{other:?}"),
            }
            // A length over the maximum is refused from the header alone.
            let mut big = frame.as_slice();
            assert!(matches!(
                read_frame(&mut big, 99).await,
                Err(ConnError::Wire(WireError::TooLarge { len: 100, max: 99 }))
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encode_raw_into_matches_encode_and_refuses_structured_types() {
        let mut out = Vec::new();
        encode_raw_into(&mut out, MessageType::RequestData, b"abc").unwrap();
        encode_raw_into(&mut out, MessageType::ResponseData, b"").unwrap();
        let mut want = Message::RequestData(b"abc".to_vec()).encode();
        want.extend(Message::ResponseData(Vec::new()).encode());
        assert_eq!(out, want);
        assert!(encode_raw_into(&mut out, MessageType::Ping, b"x").is_err());
        assert_eq!(REQUEST_END_FRAME.to_vec(), Message::RequestEnd.encode());
        assert_eq!(out, want, "a refused frame leaves the buffer alone");
    }

    fn decode_frame(frame: &[u8], max: usize) -> Result<Message, WireError> {
        let header: [u8; HEADER_LEN] = frame
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(WireError::Truncated("frame"))?;
        let (ty, len) = decode_header(&header, max)?;
        let payload = frame
            .get(HEADER_LEN..)
            .ok_or(WireError::Truncated("frame"))?;
        if payload.len() != len {
            return Err(WireError::Truncated("frame"));
        }
        Message::decode(ty, payload)
    }

    fn message() -> impl Strategy<Value = Message> {
        let bytes = proptest::collection::vec(any::<u8>(), 0..300);
        let text = "[a-zA-Z0-9 :é]{0,40}";
        prop_oneof![
            bytes.clone().prop_map(Message::SealedHeader),
            bytes
                .clone()
                .prop_map(|attestation| Message::KeyReleaseRequest { attestation }),
            bytes.clone().prop_map(|c| Message::KeyReleaseResponse {
                ciphertext_for_recipient: c
            }),
            text.prop_map(|error| Message::KeyReleaseFailed { error }),
            bytes.clone().prop_map(Message::Chunk),
            (any::<[u8; 32]>(), text).prop_map(|(model_sha256, model_name)| Message::Ready {
                model_sha256,
                model_name
            }),
            text.prop_map(|reason| Message::Failed { reason }),
            Just(Message::StatusRequest),
            Just(Message::Status(EnclaveState::AwaitingModel)),
            Just(Message::Status(EnclaveState::Provisioning)),
            (any::<[u8; 32]>(), text).prop_map(|(model_sha256, model_name)| Message::Status(
                EnclaveState::Ready {
                    model_sha256,
                    model_name
                }
            )),
            any::<u64>().prop_map(Message::Ping),
            any::<u64>().prop_map(Message::Pong),
            bytes.clone().prop_map(Message::ApiKeys),
            any::<u64>().prop_map(Message::ApiKeysLoaded),
            proptest::collection::vec(any::<u8>(), 0..=MAX_NONCE)
                .prop_map(|nonce| Message::AttestationRequest { nonce }),
            bytes.clone().prop_map(Message::AttestationResponse),
            bytes.clone().prop_map(Message::RequestData),
            Just(Message::RequestEnd),
            bytes.clone().prop_map(Message::ResponseData),
            Just(Message::ResponseEnd),
            (any::<u16>(), text)
                .prop_map(|(status, reason)| Message::StreamError { status, reason }),
            Just(Message::Cancel),
            (
                prop_oneof![Just(EventKind::Log), Just(EventKind::Audit)],
                text
            )
                .prop_map(|(kind, record)| Message::Event { kind, record }),
        ]
    }

    proptest! {
        #[test]
        fn decode_encode_round_trips(m in message()) {
            prop_assert_eq!(decode_frame(&m.encode(), DEFAULT_MAX_PAYLOAD), Ok(m));
        }

        #[test]
        fn arbitrary_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_frame(&bytes, 32);
        }
    }

    #[test]
    fn limits_and_strictness() {
        let frame = Message::Chunk(vec![0; 100]).encode();
        assert_eq!(
            decode_frame(&frame, 50),
            Err(WireError::TooLarge { len: 100, max: 50 })
        );
        assert_eq!(
            decode_header(&[0x7f, 0, 0, 0, 0], 10),
            Err(WireError::UnknownType(0x7f))
        );
        // A payload whose inner length claims more than is there.
        assert_eq!(
            Message::decode(MessageType::Failed, &[0, 0, 0, 9, b'a']),
            Err(WireError::Truncated("Failed"))
        );
        // Trailing bytes after the last field.
        assert_eq!(
            Message::decode(MessageType::Failed, &[0, 0, 0, 1, b'a', 2]),
            Err(WireError::TrailingBytes("Failed"))
        );
        // Raw messages are the payload itself, taken without a copy.
        assert_eq!(
            Message::decode_owned(MessageType::Chunk, vec![1, 2]),
            Ok(Message::Chunk(vec![1, 2]))
        );
        assert!(Message::decode(MessageType::Ready, &[0, 0, 0, 1, 1, 0, 0, 0, 0]).is_err());
        assert!(Message::decode(MessageType::Failed, &[0, 0, 0, 2, 0xff, 0xfe]).is_err());
        assert_eq!(check_preface(b"NEWIRE\x02\x00"), Err(WireError::BadPreface));
        // Empty messages are empty; fixed-size fields are their size; nonces are bounded.
        assert_eq!(
            Message::decode(MessageType::Cancel, &[0]),
            Err(WireError::TrailingBytes("Cancel"))
        );
        assert!(Message::decode(MessageType::Ping, &[0, 0, 0, 2, 1, 2]).is_err());
        assert!(Message::decode(MessageType::Status, &[0, 0, 0, 1, 9]).is_err());
        let mut long_nonce = vec![0, 0, 0, 65];
        long_nonce.extend([7; 65]);
        assert!(Message::decode(MessageType::AttestationRequest, &long_nonce).is_err());
        assert!(Message::decode(MessageType::Event, &[0, 0, 0, 1, 3, 0, 0, 0, 0]).is_err());
        for t in MessageType::ALL {
            assert_eq!(MessageType::from_u8(t as u8), Some(t));
        }
        let long = "é".repeat(MAX_REASON);
        let m = Message::Failed { reason: long };
        assert!(
            matches!(decode_frame(&m.encode(), DEFAULT_MAX_PAYLOAD), Ok(Message::Failed { reason }) if reason.len() <= MAX_REASON)
        );
    }

    #[test]
    fn debug_shows_sizes_not_bytes() {
        assert_eq!(
            format!("{:?}", Message::Chunk(vec![0x41; 3])),
            "Chunk(3 bytes)"
        );
    }
}
