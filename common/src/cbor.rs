//! A minimal, deterministic CBOR encoder (RFC 8949 §4.2.1: shortest heads, definite lengths).
//!
//! It writes exactly what this workspace emits: unsigned integers, byte and text strings,
//! arrays, maps and `null`. Decoding untrusted CBOR is the attestation verifier's job, with
//! its own strict reader; this side only ever produces bytes.

/// CBOR major types (RFC 8949 §3.1).
#[derive(Clone, Copy)]
enum Major {
    Unsigned = 0,
    Bytes = 2,
    Text = 3,
    Array = 4,
    Map = 5,
}

/// Appends CBOR items to a growing buffer.
#[derive(Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty encoder with `capacity` bytes reserved.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
        }
    }

    /// The encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    fn head(&mut self, major: Major, value: u64) -> &mut Self {
        let m = (major as u8) << 5;
        // Shortest form, as deterministic encoding requires (RFC 8949 §4.2.1).
        match value {
            0..=23 => self.buf.push(m | value as u8),
            24..=0xff => self.buf.extend_from_slice(&[m | 24, value as u8]),
            0x100..=0xffff => {
                self.buf.push(m | 25);
                self.buf.extend_from_slice(&(value as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.buf.push(m | 26);
                self.buf.extend_from_slice(&(value as u32).to_be_bytes());
            }
            _ => {
                self.buf.push(m | 27);
                self.buf.extend_from_slice(&value.to_be_bytes());
            }
        }
        self
    }

    /// An unsigned integer.
    pub fn uint(&mut self, value: u64) -> &mut Self {
        self.head(Major::Unsigned, value)
    }

    /// A byte string.
    pub fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.head(Major::Bytes, value.len() as u64);
        self.buf.extend_from_slice(value);
        self
    }

    /// A text string.
    pub fn text(&mut self, value: &str) -> &mut Self {
        self.head(Major::Text, value.len() as u64);
        self.buf.extend_from_slice(value.as_bytes());
        self
    }

    /// The head of an array of `len` items; the caller writes the items next.
    pub fn array(&mut self, len: usize) -> &mut Self {
        self.head(Major::Array, len as u64)
    }

    /// The head of a map of `len` pairs; the caller writes key, value, key, value...
    pub fn map(&mut self, len: usize) -> &mut Self {
        self.head(Major::Map, len as u64)
    }

    /// The simple value `null` (RFC 8949 §3.3).
    pub fn null(&mut self) -> &mut Self {
        self.buf.push(0xf6);
        self
    }

    /// A byte string, or `null` when absent.
    pub fn opt_bytes(&mut self, value: Option<&[u8]>) -> &mut Self {
        match value {
            Some(v) => self.bytes(v),
            None => self.null(),
        }
    }

    /// Bytes that are already a complete CBOR item.
    pub fn raw(&mut self, item: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(item);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_shortest() {
        // RFC 8949 Appendix A examples.
        let cases: [(u64, &[u8]); 7] = [
            (0, &[0x00]),
            (23, &[0x17]),
            (24, &[0x18, 0x18]),
            (255, &[0x18, 0xff]),
            (256, &[0x19, 0x01, 0x00]),
            (1_000_000, &[0x1a, 0x00, 0x0f, 0x42, 0x40]),
            (
                1_000_000_000_000,
                &[0x1b, 0, 0, 0, 0xe8, 0xd4, 0xa5, 0x10, 0x00],
            ),
        ];
        for (value, want) in cases {
            let mut e = Encoder::new();
            e.uint(value);
            assert_eq!(e.into_bytes(), want, "{value}");
        }
    }

    #[test]
    fn strings_and_containers() {
        let mut e = Encoder::new();
        e.map(2).text("a").bytes(&[1, 2]).text("b").array(1).null();
        assert_eq!(
            e.into_bytes(),
            [0xa2, 0x61, b'a', 0x42, 1, 2, 0x61, b'b', 0x81, 0xf6]
        );
    }

    #[test]
    fn matches_serde_cbor() {
        let value = vec![serde_bytes::ByteBuf::from(vec![7u8; 300])];
        let mut e = Encoder::new();
        e.array(1).bytes(&[7u8; 300]);
        assert_eq!(e.into_bytes(), serde_cbor::to_vec(&value).unwrap());
    }
}
