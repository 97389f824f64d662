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
/// Longest human-readable reason carried in a frame.
pub const MAX_REASON: usize = 1024;

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
}

impl MessageType {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::SealedHeader,
            0x02 => Self::KeyReleaseRequest,
            0x03 => Self::KeyReleaseResponse,
            0x04 => Self::KeyReleaseFailed,
            0x05 => Self::Chunk,
            0x06 => Self::Ready,
            0x07 => Self::Failed,
            _ => return None,
        })
    }
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
}

impl fmt::Debug for Message {
    // Sizes only: frames can carry ciphertext, and logs should not.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SealedHeader(b) => write!(f, "SealedHeader({} bytes)", b.len()),
            Self::KeyReleaseRequest { attestation } => {
                write!(f, "KeyReleaseRequest({} bytes)", attestation.len())
            }
            Self::KeyReleaseResponse {
                ciphertext_for_recipient,
            } => {
                write!(
                    f,
                    "KeyReleaseResponse({} bytes)",
                    ciphertext_for_recipient.len()
                )
            }
            Self::KeyReleaseFailed { error } => write!(f, "KeyReleaseFailed({error:?})"),
            Self::Chunk(b) => write!(f, "Chunk({} bytes)", b.len()),
            Self::Ready { model_name, .. } => write!(f, "Ready({model_name:?})"),
            Self::Failed { reason } => write!(f, "Failed({reason:?})"),
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
        }
    }

    /// The payload when it is one raw byte field (no copy needed to send it).
    fn raw_payload(&self) -> Option<&[u8]> {
        match self {
            Self::SealedHeader(b) | Self::Chunk(b) => Some(b),
            Self::KeyReleaseRequest { attestation } => Some(attestation),
            Self::KeyReleaseResponse {
                ciphertext_for_recipient,
            } => Some(ciphertext_for_recipient),
            _ => None,
        }
    }

    /// The frame header for a payload of `len` bytes.
    fn frame_header(&self, len: usize) -> [u8; HEADER_LEN] {
        let l = (len as u32).to_be_bytes();
        [self.message_type() as u8, l[0], l[1], l[2], l[3]]
    }

    /// The complete frame: header and payload.
    pub fn encode(&self) -> Vec<u8> {
        if let Some(raw) = self.raw_payload() {
            let mut frame = Vec::with_capacity(HEADER_LEN + raw.len());
            frame.extend_from_slice(&self.frame_header(raw.len()));
            frame.extend_from_slice(raw);
            return frame;
        }
        let mut payload = Vec::new();
        match self {
            Self::SealedHeader(_)
            | Self::Chunk(_)
            | Self::KeyReleaseRequest { .. }
            | Self::KeyReleaseResponse { .. } => {}
            Self::KeyReleaseFailed { error } => put(&mut payload, truncate(error).as_bytes()),
            Self::Ready {
                model_sha256,
                model_name,
            } => {
                put(&mut payload, model_sha256);
                put(&mut payload, truncate(model_name).as_bytes());
            }
            Self::Failed { reason } => put(&mut payload, truncate(reason).as_bytes()),
        }
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        frame.extend_from_slice(&self.frame_header(payload.len()));
        frame.extend_from_slice(&payload);
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
            _ => Self::decode(ty, &payload)?,
        })
    }

    /// Decodes a payload of type `ty`.
    pub fn decode(ty: MessageType, payload: &[u8]) -> Result<Self, WireError> {
        if matches!(
            ty,
            MessageType::SealedHeader
                | MessageType::Chunk
                | MessageType::KeyReleaseRequest
                | MessageType::KeyReleaseResponse
        ) {
            return Self::decode_owned(ty, payload.to_vec());
        }
        let what = match ty {
            MessageType::SealedHeader => "SealedHeader",
            MessageType::KeyReleaseRequest => "KeyReleaseRequest",
            MessageType::KeyReleaseResponse => "KeyReleaseResponse",
            MessageType::KeyReleaseFailed => "KeyReleaseFailed",
            MessageType::Chunk => "Chunk",
            MessageType::Ready => "Ready",
            MessageType::Failed => "Failed",
        };
        let mut f = Fields { buf: payload, what };
        let msg = match ty {
            MessageType::SealedHeader
            | MessageType::Chunk
            | MessageType::KeyReleaseRequest
            | MessageType::KeyReleaseResponse => unreachable_raw(what)?,
            MessageType::KeyReleaseFailed => Self::KeyReleaseFailed {
                error: f.text(MAX_REASON)?,
            },
            MessageType::Ready => {
                let model_sha256 = f.bytes()?.try_into().map_err(|_| WireError::Invalid {
                    what,
                    reason: "model_sha256 is not 32 bytes",
                })?;
                Self::Ready {
                    model_sha256,
                    model_name: f.text(MAX_REASON)?,
                }
            }
            MessageType::Failed => Self::Failed {
                reason: f.text(MAX_REASON)?,
            },
        };
        f.finish()?;
        Ok(msg)
    }
}

/// Raw messages are decoded before field parsing; this arm cannot be reached.
fn unreachable_raw(what: &'static str) -> Result<Message, WireError> {
    Err(WireError::Invalid {
        what,
        reason: "raw payload decoded as fields",
    })
}

/// Cuts a reason to [`MAX_REASON`] bytes at a character boundary.
fn truncate(s: &str) -> &str {
    if s.len() <= MAX_REASON {
        return s;
    }
    let mut end = MAX_REASON;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
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

    /// Reads one frame, refusing payloads over `max` before allocating them.
    pub async fn read_frame<S: AsyncRead + Unpin>(
        s: &mut S,
        max: usize,
    ) -> Result<Message, ConnError> {
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).await?;
        let (ty, len) = decode_header(&h, max)?;
        // Filled by the read itself, not zeroed first: `len` is bounded by `max` above.
        let mut payload = Vec::with_capacity(len);
        let got = (&mut *s).take(len as u64).read_to_end(&mut payload).await?;
        if got != len {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        Ok(Message::decode_owned(ty, payload)?)
    }

    /// Writes a frame of a raw-payload type (`SealedHeader`, `Chunk`, `KeyReleaseRequest`,
    /// `KeyReleaseResponse`) straight from `payload`, so a sender can reuse one buffer. The
    /// caller flushes.
    pub async fn write_raw<S: AsyncWrite + Unpin>(
        s: &mut S,
        ty: MessageType,
        payload: &[u8],
    ) -> Result<(), ConnError> {
        if !matches!(
            ty,
            MessageType::SealedHeader
                | MessageType::Chunk
                | MessageType::KeyReleaseRequest
                | MessageType::KeyReleaseResponse
        ) {
            return Err(WireError::Invalid {
                what: "write_raw",
                reason: "message type has structured fields",
            }
            .into());
        }
        let l = (payload.len() as u32).to_be_bytes();
        s.write_all(&[ty as u8, l[0], l[1], l[2], l[3]]).await?;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
            bytes.prop_map(Message::Chunk),
            (any::<[u8; 32]>(), text).prop_map(|(model_sha256, model_name)| Message::Ready {
                model_sha256,
                model_name
            }),
            text.prop_map(|reason| Message::Failed { reason }),
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
