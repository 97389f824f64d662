//! The sealed-model format: a header, then the weights as AES-256-GCM chunks in the STREAM
//! construction (Hoang, Reyhanitabar, Rogaway and Vizár, "Online Authenticated-Encryption and
//! its Nonce-Reuse Misuse-Resistance", CRYPTO 2015, §7), so that the weights can be sealed and
//! unsealed as a stream and any reordering, truncation, extension or header swap fails.
//!
//! ```text
//! header  = magic "NEMODEL\0" | version u16 = 1 | header_len u32 | chunk_size u32
//!         | plaintext_size u64 | plaintext_sha256 [32] | nonce_prefix [7]
//!         | key_id (u16 len, UTF-8) | wrapped_key (u16 len, bytes)
//!         | context: u16 count, then count × (u16 len key, u16 len value), keys sorted, unique
//! chunk i = AES-256-GCM(data key, nonce_i, aad = header bytes, plaintext_i) ‖ tag (16)
//! nonce_i = nonce_prefix (7) ‖ i as u32 BE (4) ‖ 0x01 if i is the last chunk else 0x00 (1)
//! ```
//! All integers are big-endian. Every chunk holds `chunk_size` plaintext bytes but the last,
//! which holds the rest (possibly zero bytes: an empty model is one empty chunk). The chunk
//! count follows from the header, so a reader knows which chunk must be last.
//!
//! The encryption context is what KMS binds the wrapped key to (AWS KMS Developer Guide,
//! "Encryption context"); it must name the model: `model_sha256` (lower-case hex of the
//! plaintext's SHA-256, equal to the header's) and `model_name`.
//!
//! No I/O here: callers hand in bytes and buffers.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::digest::{Context, SHA256};
use std::collections::BTreeMap;
use zeroize::{Zeroize, Zeroizing};

/// First bytes of every sealed file.
pub const MAGIC: [u8; 8] = *b"NEMODEL\0";
/// The format version this code reads and writes.
pub const VERSION: u16 = 1;
/// Default plaintext bytes per chunk.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Smallest and largest chunk sizes accepted.
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
/// See [`MIN_CHUNK_SIZE`].
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Largest header accepted.
pub const MAX_HEADER_LEN: usize = 64 << 10;
/// Largest KMS key id (an ARN or alias) accepted.
pub const MAX_KEY_ID_LEN: usize = 2048;
/// Largest wrapped data key: KMS `CiphertextBlob` is at most 6144 bytes.
pub const MAX_WRAPPED_KEY_LEN: usize = 6144;
/// Most encryption-context pairs, and their total size: KMS allows 8192 bytes in all.
pub const MAX_CONTEXT_PAIRS: usize = 64;
/// See [`MAX_CONTEXT_PAIRS`].
pub const MAX_CONTEXT_BYTES: usize = 8192;
/// Largest plaintext accepted (1 TiB), far beyond any enclave's memory.
pub const MAX_PLAINTEXT_SIZE: u64 = 1 << 40;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Length of the random nonce prefix.
pub const NONCE_PREFIX_LEN: usize = 7;
/// Encryption-context key naming the model's SHA-256 (lower-case hex).
pub const CONTEXT_MODEL_SHA256: &str = "model_sha256";
/// Encryption-context key naming the model.
pub const CONTEXT_MODEL_NAME: &str = "model_name";

/// The header's first bytes: magic, version and the header's own length, which say how much
/// more to read before [`SealedHeader::decode`] ([`SealedHeader::header_len`]).
pub const PREFIX_LEN: usize = 8 + 2 + 4;
const FIXED_LEN: usize = 8 + 2 + 4 + 4 + 8 + 32 + NONCE_PREFIX_LEN;

/// What is wrong with a sealed file, or with sealing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// Not a sealed model.
    #[error("not a sealed model (bad magic)")]
    BadMagic,
    /// A version this code does not read.
    #[error("sealed format version {0} is not supported (this build reads {VERSION})")]
    UnsupportedVersion(u16),
    /// The input ends inside the header.
    #[error("sealed header is truncated")]
    HeaderTruncated,
    /// A header field is out of bounds or inconsistent.
    #[error("sealed header field {field}: {reason}")]
    HeaderField {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A chunk has the wrong length.
    #[error("chunk {index}: {got} bytes, expected {expected}")]
    ChunkLength {
        /// Its index.
        index: u64,
        /// What the header implies.
        expected: usize,
        /// What arrived.
        got: usize,
    },
    /// A chunk fails authentication: tampered, reordered, from another file or another key.
    #[error("chunk {index} failed authentication (tampered, reordered, or another file's)")]
    ChunkAuthentication {
        /// Its index.
        index: u64,
    },
    /// Fewer chunks arrived than the header announces.
    #[error("sealed file is truncated: chunk {next} of {count} is missing")]
    Truncated {
        /// The first missing chunk.
        next: u64,
        /// How many there should be.
        count: u64,
    },
    /// Bytes follow the last chunk.
    #[error("{extra} bytes follow the last chunk")]
    TrailingData {
        /// How many.
        extra: usize,
    },
    /// The decrypted weights do not hash to the header's SHA-256.
    #[error("unsealed model does not match its SHA-256")]
    DigestMismatch,
    /// The output buffer does not fit the plaintext.
    #[error("output buffer of {got} bytes; the model is {expected}")]
    OutputSize {
        /// The plaintext size.
        expected: u64,
        /// The buffer's size.
        got: usize,
    },
    /// The crypto library refused (key setup, random nonce prefix).
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

/// A 256-bit data key. Zeroized on drop; never printed or cloned.
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    /// Takes a key from a buffer, which must be exactly 32 bytes; the source is zeroized.
    pub fn from_slice(bytes: &mut [u8]) -> Result<Self, SealError> {
        let key: [u8; 32] = (&*bytes).try_into().map_err(|_| SealError::HeaderField {
            field: "data key",
            reason: format!("{} bytes, AES-256 needs 32", bytes.len()),
        })?;
        bytes.zeroize();
        Ok(Self(Zeroizing::new(key)))
    }

    fn aead(&self) -> Result<LessSafeKey, SealError> {
        UnboundKey::new(&AES_256_GCM, self.0.as_ref())
            .map(LessSafeKey::new)
            .map_err(|_| SealError::Crypto("AES-256-GCM key setup"))
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// The header's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedHeader {
    /// Plaintext bytes per chunk.
    pub chunk_size: u32,
    /// Size of the weights.
    pub plaintext_size: u64,
    /// SHA-256 of the weights.
    pub plaintext_sha256: [u8; 32],
    /// Random per-file nonce prefix.
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
    /// The KMS key that wrapped the data key.
    pub key_id: String,
    /// KMS `CiphertextBlob` of the data key.
    pub wrapped_key: Vec<u8>,
    /// KMS encryption context (sorted).
    pub context: BTreeMap<String, String>,
}

fn field(field: &'static str, reason: impl Into<String>) -> SealError {
    SealError::HeaderField {
        field,
        reason: reason.into(),
    }
}

/// Lower-case hex.
pub fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SealedHeader {
    /// How many chunks the file has.
    pub fn chunk_count(&self) -> u64 {
        let size = u64::from(self.chunk_size);
        self.plaintext_size.div_ceil(size).max(1)
    }

    /// Plaintext length of chunk `index`.
    pub fn plaintext_len(&self, index: u64) -> usize {
        let size = u64::from(self.chunk_size);
        let start = index.saturating_mul(size);
        let len = self.plaintext_size.saturating_sub(start).min(size);
        usize::try_from(len).unwrap_or(usize::MAX)
    }

    /// Ciphertext length (with tag) of chunk `index`.
    pub fn chunk_len(&self, index: u64) -> usize {
        self.plaintext_len(index).saturating_add(TAG_LEN)
    }

    /// Total size of the sealed file with this header.
    pub fn sealed_size(&self, header_len: usize) -> u64 {
        header_len as u64 + self.plaintext_size + self.chunk_count() * TAG_LEN as u64
    }

    /// The model's name, from the encryption context.
    pub fn model_name(&self) -> Option<&str> {
        self.context.get(CONTEXT_MODEL_NAME).map(String::as_str)
    }

    fn validate(&self) -> Result<(), SealError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(field(
                "chunk_size",
                format!(
                    "{} not in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                    self.chunk_size
                ),
            ));
        }
        if self.plaintext_size > MAX_PLAINTEXT_SIZE {
            return Err(field(
                "plaintext_size",
                format!("{} > {MAX_PLAINTEXT_SIZE}", self.plaintext_size),
            ));
        }
        if self.key_id.is_empty() || self.key_id.len() > MAX_KEY_ID_LEN {
            return Err(field(
                "key_id",
                format!("length {} not in 1..={MAX_KEY_ID_LEN}", self.key_id.len()),
            ));
        }
        if self.wrapped_key.is_empty() || self.wrapped_key.len() > MAX_WRAPPED_KEY_LEN {
            return Err(field(
                "wrapped_key",
                format!(
                    "length {} not in 1..={MAX_WRAPPED_KEY_LEN}",
                    self.wrapped_key.len()
                ),
            ));
        }
        let context_bytes: usize = self.context.iter().map(|(k, v)| k.len() + v.len()).sum();
        if self.context.len() > MAX_CONTEXT_PAIRS || context_bytes > MAX_CONTEXT_BYTES {
            return Err(field(
                "context",
                format!(
                    "{} pairs, {context_bytes} bytes: too large",
                    self.context.len()
                ),
            ));
        }
        if self.context.keys().any(|k| k.is_empty()) {
            return Err(field("context", "empty key"));
        }
        match self.context.get(CONTEXT_MODEL_SHA256) {
            Some(h) if *h == hex_lower(&self.plaintext_sha256) => {}
            Some(_) => {
                return Err(field(
                    "context",
                    "model_sha256 differs from the header's SHA-256",
                ))
            }
            None => return Err(field("context", "model_sha256 is missing")),
        }
        if self.model_name().is_none_or(str::is_empty) {
            return Err(field("context", "model_name is missing"));
        }
        Ok(())
    }

    /// The header bytes. They are also the AAD of every chunk.
    pub fn encode(&self) -> Result<Vec<u8>, SealError> {
        self.validate()?;
        let mut out =
            Vec::with_capacity(FIXED_LEN + 64 + self.key_id.len() + self.wrapped_key.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&[0; 4]); // header_len, patched below
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.plaintext_size.to_be_bytes());
        out.extend_from_slice(&self.plaintext_sha256);
        out.extend_from_slice(&self.nonce_prefix);
        let put = |out: &mut Vec<u8>, bytes: &[u8]| {
            // Lengths were bounded by validate(), all far below u16::MAX.
            out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            out.extend_from_slice(bytes);
        };
        put(&mut out, self.key_id.as_bytes());
        put(&mut out, &self.wrapped_key);
        out.extend_from_slice(&(self.context.len() as u16).to_be_bytes());
        for (k, v) in &self.context {
            put(&mut out, k.as_bytes());
            put(&mut out, v.as_bytes());
        }
        let len = u32::try_from(out.len()).map_err(|_| field("header_len", "too large"))?;
        if out.len() > MAX_HEADER_LEN {
            return Err(field(
                "header_len",
                format!("{} > {MAX_HEADER_LEN}", out.len()),
            ));
        }
        if let Some(slot) = out.get_mut(PREFIX_LEN - 4..PREFIX_LEN) {
            slot.copy_from_slice(&len.to_be_bytes());
        }
        Ok(out)
    }

    /// The whole header's length in bytes, from its first [`PREFIX_LEN`] bytes, with the magic,
    /// the version and the length's bounds checked: how much a reader of a file or a stream
    /// must have before [`SealedHeader::decode`].
    pub fn header_len(prefix: &[u8; PREFIX_LEN]) -> Result<usize, SealError> {
        let mut r = HeaderReader {
            buf: prefix,
            pos: 0,
        };
        if r.take(8)? != MAGIC {
            return Err(SealError::BadMagic);
        }
        let version = r.u16()?;
        if version != VERSION {
            return Err(SealError::UnsupportedVersion(version));
        }
        let header_len = r.u32()? as usize;
        if !(FIXED_LEN + 8..=MAX_HEADER_LEN).contains(&header_len) {
            return Err(field("header_len", format!("{header_len} out of bounds")));
        }
        Ok(header_len)
    }

    /// Reads the header at the start of `bytes`; returns it and its length in bytes.
    /// Only the header is read: chunks are not touched.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), SealError> {
        let Some(prefix) = bytes.first_chunk::<PREFIX_LEN>() else {
            return Err(if bytes.len() >= 8 && bytes.get(..8) != Some(&MAGIC[..]) {
                SealError::BadMagic
            } else {
                SealError::HeaderTruncated
            });
        };
        let header_len = Self::header_len(prefix)?;
        let header = bytes.get(..header_len).ok_or(SealError::HeaderTruncated)?;
        let mut r = HeaderReader {
            buf: header,
            pos: PREFIX_LEN,
        };
        let chunk_size = r.u32()?;
        let plaintext_size = r.u64()?;
        let plaintext_sha256 = r.array::<32>()?;
        let nonce_prefix = r.array::<NONCE_PREFIX_LEN>()?;
        let key_id =
            String::from_utf8(r.vec()?.to_vec()).map_err(|_| field("key_id", "not UTF-8"))?;
        let wrapped_key = r.vec()?.to_vec();
        let pairs = usize::from(r.u16()?);
        if pairs > MAX_CONTEXT_PAIRS {
            return Err(field(
                "context",
                format!("{pairs} pairs > {MAX_CONTEXT_PAIRS}"),
            ));
        }
        let mut context = BTreeMap::new();
        let mut previous: Option<String> = None;
        for _ in 0..pairs {
            let k = String::from_utf8(r.vec()?.to_vec())
                .map_err(|_| field("context", "key not UTF-8"))?;
            let v = String::from_utf8(r.vec()?.to_vec())
                .map_err(|_| field("context", "value not UTF-8"))?;
            // Canonical: strictly increasing keys, so one context has one encoding.
            if previous.as_ref().is_some_and(|p| *p >= k) {
                return Err(field("context", "keys not sorted and unique"));
            }
            previous = Some(k.clone());
            context.insert(k, v);
        }
        if r.pos != header_len {
            return Err(field(
                "header_len",
                format!("{} unused bytes", header_len - r.pos),
            ));
        }
        let h = Self {
            chunk_size,
            plaintext_size,
            plaintext_sha256,
            nonce_prefix,
            key_id,
            wrapped_key,
            context,
        };
        h.validate()?;
        Ok((h, header_len))
    }
}

struct HeaderReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> HeaderReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SealError> {
        let end = self.pos.checked_add(n).ok_or(SealError::HeaderTruncated)?;
        let out = self
            .buf
            .get(self.pos..end)
            .ok_or(SealError::HeaderTruncated)?;
        self.pos = end;
        Ok(out)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SealError> {
        self.take(N)?
            .try_into()
            .map_err(|_| SealError::HeaderTruncated)
    }
    fn u16(&mut self) -> Result<u16, SealError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, SealError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, SealError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn vec(&mut self) -> Result<&'a [u8], SealError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

fn nonce(prefix: &[u8; NONCE_PREFIX_LEN], index: u64, last: bool) -> Result<Nonce, SealError> {
    let counter =
        u32::try_from(index).map_err(|_| field("plaintext_size", "more than 2^32 chunks"))?;
    let mut n = [0u8; NONCE_LEN];
    let (p, rest) = n.split_at_mut(NONCE_PREFIX_LEN);
    p.copy_from_slice(prefix);
    let (c, flag) = rest.split_at_mut(4);
    c.copy_from_slice(&counter.to_be_bytes());
    if let Some(f) = flag.first_mut() {
        *f = u8::from(last);
    }
    Ok(Nonce::assume_unique_for_key(n))
}

/// Encrypts chunks in order.
pub struct Sealer {
    key: LessSafeKey,
    header: SealedHeader,
    header_bytes: Vec<u8>,
    next: u64,
}

impl Sealer {
    /// A sealer for `header` (whose nonce prefix must be fresh and random for this key).
    pub fn new(key: &DataKey, header: SealedHeader) -> Result<Self, SealError> {
        let header_bytes = header.encode()?;
        Ok(Self {
            key: key.aead()?,
            header,
            header_bytes,
            next: 0,
        })
    }

    /// The header bytes, to write before the chunks.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header_bytes
    }

    /// Encrypts the next chunk in place, appending its tag. `buf` must hold exactly that
    /// chunk's plaintext ([`SealedHeader::plaintext_len`]).
    pub fn seal_next(&mut self, buf: &mut Vec<u8>) -> Result<(), SealError> {
        let index = self.next;
        let count = self.header.chunk_count();
        if index >= count {
            return Err(SealError::TrailingData { extra: buf.len() });
        }
        let expected = self.header.plaintext_len(index);
        if buf.len() != expected {
            return Err(SealError::ChunkLength {
                index,
                expected,
                got: buf.len(),
            });
        }
        let n = nonce(&self.header.nonce_prefix, index, index + 1 == count)?;
        self.key
            .seal_in_place_append_tag(n, Aad::from(&self.header_bytes), buf)
            .map_err(|_| SealError::Crypto("AES-256-GCM seal"))?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every chunk was sealed.
    pub fn finish(self) -> Result<(), SealError> {
        let count = self.header.chunk_count();
        if self.next != count {
            return Err(SealError::Truncated {
                next: self.next,
                count,
            });
        }
        Ok(())
    }
}

/// Decrypts chunks in order into one plaintext buffer.
pub struct Unsealer {
    key: LessSafeKey,
    header: SealedHeader,
    header_bytes: Vec<u8>,
    next: u64,
}

impl Unsealer {
    /// An unsealer for the header at the start of `header_bytes` (exactly the header).
    pub fn new(key: &DataKey, header_bytes: &[u8]) -> Result<Self, SealError> {
        let (header, len) = SealedHeader::decode(header_bytes)?;
        if len != header_bytes.len() {
            return Err(field("header_len", "header bytes have a tail"));
        }
        Ok(Self {
            key: key.aead()?,
            header,
            header_bytes: header_bytes.to_vec(),
            next: 0,
        })
    }

    /// The header.
    pub fn header(&self) -> &SealedHeader {
        &self.header
    }

    /// Decrypts the next chunk from `ciphertext` (with its tag) into `out`, which must be
    /// exactly that chunk's plaintext length. Returns the chunk's index.
    pub fn open_next(&mut self, ciphertext: &[u8], out: &mut [u8]) -> Result<u64, SealError> {
        let index = self.next;
        let count = self.header.chunk_count();
        if index >= count {
            return Err(SealError::TrailingData {
                extra: ciphertext.len(),
            });
        }
        let expected = self.header.chunk_len(index);
        if ciphertext.len() != expected || out.len() + TAG_LEN != expected {
            return Err(SealError::ChunkLength {
                index,
                expected,
                got: ciphertext.len(),
            });
        }
        let (body, tag) = ciphertext.split_at(expected - TAG_LEN);
        let n = nonce(&self.header.nonce_prefix, index, index + 1 == count)?;
        if self
            .key
            .open_separate_gather(n, Aad::from(&self.header_bytes), body, tag, out)
            .is_err()
        {
            out.zeroize();
            return Err(SealError::ChunkAuthentication { index });
        }
        self.next += 1;
        Ok(index)
    }

    /// Checks that every chunk was opened.
    pub fn finish(&self) -> Result<(), SealError> {
        let count = self.header.chunk_count();
        if self.next != count {
            return Err(SealError::Truncated {
                next: self.next,
                count,
            });
        }
        Ok(())
    }
}

/// The PCR the enclave measures the model into (DESIGN.md §4.2).
pub const MODEL_PCR: u16 = 16;

/// PCR16 of an enclave that loaded the model with this SHA-256: the enclave extends the
/// zero-initialised PCR once with the 32-byte digest, so PCR16 = SHA-384(0^48 ‖ sha256).
pub fn model_pcr16(model_sha256: &[u8; 32]) -> [u8; 48] {
    let mut ctx = Context::new(&aws_lc_rs::digest::SHA384);
    ctx.update(&[0u8; 48]);
    ctx.update(model_sha256);
    let mut out = [0u8; 48];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&SHA256, data).as_ref());
    out
}

/// Unseals a whole sealed file held in memory into a new buffer, checking size and SHA-256.
pub fn unseal(
    key: &DataKey,
    sealed: &[u8],
    max_plaintext: u64,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let (header, header_len) = SealedHeader::decode(sealed)?;
    let mut out = allocate(&header, max_plaintext)?;
    let header_bytes = sealed.get(..header_len).ok_or(SealError::HeaderTruncated)?;
    let mut unsealer = Unsealer::new(key, header_bytes)?;
    let body = sealed.get(header_len..).unwrap_or(&[]);
    unseal_stream(&mut unsealer, split_chunks(&header, body), &mut out)?;
    Ok(out)
}

/// A zeroed plaintext buffer for `header`'s model, refused before allocating if the model is
/// larger than `max_plaintext` (the host chooses the header, the enclave its memory).
pub fn allocate(
    header: &SealedHeader,
    max_plaintext: u64,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    if header.plaintext_size > max_plaintext {
        return Err(field(
            "plaintext_size",
            format!("{} > the allowed {max_plaintext}", header.plaintext_size),
        ));
    }
    let size = usize::try_from(header.plaintext_size)
        .map_err(|_| field("plaintext_size", "exceeds memory"))?;
    Ok(Zeroizing::new(vec![0u8; size]))
}

/// Splits the bytes after a header into the chunks it announces; a short tail is returned as
/// a short last chunk and any excess as one more chunk, so [`unseal_stream`] names the error.
pub fn split_chunks<'a>(header: &SealedHeader, mut body: &'a [u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    for index in 0..header.chunk_count() {
        if body.is_empty() {
            break;
        }
        let (chunk, rest) = body.split_at(header.chunk_len(index).min(body.len()));
        out.push(chunk);
        body = rest;
    }
    if !body.is_empty() {
        out.push(body);
    }
    out
}

/// Decrypts `chunks`, in order, into `out` (exactly the plaintext size) with `unsealer`,
/// hashing on a second thread, then checks that no chunk is missing or extra and that the
/// plaintext has the header's SHA-256. Decryption and hashing overlap, so the throughput is
/// that of the slower of the two rather than their sum; the plaintext is written once, into
/// its final buffer. On any error `out` is zeroized.
pub fn unseal_stream<C: AsRef<[u8]>>(
    unsealer: &mut Unsealer,
    chunks: impl IntoIterator<Item = C>,
    out: &mut [u8],
) -> Result<(), SealError> {
    let result = unseal_stream_inner(unsealer, chunks, out);
    if result.is_err() {
        out.zeroize();
    }
    result
}

fn unseal_stream_inner<C: AsRef<[u8]>>(
    unsealer: &mut Unsealer,
    chunks: impl IntoIterator<Item = C>,
    out: &mut [u8],
) -> Result<(), SealError> {
    let header = unsealer.header().clone();
    if out.len() as u64 != header.plaintext_size {
        return Err(SealError::OutputSize {
            expected: header.plaintext_size,
            got: out.len(),
        });
    }
    let chunk_size = header.chunk_size as usize;
    let mut pieces: Vec<&mut [u8]> = out.chunks_mut(chunk_size.max(1)).collect();
    if pieces.is_empty() {
        pieces.push(&mut []); // an empty model is one empty chunk
    }
    let digest = std::thread::scope(|scope| {
        // Bounded: the decryptor runs at most a few chunks ahead of the hasher.
        let (tx, rx) = std::sync::mpsc::sync_channel::<&[u8]>(4);
        let hasher = scope.spawn(move || {
            let mut ctx = Context::new(&SHA256);
            for piece in rx {
                ctx.update(piece);
            }
            ctx.finish()
        });
        let result = decrypt_all(unsealer, &header, chunks, pieces, &tx);
        drop(tx);
        let digest = hasher
            .join()
            .map_err(|_| SealError::Crypto("hashing thread panicked"));
        result.and(digest)
    })?;
    unsealer.finish()?;
    if digest.as_ref() != header.plaintext_sha256 {
        return Err(SealError::DigestMismatch);
    }
    Ok(())
}

/// Decrypts each chunk into its piece of the output and hands the piece to the hasher.
fn decrypt_all<'a, C: AsRef<[u8]>>(
    unsealer: &mut Unsealer,
    header: &SealedHeader,
    chunks: impl IntoIterator<Item = C>,
    pieces: Vec<&'a mut [u8]>,
    tx: &std::sync::mpsc::SyncSender<&'a [u8]>,
) -> Result<(), SealError> {
    let count = header.chunk_count();
    let mut chunks = chunks.into_iter();
    for (index, piece) in (0..count).zip(pieces) {
        let chunk = chunks
            .next()
            .ok_or(SealError::Truncated { next: index, count })?;
        unsealer.open_next(chunk.as_ref(), piece)?;
        let done: &'a [u8] = piece;
        tx.send(done)
            .map_err(|_| SealError::Crypto("hashing thread stopped"))?;
    }
    if let Some(extra) = chunks.next() {
        return Err(SealError::TrailingData {
            extra: extra.as_ref().len(),
        });
    }
    Ok(())
}

/// Seals `plaintext` held in memory (tests and small models; `host seal` streams instead).
pub fn seal(
    key: &DataKey,
    mut header: SealedHeader,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    header.plaintext_size = plaintext.len() as u64;
    header.plaintext_sha256 = sha256(plaintext);
    header.context.insert(
        CONTEXT_MODEL_SHA256.into(),
        hex_lower(&header.plaintext_sha256),
    );
    let mut sealer = Sealer::new(key, header.clone())?;
    let mut out = Vec::with_capacity(
        usize::try_from(header.sealed_size(sealer.header_bytes().len())).unwrap_or(0),
    );
    out.extend_from_slice(sealer.header_bytes());
    let chunk_size = header.chunk_size as usize;
    let mut pieces: Vec<&[u8]> = plaintext.chunks(chunk_size).collect();
    if pieces.is_empty() {
        pieces.push(&[]);
    }
    let mut buf = Vec::with_capacity(chunk_size + TAG_LEN);
    for piece in pieces {
        buf.clear();
        buf.extend_from_slice(piece);
        sealer.seal_next(&mut buf)?;
        out.extend_from_slice(&buf);
    }
    buf.zeroize();
    sealer.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> DataKey {
        DataKey::from_slice(&mut [byte; 32]).unwrap()
    }

    fn header(chunk_size: u32) -> SealedHeader {
        SealedHeader {
            chunk_size,
            plaintext_size: 0,
            plaintext_sha256: [0; 32],
            nonce_prefix: [9; NONCE_PREFIX_LEN],
            key_id: "arn:aws:kms:local-1:000000000000:key/test".into(),
            wrapped_key: vec![1, 2, 3],
            context: [(CONTEXT_MODEL_NAME.to_string(), "test-model".to_string())].into(),
        }
    }

    fn model(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// (sealed file, header length) for a model of `len` bytes in 4 KiB chunks.
    fn sealed(len: usize) -> (Vec<u8>, usize, Vec<u8>) {
        let m = model(len);
        let s = seal(&key(7), header(MIN_CHUNK_SIZE), &m).unwrap();
        let (_, hl) = SealedHeader::decode(&s).unwrap();
        (s, hl, m)
    }

    const CHUNK: usize = MIN_CHUNK_SIZE as usize + TAG_LEN;

    #[test]
    fn round_trips_at_every_boundary() {
        for len in [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 5] {
            let (s, _, m) = sealed(len);
            let out = unseal(&key(7), &s, u64::MAX).unwrap();
            assert_eq!(&out[..], &m[..], "{len}");
        }
    }

    #[test]
    fn header_round_trips_and_is_strict() {
        let (s, hl, _) = sealed(10);
        let (h, len) = SealedHeader::decode(&s).unwrap();
        assert_eq!(len, hl);
        assert_eq!(h.encode().unwrap(), &s[..hl]);
        assert_eq!(
            SealedHeader::decode(b"NOTMODEL\0\0\0\0\0\0\0\0"),
            Err(SealError::BadMagic)
        );
        let mut v2 = s.clone();
        v2[9] = 2;
        assert_eq!(
            SealedHeader::decode(&v2),
            Err(SealError::UnsupportedVersion(2))
        );
        for cut in 0..hl {
            assert!(SealedHeader::decode(&s[..cut]).is_err(), "{cut}");
        }
        // The prefix alone says how long the header is, and is checked like the whole.
        let prefix = |b: &[u8]| *b.first_chunk::<PREFIX_LEN>().unwrap();
        assert_eq!(SealedHeader::header_len(&prefix(&s)), Ok(hl));
        assert_eq!(
            SealedHeader::header_len(&prefix(&v2)),
            Err(SealError::UnsupportedVersion(2))
        );
        let mut huge = prefix(&s);
        huge[PREFIX_LEN - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            SealedHeader::header_len(&huge),
            Err(SealError::HeaderField {
                field: "header_len",
                ..
            })
        ));
        let mut magic = prefix(&s);
        magic[0] ^= 1;
        assert_eq!(SealedHeader::header_len(&magic), Err(SealError::BadMagic));
        // A context whose model_sha256 disagrees with the header is refused.
        let mut h2 = h.clone();
        h2.context
            .insert(CONTEXT_MODEL_SHA256.into(), "00".repeat(32));
        assert!(matches!(
            h2.encode(),
            Err(SealError::HeaderField {
                field: "context",
                ..
            })
        ));
    }

    #[test]
    fn bit_flips_name_the_chunk() {
        let (s, hl, _) = sealed(3 * 4096 + 5);
        let mut t = s.clone();
        t[hl + CHUNK + 100] ^= 1;
        assert_eq!(
            unseal(&key(7), &t, u64::MAX).unwrap_err(),
            SealError::ChunkAuthentication { index: 1 }
        );
        let mut t = s.clone();
        let last = t.len() - 1;
        t[last] ^= 0x80;
        assert_eq!(
            unseal(&key(7), &t, u64::MAX).unwrap_err(),
            SealError::ChunkAuthentication { index: 3 }
        );
    }

    #[test]
    fn reordered_dropped_duplicated_appended_chunks_fail() {
        let (s, hl, _) = sealed(3 * 4096 + 5);
        let chunks: Vec<&[u8]> = vec![
            &s[hl..hl + CHUNK],
            &s[hl + CHUNK..hl + 2 * CHUNK],
            &s[hl + 2 * CHUNK..hl + 3 * CHUNK],
            &s[hl + 3 * CHUNK..],
        ];
        let build = |order: &[usize]| {
            let mut out = s[..hl].to_vec();
            for &i in order {
                out.extend_from_slice(chunks[i]);
            }
            out
        };
        let k = key(7);
        assert_eq!(
            unseal(&k, &build(&[1, 0, 2, 3]), u64::MAX).unwrap_err(),
            SealError::ChunkAuthentication { index: 0 }
        );
        assert_eq!(
            unseal(&k, &build(&[0, 2, 3]), u64::MAX).unwrap_err(),
            SealError::ChunkAuthentication { index: 1 }
        );
        assert_eq!(
            unseal(&k, &build(&[0, 0, 2, 3]), u64::MAX).unwrap_err(),
            SealError::ChunkAuthentication { index: 1 }
        );
        // Dropping the last chunk: the third (full-size, not flagged last) is missing its end.
        assert_eq!(
            unseal(&k, &build(&[0, 1, 2]), u64::MAX).unwrap_err(),
            SealError::Truncated { next: 3, count: 4 }
        );
        let mut appended = s.clone();
        appended.extend_from_slice(chunks[3]);
        assert!(matches!(
            unseal(&k, &appended, u64::MAX).unwrap_err(),
            SealError::TrailingData { .. }
        ));
        // Truncated inside a chunk.
        assert!(matches!(
            unseal(&k, &s[..s.len() - 3], u64::MAX).unwrap_err(),
            SealError::ChunkLength { index: 3, .. }
        ));
    }

    #[test]
    fn a_header_claiming_fewer_chunks_fails() {
        // Dropping the last full chunk and shrinking the header to match: the header is the
        // AAD, and chunk 0 was sealed as "not last", so it fails either way.
        let (s, hl, _) = sealed(2 * 4096);
        let (mut h, _) = SealedHeader::decode(&s).unwrap();
        h.plaintext_size = 4096;
        // The header changes, so so does the AAD: every chunk fails.
        let forged_header = {
            let mut h2 = h.clone();
            h2.context
                .insert(CONTEXT_MODEL_SHA256.into(), hex_lower(&h2.plaintext_sha256));
            h2.encode().unwrap()
        };
        let mut t = forged_header;
        t.extend_from_slice(&s[hl..hl + CHUNK]);
        assert_eq!(
            unseal(&key(7), &t, u64::MAX).unwrap_err(),
            SealError::ChunkAuthentication { index: 0 }
        );
    }

    #[test]
    fn swapped_header_or_wrong_key_fails() {
        let (a, ha, _) = sealed(5000);
        let b = seal(
            &key(7),
            header(MIN_CHUNK_SIZE),
            &model(5000).iter().map(|x| x ^ 1).collect::<Vec<_>>(),
        )
        .unwrap();
        let (_, hb) = SealedHeader::decode(&b).unwrap();
        let mut swapped = b[..hb].to_vec();
        swapped.extend_from_slice(&a[ha..]);
        assert_eq!(
            unseal(&key(7), &swapped, u64::MAX).unwrap_err(),
            SealError::ChunkAuthentication { index: 0 }
        );
        assert_eq!(
            unseal(&key(8), &a, u64::MAX).unwrap_err(),
            SealError::ChunkAuthentication { index: 0 }
        );
    }

    #[test]
    fn size_limit_is_checked_before_allocating() {
        let (s, _, _) = sealed(5000);
        assert!(matches!(
            unseal(&key(7), &s, 4999),
            Err(SealError::HeaderField {
                field: "plaintext_size",
                ..
            })
        ));
    }

    #[test]
    fn data_key_is_taken_and_redacted() {
        let mut raw = [5u8; 32];
        let k = DataKey::from_slice(&mut raw).unwrap();
        assert_eq!(raw, [0; 32], "source zeroized");
        assert_eq!(format!("{k:?}"), "DataKey(<redacted>)");
        assert!(DataKey::from_slice(&mut [0u8; 16]).is_err());
    }
}
