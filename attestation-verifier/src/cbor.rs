//! A strict CBOR reader (RFC 8949) for the one profile attestation documents use.
//!
//! It reads item heads one at a time and never builds a generic value tree, so nesting is
//! bounded by the schema the caller walks, not by the input. It refuses what the profile
//! never needs: non-minimal length heads (§4.2.1), reserved additional-information values,
//! indefinite-length ("chunked") strings, floats and simple values other than `null`, and
//! lengths that run past the end of the input. Indefinite-length arrays and maps are allowed
//! because real NSMs emit them (2026 documents use an indefinite payload map).

use std::fmt;

/// What is wrong with the CBOR, and at which byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CborError {
    /// Offset of the offending item's first byte.
    pub offset: usize,
    /// What is wrong.
    pub kind: CborErrorKind,
}

/// The kinds of CBOR error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CborErrorKind {
    /// The input ends inside an item.
    Truncated,
    /// A length or value is not encoded in its shortest form.
    NonMinimal,
    /// Additional information 28-30, or an indefinite length where none is allowed.
    Reserved,
    /// An indefinite-length byte or text string.
    ChunkedString,
    /// A floating-point number or a simple value other than null.
    FloatOrSimple,
    /// A text string that is not UTF-8.
    InvalidUtf8,
    /// Bytes follow the last item.
    TrailingBytes,
    /// A different type was expected here.
    UnexpectedType(&'static str),
}

impl fmt::Display for CborError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            CborErrorKind::Truncated => "input ends inside an item",
            CborErrorKind::NonMinimal => "non-minimal length encoding",
            CborErrorKind::Reserved => "reserved or misplaced additional information",
            CborErrorKind::ChunkedString => "indefinite-length string",
            CborErrorKind::FloatOrSimple => "float or simple value other than null",
            CborErrorKind::InvalidUtf8 => "text string is not UTF-8",
            CborErrorKind::TrailingBytes => "trailing bytes after the last item",
            CborErrorKind::UnexpectedType(t) => {
                return write!(f, "expected {t} at byte {}", self.offset)
            }
        };
        write!(f, "{what} at byte {}", self.offset)
    }
}

/// One item head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Head {
    Uint(u64),
    NegInt,
    Bytes(usize),
    Text(usize),
    /// `None`: indefinite length.
    Array(Option<u64>),
    Map(Option<u64>),
    Tag(u64),
    Null,
    Bool,
    /// The "break" stop code ending an indefinite container.
    Break,
}

/// A cursor over a byte slice.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn err(&self, offset: usize, kind: CborErrorKind) -> CborError {
        CborError { offset, kind }
    }

    fn take(&mut self, n: usize, start: usize) -> Result<&'a [u8], CborError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(self.err(start, CborErrorKind::Truncated))?;
        let out = self
            .buf
            .get(self.pos..end)
            .ok_or(self.err(start, CborErrorKind::Truncated))?;
        self.pos = end;
        Ok(out)
    }

    /// Peeks at the next byte without consuming it.
    pub(crate) fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// Reads one head. Strings' contents are not consumed: see [`Reader::bytes`].
    pub(crate) fn head(&mut self) -> Result<(usize, Head), CborError> {
        let start = self.pos;
        let initial = *self
            .take(1, start)?
            .first()
            .ok_or(self.err(start, CborErrorKind::Truncated))?;
        let major = initial >> 5;
        let info = initial & 0x1f;
        let arg: Option<u64> = match info {
            0..=23 => Some(u64::from(info)),
            24..=27 => {
                let n = 1usize << (info - 24);
                let bytes = self.take(n, start)?;
                let v = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
                // Shortest form (RFC 8949 §4.2.1). For major type 7, info 24 with a value
                // below 32 is not well-formed at all (§3.3); floats are refused below anyway.
                let minimal = match info {
                    24 => v >= 24,
                    25 => v > 0xff,
                    26 => v > 0xffff,
                    _ => v > 0xffff_ffff,
                };
                if major != 7 && !minimal {
                    return Err(self.err(start, CborErrorKind::NonMinimal));
                }
                Some(v)
            }
            28..=30 => return Err(self.err(start, CborErrorKind::Reserved)),
            _ => None, // 31: indefinite length or break
        };
        let len =
            |v: u64| usize::try_from(v).map_err(|_| self.err(start, CborErrorKind::Truncated));
        let head = match (major, arg) {
            (0, Some(v)) => Head::Uint(v),
            (1, Some(_)) => Head::NegInt,
            (2, Some(v)) => Head::Bytes(len(v)?),
            (3, Some(v)) => Head::Text(len(v)?),
            (2 | 3, None) => return Err(self.err(start, CborErrorKind::ChunkedString)),
            (4, a) => Head::Array(a),
            (5, a) => Head::Map(a),
            (6, Some(v)) => Head::Tag(v),
            (7, None) => Head::Break,
            (7, Some(20 | 21)) if info < 24 => Head::Bool,
            (7, Some(22)) if info < 24 => Head::Null,
            (7, _) => return Err(self.err(start, CborErrorKind::FloatOrSimple)),
            _ => return Err(self.err(start, CborErrorKind::Reserved)),
        };
        Ok((start, head))
    }

    /// Reads a definite-length byte string.
    pub(crate) fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], CborError> {
        match self.head()? {
            (start, Head::Bytes(n)) => self.take(n, start),
            (start, _) => Err(self.err(start, CborErrorKind::UnexpectedType(what))),
        }
    }

    /// Reads a byte string, or `null` as `None`.
    pub(crate) fn nullable_bytes(
        &mut self,
        what: &'static str,
    ) -> Result<Option<&'a [u8]>, CborError> {
        match self.head()? {
            (start, Head::Bytes(n)) => self.take(n, start).map(Some),
            (_, Head::Null) => Ok(None),
            (start, _) => Err(self.err(start, CborErrorKind::UnexpectedType(what))),
        }
    }

    /// Reads a text string.
    pub(crate) fn text(&mut self, what: &'static str) -> Result<&'a str, CborError> {
        match self.head()? {
            (start, Head::Text(n)) => {
                let raw = self.take(n, start)?;
                std::str::from_utf8(raw).map_err(|_| self.err(start, CborErrorKind::InvalidUtf8))
            }
            (start, _) => Err(self.err(start, CborErrorKind::UnexpectedType(what))),
        }
    }

    /// Reads an unsigned integer.
    pub(crate) fn uint(&mut self, what: &'static str) -> Result<u64, CborError> {
        match self.head()? {
            (_, Head::Uint(v)) => Ok(v),
            (start, _) => Err(self.err(start, CborErrorKind::UnexpectedType(what))),
        }
    }

    /// Reads the text-string contents whose head was already read.
    pub(crate) fn text_body(&mut self, start: usize, n: usize) -> Result<&'a [u8], CborError> {
        self.take(n, start)
    }

    /// Succeeds only at the end of the input.
    pub(crate) fn finish(&self) -> Result<(), CborError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.err(self.pos, CborErrorKind::TrailingBytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(bytes: &[u8]) -> Result<Head, CborErrorKind> {
        Reader::new(bytes)
            .head()
            .map(|(_, h)| h)
            .map_err(|e| e.kind)
    }

    #[test]
    fn minimal_heads_are_enforced() {
        assert_eq!(heads(&[0x17]), Ok(Head::Uint(23)));
        assert_eq!(heads(&[0x18, 0x17]), Err(CborErrorKind::NonMinimal));
        assert_eq!(heads(&[0x18, 0x18]), Ok(Head::Uint(24)));
        assert_eq!(heads(&[0x19, 0x00, 0xff]), Err(CborErrorKind::NonMinimal));
        assert_eq!(heads(&[0x5a, 0, 0, 0, 4]), Err(CborErrorKind::NonMinimal));
        assert_eq!(
            heads(&[0x1b, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(CborErrorKind::NonMinimal)
        );
        assert_eq!(heads(&[0x1c]), Err(CborErrorKind::Reserved));
    }

    #[test]
    fn refused_items() {
        assert_eq!(heads(&[0x5f]), Err(CborErrorKind::ChunkedString));
        assert_eq!(heads(&[0x7f]), Err(CborErrorKind::ChunkedString));
        assert_eq!(heads(&[0xf9, 0, 0]), Err(CborErrorKind::FloatOrSimple));
        assert_eq!(heads(&[0xf7]), Err(CborErrorKind::FloatOrSimple));
        assert_eq!(heads(&[0xf6]), Ok(Head::Null));
        assert_eq!(heads(&[0xbf]), Ok(Head::Map(None)));
        assert_eq!(heads(&[0x3f]), Err(CborErrorKind::Reserved));
        assert_eq!(heads(&[0xdf]), Err(CborErrorKind::Reserved));
    }

    #[test]
    fn lengths_past_the_end_are_truncation() {
        let mut r = Reader::new(&[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(r.bytes("x").unwrap_err().kind, CborErrorKind::Truncated);
        let mut r = Reader::new(&[0x43, 1, 2]);
        assert_eq!(r.bytes("x").unwrap_err().kind, CborErrorKind::Truncated);
        assert_eq!(heads(&[0x19, 0x01]), Err(CborErrorKind::Truncated));
        assert_eq!(heads(&[]), Err(CborErrorKind::Truncated));
    }

    #[test]
    fn trailing_bytes() {
        let mut r = Reader::new(&[0x01, 0x02]);
        r.uint("x").unwrap();
        assert_eq!(r.finish().unwrap_err().kind, CborErrorKind::TrailingBytes);
    }
}
