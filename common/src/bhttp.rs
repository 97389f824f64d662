//! Binary HTTP messages (RFC 9292): what travels inside the Oblivious HTTP encapsulation
//! between the client and the enclave's gateway (RFC 9458 §4 encapsulates a binary HTTP
//! message, so the inner request has a method, a path, headers and a body, and the inner
//! response a status code the host never sees).
//!
//! Requests are decoded in both framings (known-length and indeterminate-length, §3.1); they
//! arrive whole, so truncation at a section boundary (§3.8) reads as empty sections, as the RFC
//! says. Responses are written in the indeterminate-length framing, a head first and then
//! content chunks as tokens are produced, and [`ResponseDecoder`] reads them incrementally. It is
//! strict: the content and trailer terminators must both arrive, because a response cut short
//! must not look complete (the chunked-OHTTP layer detects truncation too).
//!
//! Every length is checked against what is left of the input, and against [`Limits`], before
//! anything is allocated.

use std::fmt;

/// Framing indicators (RFC 9292 §3.3).
const KNOWN_REQUEST: u64 = 0;
const INDETERMINATE_REQUEST: u64 = 2;
const INDETERMINATE_RESPONSE: u64 = 3;

/// Largest field section a decoder accepts, in bytes (names and values together).
pub const MAX_FIELD_SECTION: usize = 16 << 10;
/// Most field lines in a section.
pub const MAX_FIELDS: usize = 64;
/// Largest content chunk a response decoder buffers, in bytes.
pub const MAX_RESPONSE_CHUNK: usize = 1 << 20;
/// Longest method, scheme, authority or path, in bytes.
pub const MAX_CONTROL: usize = 2048;

/// Why a binary HTTP message was refused. Messages name the structure, never content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BhttpError {
    /// The input ends inside an item.
    #[error("binary HTTP message is truncated")]
    Truncated,
    /// A framing indicator that this side does not accept.
    #[error("unexpected binary HTTP framing indicator {0}")]
    Framing(u64),
    /// A length beyond a limit.
    #[error("binary HTTP {what} exceeds {max} bytes")]
    TooLarge {
        /// Which item.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// Too many field lines.
    #[error("more than {MAX_FIELDS} field lines")]
    TooManyFields,
    /// Not a valid field name (RFC 9110 §5.1 token, lowercase as RFC 9292 §3.6 requires).
    #[error("invalid field name")]
    FieldName,
    /// Method, scheme, authority or path are not valid.
    #[error("invalid request control data: {0}")]
    Control(&'static str),
    /// A status code outside 100..=599.
    #[error("invalid status code {0}")]
    Status(u64),
    /// Non-zero bytes after the message (padding must be zeros, §3.8).
    #[error("non-zero bytes after the binary HTTP message")]
    Trailing,
    /// Data after the response ended.
    #[error("data after the end of the response")]
    AfterEnd,
}

/// One header or trailer field: a lowercase name and an opaque value.
pub type Field = (String, Vec<u8>);

/// A request, decoded whole.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    /// `POST`, `GET`, …
    pub method: String,
    /// `https` by convention; the gateway ignores it.
    pub scheme: String,
    /// The target's authority; the gateway ignores it.
    pub authority: String,
    /// The path and query, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Header fields, names lowercase.
    pub headers: Vec<Field>,
    /// The content.
    pub body: Vec<u8>,
}

// Requests carry prompts and credentials: their Debug shows the shape only.
impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("headers", &self.headers.len())
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

impl Request {
    /// A request with no headers.
    pub fn new(method: &str, path: &str, body: Vec<u8>) -> Self {
        Self {
            method: method.into(),
            scheme: "https".into(),
            authority: "enclave".into(),
            path: path.into(),
            headers: Vec::new(),
            body,
        }
    }

    /// Adds a header field (the name is lowercased).
    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The indeterminate-length encoding (§3.2), the body in one chunk.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 256);
        varint(&mut out, INDETERMINATE_REQUEST);
        for part in [&self.method, &self.scheme, &self.authority, &self.path] {
            vbytes(&mut out, part.as_bytes());
        }
        fields(&mut out, &self.headers);
        if !self.body.is_empty() {
            vbytes(&mut out, &self.body);
        }
        out.push(0); // content terminator
        out.push(0); // no trailers
        out
    }

    /// Decodes a request in either framing. `max_body` bounds the content.
    pub fn decode(bytes: &[u8], max_body: usize) -> Result<Self, BhttpError> {
        let mut r = Reader::new(bytes);
        let framing = r.varint()?;
        let known = match framing {
            KNOWN_REQUEST => true,
            INDETERMINATE_REQUEST => false,
            other => return Err(BhttpError::Framing(other)),
        };
        let mut control = [""; 4];
        for (slot, what) in control
            .iter_mut()
            .zip(["method", "scheme", "authority", "path"])
        {
            let raw = r.vbytes(MAX_CONTROL, what)?;
            *slot = std::str::from_utf8(raw).map_err(|_| BhttpError::Control(what))?;
        }
        let [method, scheme, authority, path] = control;
        if !is_token(method.as_bytes()) {
            return Err(BhttpError::Control("method"));
        }
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(BhttpError::Control("path"));
        }
        let headers = if r.is_empty() {
            Vec::new()
        } else if known {
            r.known_fields()?
        } else {
            r.indeterminate_fields()?
        };
        let mut body = Vec::new();
        if !r.is_empty() {
            if known {
                body.extend_from_slice(r.vbytes(max_body, "content")?);
            } else {
                loop {
                    let chunk = r.vbytes(max_body, "content")?;
                    if chunk.is_empty() {
                        break;
                    }
                    if body.len() + chunk.len() > max_body {
                        return Err(BhttpError::TooLarge {
                            what: "content",
                            max: max_body,
                        });
                    }
                    body.extend_from_slice(chunk);
                }
            }
        }
        // Trailers are read for their structure and dropped: the gateway uses none.
        if !r.is_empty() {
            if known {
                r.known_fields()?;
            } else {
                r.indeterminate_fields()?;
            }
        }
        if r.rest().iter().any(|&b| b != 0) {
            return Err(BhttpError::Trailing);
        }
        Ok(Self {
            method: method.into(),
            scheme: scheme.into(),
            authority: authority.into(),
            path: path.into(),
            headers,
            body,
        })
    }
}

/// A response's status and header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    /// The final status code (200..=599).
    pub status: u16,
    /// Header fields, names lowercase.
    pub headers: Vec<Field>,
}

impl ResponseHead {
    /// A head with one `content-type` field.
    pub fn new(status: u16, content_type: &str) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), content_type.as_bytes().to_vec())],
        }
    }

    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Appends the indeterminate-length response's framing indicator, status and fields.
    pub fn encode(&self, out: &mut Vec<u8>) {
        varint(out, INDETERMINATE_RESPONSE);
        varint(out, u64::from(self.status));
        fields(out, &self.headers);
    }
}

/// Appends one content chunk (empty data appends nothing: a zero length ends the content).
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if !data.is_empty() {
        vbytes(out, data);
    }
}

/// Appends the content terminator and an empty trailer section: the response is complete.
pub fn encode_end(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0]);
}

/// A whole response (head, content, end) in one buffer.
pub fn encode_response(head: &ResponseHead, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    head.encode(&mut out);
    encode_chunk(&mut out, body);
    encode_end(&mut out);
    out
}

/// One piece of a decoded response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponsePart {
    /// The status and headers (informational 1xx responses are skipped).
    Head(ResponseHead),
    /// Content.
    Data(Vec<u8>),
    /// The content and trailers ended: the response is complete.
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DecodeState {
    Framing,
    Head,
    Content,
    Trailers,
    Done,
}

/// Reads an indeterminate-length response as its bytes arrive.
#[derive(Debug)]
pub struct ResponseDecoder {
    buf: Vec<u8>,
    state: DecodeState,
}

impl Default for ResponseDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseDecoder {
    /// A decoder expecting the framing indicator.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            state: DecodeState::Framing,
        }
    }

    /// Whether the whole response (through its trailers) has been read.
    pub fn is_done(&self) -> bool {
        self.state == DecodeState::Done
    }

    /// Takes the next bytes and returns the parts they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<ResponsePart>, BhttpError> {
        if self.state == DecodeState::Done {
            return if bytes.iter().all(|&b| b == 0) {
                Ok(Vec::new())
            } else {
                Err(BhttpError::AfterEnd)
            };
        }
        self.buf.extend_from_slice(bytes);
        let mut parts = Vec::new();
        let mut used = 0;
        loop {
            let mut r = Reader::new(self.buf.get(used..).unwrap_or_default());
            let step = match self.state {
                DecodeState::Framing => r.varint().and_then(|f| {
                    if f == INDETERMINATE_RESPONSE {
                        self.state = DecodeState::Head;
                        Ok(())
                    } else {
                        Err(BhttpError::Framing(f))
                    }
                }),
                DecodeState::Head => r.varint().and_then(|status| {
                    if !(100..=599).contains(&status) {
                        return Err(BhttpError::Status(status));
                    }
                    let headers = r.indeterminate_fields()?;
                    if status >= 200 {
                        parts.push(ResponsePart::Head(ResponseHead {
                            status: status as u16,
                            headers,
                        }));
                        self.state = DecodeState::Content;
                    }
                    Ok(())
                }),
                DecodeState::Content => r.vbytes(MAX_RESPONSE_CHUNK, "chunk").map(|chunk| {
                    if chunk.is_empty() {
                        self.state = DecodeState::Trailers;
                    } else {
                        parts.push(ResponsePart::Data(chunk.to_vec()));
                    }
                }),
                DecodeState::Trailers => r.indeterminate_fields().map(|_| {
                    parts.push(ResponsePart::End);
                    self.state = DecodeState::Done;
                }),
                DecodeState::Done => {
                    if r.rest().iter().any(|&b| b != 0) {
                        return Err(BhttpError::AfterEnd);
                    }
                    used = self.buf.len();
                    break;
                }
            };
            match step {
                Ok(()) => used += r.pos,
                Err(BhttpError::Truncated) => break,
                Err(e) => return Err(e),
            }
        }
        self.buf.drain(..used.min(self.buf.len()));
        if self.buf.len() > MAX_RESPONSE_CHUNK + MAX_FIELD_SECTION {
            return Err(BhttpError::TooLarge {
                what: "buffered response",
                max: MAX_RESPONSE_CHUNK + MAX_FIELD_SECTION,
            });
        }
        Ok(parts)
    }
}

/// QUIC-style variable-length integer (RFC 9000 §16), as RFC 9292 §3.1 uses.
pub fn varint(out: &mut Vec<u8>, v: u64) {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&((v & ((1 << 62) - 1)) | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

fn vbytes(out: &mut Vec<u8>, data: &[u8]) {
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

fn fields(out: &mut Vec<u8>, fields: &[Field]) {
    for (name, value) in fields {
        vbytes(out, name.as_bytes());
        vbytes(out, value);
    }
    out.push(0); // content terminator: a zero-length name (§3.6)
}

/// An RFC 9110 §5.6.2 token.
fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], BhttpError> {
        let end = self.pos.checked_add(n).ok_or(BhttpError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(BhttpError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64, BhttpError> {
        let first = *self.take(1)?.first().ok_or(BhttpError::Truncated)?;
        let len = 1usize << (first >> 6);
        let mut v = u64::from(first & 0x3f);
        for &b in self.take(len - 1)? {
            v = (v << 8) | u64::from(b);
        }
        Ok(v)
    }

    fn vbytes(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], BhttpError> {
        let len = self.varint()?;
        if len > max as u64 {
            return Err(BhttpError::TooLarge { what, max });
        }
        self.take(len as usize)
    }

    fn field(&mut self, name: &'a [u8]) -> Result<Field, BhttpError> {
        if !is_token(name) || name.iter().any(u8::is_ascii_uppercase) {
            return Err(BhttpError::FieldName);
        }
        let value = self.vbytes(MAX_FIELD_SECTION, "field value")?;
        Ok((String::from_utf8_lossy(name).into_owned(), value.to_vec()))
    }

    fn indeterminate_fields(&mut self) -> Result<Vec<Field>, BhttpError> {
        let start = self.pos;
        let mut out = Vec::new();
        loop {
            let name = self.vbytes(MAX_FIELD_SECTION, "field name")?;
            if name.is_empty() {
                return Ok(out);
            }
            if out.len() == MAX_FIELDS {
                return Err(BhttpError::TooManyFields);
            }
            out.push(self.field(name)?);
            if self.pos - start > MAX_FIELD_SECTION {
                return Err(BhttpError::TooLarge {
                    what: "field section",
                    max: MAX_FIELD_SECTION,
                });
            }
        }
    }

    fn known_fields(&mut self) -> Result<Vec<Field>, BhttpError> {
        let section = self.vbytes(MAX_FIELD_SECTION, "field section")?;
        let mut inner = Reader::new(section);
        let mut out = Vec::new();
        while !inner.is_empty() {
            if out.len() == MAX_FIELDS {
                return Err(BhttpError::TooManyFields);
            }
            let name = inner.vbytes(MAX_FIELD_SECTION, "field name")?;
            out.push(inner.field(name)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let req = Request::new("POST", "/v1/chat/completions", b"{\"a\":1}".to_vec())
            .with_header("Content-Type", "application/json")
            .with_header("authorization", "Bearer k");
        let back = Request::decode(&req.encode(), 1024).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.header("content-type"), Some(&b"application/json"[..]));
    }

    /// RFC 9292 Appendix A.1: an indeterminate-length GET, with padding.
    #[test]
    fn rfc9292_example_request() {
        let hex = "0203474554056874747073000a2f68656c6c6f2e7478740a757365722d6167656e74346375726c2f372e31362e33206c69626375726c2f372e31362e33204f70656e53534c2f302e392e376c207a6c69622f312e322e3304686f73740f7777772e6578616d706c652e636f6d0f6163636570742d6c616e677561676506656e2c206d690000000000000000000000000000";
        let bytes = hex::decode(hex.replace(' ', "")).unwrap();
        let req = Request::decode(&bytes, 0).unwrap();
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/hello.txt");
        assert_eq!(req.header("host"), Some(&b"www.example.com"[..]));
        assert_eq!(req.headers.len(), 3);
        assert!(req.body.is_empty());
    }

    /// RFC 9292 Appendix A.2: the same request in the known-length framing.
    #[test]
    fn rfc9292_known_length_request() {
        let hex = "0003474554056874747073000a2f6865 6c6c6f2e747874406c0a757365722d61 67656e74346375726c2f372e31362e33 206c69626375726c2f372e31362e3320 4f70656e53534c2f302e392e376c207a 6c69622f312e322e3304686f73740f77 77772e6578616d706c652e636f6d0f61 63636570742d6c616e67756167650665 6e2c206d690000";
        let bytes = hex::decode(hex.replace(' ', "")).unwrap();
        let req = Request::decode(&bytes, 0).unwrap();
        assert_eq!(req.path, "/hello.txt");
        assert_eq!(req.headers.len(), 3);
    }

    #[test]
    fn truncation_at_a_section_boundary_is_empty_sections() {
        let req = Request::new("GET", "/v1/models", Vec::new());
        let mut bytes = Vec::new();
        varint(&mut bytes, INDETERMINATE_REQUEST);
        for part in ["GET", "https", "enclave", "/v1/models"] {
            vbytes(&mut bytes, part.as_bytes());
        }
        assert_eq!(Request::decode(&bytes, 0).unwrap(), req);
        // …but not inside an item.
        bytes.pop();
        assert_eq!(Request::decode(&bytes, 0), Err(BhttpError::Truncated));
    }

    #[test]
    fn bad_requests_are_refused() {
        let ok = Request::new("POST", "/x", b"hello".to_vec()).encode();
        assert!(matches!(
            Request::decode(&ok, 4),
            Err(BhttpError::TooLarge { .. })
        ));
        let mut trailing = ok.clone();
        trailing.push(1);
        assert_eq!(Request::decode(&trailing, 64), Err(BhttpError::Trailing));
        let mut padded = ok.clone();
        padded.extend_from_slice(&[0; 16]);
        assert!(Request::decode(&padded, 64).is_ok());
        let upper = Request {
            headers: vec![("Bad".into(), vec![])],
            ..Request::new("GET", "/", vec![])
        };
        assert_eq!(
            Request::decode(&upper.encode(), 0),
            Err(BhttpError::FieldName)
        );
        let no_slash = Request::new("GET", "x", vec![]).encode();
        assert_eq!(
            Request::decode(&no_slash, 0),
            Err(BhttpError::Control("path"))
        );
        let response = encode_response(&ResponseHead::new(200, "text/plain"), b"x");
        assert_eq!(Request::decode(&response, 0), Err(BhttpError::Framing(3)));
        // A declared length far beyond the input is truncation, not an allocation.
        assert_eq!(
            Request::decode(&[0x02, 0x44, 0x00, b'G'], 0),
            Err(BhttpError::Truncated)
        );
    }

    #[test]
    fn response_decodes_byte_by_byte() {
        let head = ResponseHead::new(200, "text/event-stream");
        let mut bytes = Vec::new();
        head.encode(&mut bytes);
        encode_chunk(&mut bytes, b"data: one\n\n");
        encode_chunk(&mut bytes, b"");
        encode_chunk(&mut bytes, b"data: two\n\n");
        encode_end(&mut bytes);
        let mut d = ResponseDecoder::new();
        let mut parts = Vec::new();
        for b in &bytes {
            parts.extend(d.push(std::slice::from_ref(b)).unwrap());
        }
        assert!(d.is_done());
        assert_eq!(
            parts,
            vec![
                ResponsePart::Head(head),
                ResponsePart::Data(b"data: one\n\n".to_vec()),
                ResponsePart::Data(b"data: two\n\n".to_vec()),
                ResponsePart::End,
            ]
        );
        assert_eq!(d.push(&[0, 0]), Ok(vec![]));
        assert_eq!(d.push(&[1]), Err(BhttpError::AfterEnd));
    }

    #[test]
    fn informational_responses_are_skipped_and_bad_status_refused() {
        let mut bytes = Vec::new();
        varint(&mut bytes, INDETERMINATE_RESPONSE);
        varint(&mut bytes, 103);
        fields(&mut bytes, &[]);
        varint(&mut bytes, 404);
        fields(&mut bytes, &[]);
        encode_end(&mut bytes);
        let parts = ResponseDecoder::new().push(&bytes).unwrap();
        assert_eq!(
            parts,
            vec![
                ResponsePart::Head(ResponseHead {
                    status: 404,
                    headers: vec![]
                }),
                ResponsePart::End
            ]
        );
        let mut bad = Vec::new();
        varint(&mut bad, INDETERMINATE_RESPONSE);
        varint(&mut bad, 600);
        assert_eq!(
            ResponseDecoder::new().push(&bad),
            Err(BhttpError::Status(600))
        );
    }

    #[test]
    fn varints_round_trip() {
        for v in [
            0,
            63,
            64,
            16383,
            16384,
            (1 << 30) - 1,
            1 << 30,
            (1 << 62) - 1,
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(Reader::new(&out).varint(), Ok(v));
        }
    }
}
