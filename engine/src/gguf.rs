//! Reading a GGUF model from memory: a bounds-checked pre-pass, then candle's GGUF parser, then
//! typed access to the metadata and to the tensors' byte ranges in the caller's buffer.
//!
//! The format is GGML's GGUF v2/v3 (ggml/docs/gguf.md). candle's reader bounds every length by
//! the bytes left, but divides by `general.alignment` unchecked; the pre-pass walks the
//! key/value section first so that a zero or absurd alignment is an error, not a panic.

use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use std::io::Cursor;
use std::ops::Range;

const MAGIC: &[u8; 4] = b"GGUF";
/// Deepest nesting of arrays accepted (GGUF uses one level in practice).
const MAX_DEPTH: usize = 4;
/// Largest `general.alignment` accepted; GGML writes 32.
const MAX_ALIGNMENT: u64 = 1 << 16;

/// A parsed GGUF file whose tensors are byte ranges of the buffer it was parsed from.
#[derive(Debug)]
pub struct Gguf {
    content: Content,
    len: usize,
}

/// One tensor: its GGML type, its shape as (rows, columns) of a row-major matrix (a vector is
/// one row), and where its bytes are in the buffer.
#[derive(Clone, Debug)]
pub struct TensorRef {
    pub name: String,
    pub dtype: GgmlDType,
    pub rows: usize,
    pub cols: usize,
    pub range: Range<usize>,
}

impl Gguf {
    /// Parses the header, metadata and tensor table of `bytes`, and checks that every tensor
    /// lies inside it.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        prescan(bytes)?;
        let content = Content::read(&mut Cursor::new(bytes))
            .map_err(|e| Error::Format(format!("GGUF: {e}")))?;
        let gguf = Gguf {
            content,
            len: bytes.len(),
        };
        for name in gguf.content.tensor_infos.keys() {
            gguf.tensor(name)?;
        }
        Ok(gguf)
    }

    /// candle's view of the file (used to dequantize tensor types without a native kernel).
    pub fn content(&self) -> &Content {
        &self.content
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(Error::Format(format!(
                "GGUF metadata `{key}` is not a string"
            ))),
            None => Err(Error::Format(format!("GGUF metadata `{key}` is missing"))),
        }
    }

    pub fn opt_str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// An unsigned integer of any width.
    pub fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?
            .ok_or_else(|| Error::Format(format!("GGUF metadata `{key}` is missing")))
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        let v = match self.get(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n = match v {
            Value::U8(n) => Some(u64::from(*n)),
            Value::U16(n) => Some(u64::from(*n)),
            Value::U32(n) => Some(u64::from(*n)),
            Value::U64(n) => Some(*n),
            Value::I8(n) => u64::try_from(*n).ok(),
            Value::I16(n) => u64::try_from(*n).ok(),
            Value::I32(n) => u64::try_from(*n).ok(),
            Value::I64(n) => u64::try_from(*n).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| {
            Error::Format(format!(
                "GGUF metadata `{key}` is not a non-negative integer"
            ))
        })
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x)),
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(_) => Err(Error::Format(format!(
                "GGUF metadata `{key}` is not a float"
            ))),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn array(&self, key: &str) -> Result<&[Value]> {
        match self.get(key) {
            Some(Value::Array(a)) => Ok(a),
            Some(_) => Err(Error::Format(format!(
                "GGUF metadata `{key}` is not an array"
            ))),
            None => Err(Error::Format(format!("GGUF metadata `{key}` is missing"))),
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The tensor `name`, with its byte range checked against the buffer.
    pub fn tensor(&self, name: &str) -> Result<TensorRef> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::Format(format!("GGUF tensor `{name}` is missing")))?;
        let dims = info.shape.dims();
        let (rows, cols) = match dims {
            [cols] => (1, *cols),
            [rows, cols] => (*rows, *cols),
            _ => {
                return Err(Error::Format(format!(
                    "GGUF tensor `{name}` has shape {dims:?}; only vectors and matrices are used"
                )))
            }
        };
        let bad = || {
            Error::Format(format!(
                "GGUF tensor `{name}` ({dims:?}) does not fit in the file"
            ))
        };
        let elems = rows.checked_mul(cols).ok_or_else(bad)?;
        let block = info.ggml_dtype.block_size();
        if block == 0 || cols % block != 0 {
            return Err(Error::Format(format!(
                "GGUF tensor `{name}`: {cols} columns is not a multiple of {:?}'s block of {block}",
                info.ggml_dtype
            )));
        }
        let size = (elems / block)
            .checked_mul(info.ggml_dtype.type_size())
            .ok_or_else(bad)?;
        let start = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(bad)?;
        let end = start.checked_add(size).ok_or_else(bad)?;
        if end > self.len {
            return Err(bad());
        }
        Ok(TensorRef {
            name: name.to_string(),
            dtype: info.ggml_dtype,
            rows,
            cols,
            range: start..end,
        })
    }
}

/// Walks the header and the key/value section with explicit bounds, and checks
/// `general.alignment`, before candle parses the file.
fn prescan(bytes: &[u8]) -> Result<()> {
    let mut r = Reader { bytes, pos: 0 };
    if r.take(4)? != MAGIC {
        return Err(Error::Format("not a GGUF file (bad magic)".into()));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(Error::Format(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        )));
    }
    let _tensors = r.u64()?;
    let kvs = r.u64()?;
    for _ in 0..kvs {
        // candle drops a key's trailing NULs ("in practice this happens"), so
        // `general.alignment\0` is the same key to it and must be to us.
        let mut key = r.string()?;
        while let Some((0, rest)) = key.split_last() {
            key = rest;
        }
        let ty = r.u32()?;
        if key == b"general.alignment" {
            let align = match ty {
                4 => u64::from(r.u32()?),
                _ => {
                    return Err(Error::Format(
                        "GGUF `general.alignment` must be a u32".into(),
                    ))
                }
            };
            if align == 0 || align % 8 != 0 || align > MAX_ALIGNMENT {
                return Err(Error::Format(format!(
                    "GGUF `general.alignment` {align} is not a multiple of 8 up to {MAX_ALIGNMENT}"
                )));
            }
        } else {
            r.skip_value(ty, 0)?;
        }
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| Error::Format("GGUF metadata is truncated".into()))?;
        let out = self.bytes.get(self.pos..end).unwrap_or_default();
        self.pos = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    fn string(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()?;
        self.take(n)
    }

    fn skip_value(&mut self, ty: u32, depth: usize) -> Result<()> {
        match ty {
            0 | 1 | 7 => self.take(1).map(drop),
            2 | 3 => self.take(2).map(drop),
            4..=6 => self.take(4).map(drop),
            10..=12 => self.take(8).map(drop),
            8 => self.string().map(drop),
            9 if depth < MAX_DEPTH => {
                let item = self.u32()?;
                let count = self.u64()?;
                // Every item takes at least one byte, so a count beyond the bytes left is a lie.
                if count > (self.bytes.len() - self.pos) as u64 {
                    return Err(Error::Format("GGUF array is longer than the file".into()));
                }
                for _ in 0..count {
                    self.skip_value(item, depth + 1)?;
                }
                Ok(())
            }
            9 => Err(Error::Format("GGUF arrays are nested too deeply".into())),
            other => Err(Error::Format(format!("GGUF value type {other} is unknown"))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(kvs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        for (k, ty, v) in kvs {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
            b.extend(ty.to_le_bytes());
            b.extend(v);
        }
        b
    }

    #[test]
    fn zero_alignment_is_an_error_not_a_panic() {
        let b = header(&[("general.alignment", 4, 0u32.to_le_bytes().to_vec())]);
        let e = Gguf::parse(&b).unwrap_err().to_string();
        assert!(e.contains("alignment"), "{e}");
    }

    #[test]
    fn an_alignment_key_with_trailing_nuls_is_checked_too() {
        for key in ["general.alignment\0", "general.alignment\0\0\0"] {
            let b = header(&[(key, 4, 0u32.to_le_bytes().to_vec())]);
            let e = Gguf::parse(&b).unwrap_err().to_string();
            assert!(e.contains("alignment"), "{key:?}: {e}");
            // candle reads a u8 alignment as well; we accept only the u32 GGML writes.
            let b = header(&[(key, 0, vec![0u8])]);
            let e = Gguf::parse(&b).unwrap_err().to_string();
            assert!(e.contains("must be a u32"), "{key:?}: {e}");
        }
    }

    #[test]
    fn a_good_empty_file_parses() {
        let b = header(&[("general.alignment", 4, 32u32.to_le_bytes().to_vec())]);
        let g = Gguf::parse(&b).unwrap();
        assert!(!g.has_tensor("x"));
    }

    #[test]
    fn lying_lengths_are_errors() {
        let mut b = header(&[(
            "k",
            9,
            [8u32.to_le_bytes().to_vec(), u64::MAX.to_le_bytes().to_vec()].concat(),
        )]);
        assert!(Gguf::parse(&b).is_err());
        b.truncate(10);
        assert!(Gguf::parse(&b).is_err());
        assert!(Gguf::parse(b"GGUF\x01\0\0\0")
            .unwrap_err()
            .to_string()
            .contains("version 1"));
        assert!(Gguf::parse(b"").is_err());
    }
}
