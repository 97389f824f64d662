//! The tokenizer, built from the GGUF's own vocabulary (`tokenizer.ggml.*`) so that token ids
//! equal llama.cpp's for the same text, special tokens included: byte-level BPE (`gpt2`) with
//! the `tokenizers` crate, and SentencePiece (`llama`: Gemma, Llama 2, Mistral's first
//! models) as llama.cpp's `llm_tokenizer_spm` does it; and the byte-exact, UTF-8-safe
//! detokenizer used for streaming.
//!
//! SentencePiece here is llama.cpp's algorithm, written out (llama-vocab.cpp): spaces become
//! U+2581, the text is split into UTF-8 characters, and the adjacent pair whose concatenation
//! is the highest-scoring token in the vocabulary is merged first (the leftmost on ties) until
//! no pair forms a token; characters that never became a token are emitted as `<0xXX>` byte
//! tokens. The `tokenizers` crate has no model with these semantics (its BPE wants a merge
//! list, which for a 262,144-token vocabulary would cost tens of MB to derive and hold).
//!
//! candle's `TokenizerFromGguf` does not know llama.cpp's `smollm` pre-tokenizer and adds a
//! prefix space (`<|im_start|>system` became ` system`); here each pre-tokenizer type maps to
//! the regexes llama.cpp uses for it (llama-vocab.cpp, `llm_tokenizer_bpe`), and an unknown
//! type is an error rather than a guess.

use crate::gguf::Gguf;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::{BinaryHeap, HashMap};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// GGUF token types (llama.h `llama_token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// SentencePiece's escaped space, U+2581 LOWER ONE EIGHTH BLOCK.
const SPM_SPACE: &str = "\u{2581}";

/// Longest text accepted for one encode call, in bytes. Requests are bounded well below this
/// by the context window; this only stops a pathological input before the regex work.
pub const MAX_TEXT_BYTES: usize = 4 << 20;

/// llama.cpp's GPT-2 pre-tokenizer regex (also the one `ByteLevel` applies itself).
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How text becomes token ids.
enum Model {
    /// Byte-level BPE through the `tokenizers` crate.
    Bpe(Box<Bpe>),
    /// SentencePiece, llama.cpp's way.
    Spm(Box<Spm>),
}

/// A tokenizer and everything the engine needs to know about its tokens.
pub struct Tokenizer {
    model: Model,
    /// The bytes each token stands for in generated text, concatenated; control tokens are
    /// empty (llama.cpp renders them only when asked to).
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    eog: Vec<u32>,
    bos: Option<u32>,
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let kind = g.str("tokenizer.ggml.model")?;
        if kind != "gpt2" && kind != "llama" {
            return Err(Error::Unsupported(format!(
                "tokenizer model `{kind}` (supported: byte-level BPE, `gpt2`, and SentencePiece, `llama`)"
            )));
        }
        let tokens: Vec<&str> = g
            .array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(Error::Format(
                    "tokenizer.ggml.tokens holds a non-string".into(),
                )),
            })
            .collect::<Result<_>>()?;
        let n = u32::try_from(tokens.len())
            .map_err(|_| Error::Format("vocabulary too large".into()))?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::I32(t) => i64::from(*t),
                    Value::U32(t) => i64::from(*t),
                    _ => 1,
                })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(Error::Format(
                "tokenizer.ggml.token_type and tokens differ in length".into(),
            ));
        }
        let model = if kind == "llama" {
            Model::Spm(Box::new(Spm::new(g, &tokens, &types)?))
        } else {
            Model::Bpe(Box::new(Bpe::new(
                bpe(g, &tokens, &types)?,
                &tokens,
                &types,
            )?))
        };

        let decode = byte_decoder();
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(tokens.len() + 1);
        offsets.push(0u32);
        for (tok, ty) in tokens.iter().zip(&types) {
            match (&model, *ty) {
                (_, TYPE_CONTROL) => {}
                (_, TYPE_USER_DEFINED) => bytes.extend_from_slice(tok.as_bytes()),
                (Model::Spm(_), TYPE_BYTE) => bytes.extend(spm_byte(tok)),
                (Model::Spm(_), TYPE_NORMAL) => {
                    bytes.extend_from_slice(tok.replace(SPM_SPACE, " ").as_bytes())
                }
                // llama.cpp renders neither unknown nor unused SentencePiece tokens.
                (Model::Spm(_), _) => {}
                (Model::Bpe(_), _) => {
                    for c in tok.chars() {
                        match decode.get(&c) {
                            Some(b) => bytes.push(*b),
                            None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                }
            }
            offsets.push(
                u32::try_from(bytes.len())
                    .map_err(|_| Error::Format("vocabulary too large".into()))?,
            );
        }

        let id = |key: &str| -> Result<Option<u32>> {
            Ok(g.opt_u64(key)?
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v < n))
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let mut eog: Vec<u32> = [
            id("tokenizer.ggml.eos_token_id")?,
            id("tokenizer.ggml.eot_token_id")?,
        ]
        .into_iter()
        .flatten()
        .collect();
        // llama.cpp also ends generation on these control tokens, whatever the metadata says.
        const END_TEXTS: [&str; 7] = [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|end|>",
            "</s>",
            "<end_of_turn>",
            "<|end_of_text|>",
        ];
        for ((id, tok), ty) in (0..n).zip(&tokens).zip(&types) {
            if *ty == TYPE_CONTROL && END_TEXTS.contains(tok) && !eog.contains(&id) {
                eog.push(id);
            }
        }
        if eog.is_empty() {
            return Err(Error::Format(
                "the vocabulary has no end-of-generation token".into(),
            ));
        }
        Ok(Tokenizer {
            model,
            bytes,
            offsets,
            eog,
            bos,
            add_bos: g.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
        })
    }

    /// The BOS token [`Tokenizer::encode`] puts first, if the model asks for one.
    pub fn added_bos(&self) -> Option<u32> {
        self.bos.filter(|_| self.add_bos)
    }

    pub fn vocab_size(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Token ids for `text`, special tokens parsed, with BOS first if the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_allowing(text, |_| true)
    }

    /// [`Tokenizer::encode`], but a control token is recognised only where `allowed` says its
    /// byte range may hold one; elsewhere its characters are text (llama.cpp's
    /// `parse_special = false` for that part). User-defined tokens are recognised everywhere,
    /// as llama.cpp does. The chat path allows control tokens only in the template's own text.
    pub fn encode_allowing(
        &self,
        text: &str,
        allowed: impl Fn(std::ops::Range<usize>) -> bool,
    ) -> Result<Vec<u32>> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(Error::InvalidRequest(format!(
                "the prompt is {} bytes; at most {MAX_TEXT_BYTES} are accepted",
                text.len()
            )));
        }
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        match &self.model {
            Model::Bpe(bpe) => bpe.encode(text, &allowed, &mut ids)?,
            Model::Spm(spm) => spm.encode(text, &allowed, &mut ids),
        }
        Ok(ids)
    }

    /// The bytes `id` adds to generated text (empty for control tokens and unknown ids).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(a), Some(b)) => self.bytes.get(*a as usize..*b as usize).unwrap_or_default(),
            _ => &[],
        }
    }

    /// Whether `id` ends generation (EOS, EOT, or an end-of-turn control token).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn eog_tokens(&self) -> &[u32] {
        &self.eog
    }

    /// Decodes a whole sequence (lossy only where the bytes are not UTF-8).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|i| self.token_bytes(*i))
            .copied()
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The byte-level BPE model of a `gpt2` vocabulary, with its pre-tokenizer and its control
/// and user-defined tokens.
fn bpe(g: &Gguf, tokens: &[&str], types: &[i64]) -> Result<tokenizers::Tokenizer> {
    let pre = g.opt_str("tokenizer.ggml.pre").unwrap_or("default");
    let (pre_tokenizer, ignore_merges) = pre_tokenizer(pre)?;
    let merges: Vec<(String, String)> = g
        .array("tokenizer.ggml.merges")?
        .iter()
        .map(|v| match v {
            Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::Format(format!("bad BPE merge `{s}`"))),
            _ => Err(Error::Format(
                "tokenizer.ggml.merges holds a non-string".into(),
            )),
        })
        .collect::<Result<_>>()?;
    let mut vocab = Vocab::default();
    for (id, t) in (0u32..).zip(tokens) {
        vocab.insert((*t).to_string(), id);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| Error::Format(format!("BPE vocabulary: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    // Control and user-defined tokens are matched in the text before pre-tokenization, as
    // llama.cpp's `tokenizer_st_partition` does with `parse_special = true`.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, t)| matches!(**t, TYPE_CONTROL | TYPE_USER_DEFINED))
        .map(|(tok, t)| AddedToken::from((*tok).to_string(), *t == TYPE_CONTROL))
        .collect();
    inner
        .add_special_tokens(added)
        .map_err(|e| Error::Format(format!("special tokens: {e}")))?;
    Ok(inner)
}

/// Byte-level BPE: the `tokenizers` model with the vocabulary's control and user-defined
/// tokens, set to leave control tokens in the text (this type finds them itself, where they
/// are allowed), and the control tokens to find. One model: a second copy for text where
/// every control token is allowed would cost a vocabulary's worth of tables (17 MiB for
/// Qwen2.5's 151,936 tokens) and give the same ids as splitting here first.
struct Bpe {
    inner: tokenizers::Tokenizer,
    controls: Option<(aho_corasick::AhoCorasick, Vec<u32>)>,
}

impl Bpe {
    fn new(mut inner: tokenizers::Tokenizer, tokens: &[&str], types: &[i64]) -> Result<Self> {
        inner.set_encode_special_tokens(true);
        let (patterns, ids): (Vec<&str>, Vec<u32>) = tokens
            .iter()
            .zip(types)
            .zip(0u32..)
            .filter(|((t, ty), _)| !t.is_empty() && **ty == TYPE_CONTROL)
            .map(|((t, _), id)| (*t, id))
            .unzip();
        let controls = if patterns.is_empty() {
            None
        } else {
            let ac = aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(&patterns)
                .map_err(|e| Error::Format(format!("control tokens: {e}")))?;
            Some((ac, ids))
        };
        Ok(Bpe { inner, controls })
    }

    fn encode(
        &self,
        text: &str,
        allowed: &impl Fn(std::ops::Range<usize>) -> bool,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let failed = |e: tokenizers::Error| {
            Error::InvalidRequest(format!("tokenizing the prompt failed: {e}"))
        };
        let piece = |s: &str, out: &mut Vec<u32>| -> Result<()> {
            if !s.is_empty() {
                let enc = self.inner.encode_fast(s, false).map_err(failed)?;
                out.extend_from_slice(enc.get_ids());
            }
            Ok(())
        };
        let Some((ac, ids)) = &self.controls else {
            return piece(text, out);
        };
        // The `tokenizers` model splits at added tokens before anything else; splitting at the
        // allowed control tokens first, then letting it split the pieces at the user-defined
        // ones, gives the same ids wherever every control token is allowed.
        let mut at = 0;
        for m in ac.find_iter(text) {
            if !allowed(m.range()) {
                continue;
            }
            piece(text.get(at..m.start()).unwrap_or_default(), out)?;
            out.extend(ids.get(m.pattern().as_usize()));
            at = m.end();
        }
        piece(text.get(at..).unwrap_or_default(), out)
    }
}

/// The byte a SentencePiece byte token (`<0xAB>`) stands for.
fn spm_byte(tok: &str) -> Option<u8> {
    let hex = tok.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// A SentencePiece vocabulary, as llama.cpp's `llm_tokenizer_spm` uses it.
struct Spm {
    /// Every token's text (the last id wins for duplicates, as in llama.cpp).
    ids: HashMap<Box<str>, u32>,
    scores: Vec<f32>,
    /// The token for each byte: `<0xAB>`, else the one-character token.
    bytes: [Option<u32>; 256],
    /// Control, user-defined and unknown tokens, matched in the text first (leftmost,
    /// longest), their ids, and whether each is user-defined (recognised everywhere).
    specials: Option<(aho_corasick::AhoCorasick, Vec<u32>, Vec<bool>)>,
    /// Prefix each piece of text after a special token (and the first) with a space.
    add_space_prefix: bool,
}

/// A merge candidate: two adjacent symbols whose text is a token.
#[derive(Debug, PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // The highest score first; on ties the leftmost (llama.cpp's `llm_bigram_spm`).
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A run of the text: `start..start + len`, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    fn new(g: &Gguf, tokens: &[&str], types: &[i64]) -> Result<Self> {
        let scores: Vec<f32> = match g.get("tokenizer.ggml.scores") {
            Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
            _ => vec![0.0; tokens.len()],
        };
        if scores.len() != tokens.len() {
            return Err(Error::Format(
                "tokenizer.ggml.scores and tokens differ in length".into(),
            ));
        }
        let mut ids = HashMap::with_capacity(tokens.len());
        for (id, t) in (0u32..).zip(tokens) {
            ids.insert(Box::<str>::from(*t), id);
        }
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            *slot = ids.get(hex.as_str()).copied().or_else(|| {
                char::from_u32(b as u32)
                    .filter(|_| b < 0x80)
                    .and_then(|c| ids.get(c.to_string().as_str()).copied())
            });
        }
        let (patterns, special_ids): (Vec<&str>, Vec<(u32, bool)>) = tokens
            .iter()
            .zip(types)
            .zip(0u32..)
            .filter(|((t, ty), _)| {
                !t.is_empty() && matches!(**ty, TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN)
            })
            .map(|((t, ty), id)| (*t, (id, *ty == TYPE_USER_DEFINED)))
            .unzip();
        let (special_ids, user_defined): (Vec<u32>, Vec<bool>) = special_ids.into_iter().unzip();
        let specials = if patterns.is_empty() {
            None
        } else {
            let ac = aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(&patterns)
                .map_err(|e| Error::Format(format!("special tokens: {e}")))?;
            Some((ac, special_ids, user_defined))
        };
        Ok(Spm {
            ids,
            scores,
            bytes,
            specials,
            // llama.cpp's default for SentencePiece vocabularies when the key is absent.
            add_space_prefix: g
                .opt_bool("tokenizer.ggml.add_space_prefix")
                .unwrap_or(true),
        })
    }

    /// Appends the ids of `text` to `out`, special tokens parsed (llama.cpp's
    /// `tokenize(..., parse_special = true)` for `LLAMA_VOCAB_TYPE_SPM`) where `allowed`.
    fn encode(
        &self,
        text: &str,
        allowed: &impl Fn(std::ops::Range<usize>) -> bool,
        out: &mut Vec<u32>,
    ) {
        let mut prev_special = true;
        let piece = |raw: &str, prev_special: bool, out: &mut Vec<u32>| {
            let mut s = String::with_capacity(raw.len() + 3);
            if self.add_space_prefix && prev_special {
                s.push(' ');
            }
            s.push_str(raw);
            self.tokenize(&s.replace(' ', SPM_SPACE), out);
        };
        let mut at = 0;
        if let Some((ac, special_ids, user_defined)) = &self.specials {
            for m in ac.find_iter(text) {
                let everywhere = user_defined
                    .get(m.pattern().as_usize())
                    .copied()
                    .unwrap_or(false);
                if !everywhere && !allowed(m.range()) {
                    continue;
                }
                if m.start() > at {
                    piece(
                        text.get(at..m.start()).unwrap_or_default(),
                        prev_special,
                        out,
                    );
                }
                out.extend(special_ids.get(m.pattern().as_usize()));
                prev_special = true;
                at = m.end();
            }
        }
        if at < text.len() {
            piece(text.get(at..).unwrap_or_default(), prev_special, out);
        }
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on already-escaped text.
    fn tokenize(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if let Some(p) = i.checked_sub(1).and_then(|p| symbols.get_mut(p)) {
                p.next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
            let (l, r) = (left?, right?);
            let (ls, rs) = (symbols.get(l)?, symbols.get(r)?);
            let piece = text.get(ls.start..ls.start + ls.len + rs.len)?;
            let id = *self.ids.get(piece)?;
            Some(Bigram {
                score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                left: l,
                right: r,
                size: piece.len(),
            })
        };
        for i in 1..symbols.len() {
            queue.extend(bigram(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(b) = queue.pop() {
            let (Some(l), Some(r)) = (symbols.get(b.left).copied(), symbols.get(b.right).copied())
            else {
                continue;
            };
            // Stale: one side was merged since this candidate was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            if let Some(s) = symbols.get_mut(b.left) {
                s.len += r.len;
                s.next = r.next;
            }
            if let Some(s) = symbols.get_mut(b.right) {
                s.len = 0;
            }
            if let Some(n) = r.next.and_then(|n| symbols.get_mut(n)) {
                n.prev = Some(b.left);
            }
            queue.extend(bigram(&symbols, l.prev, Some(b.left)));
            queue.extend(bigram(&symbols, Some(b.left), r.next));
        }
        let mut i = if symbols.is_empty() { None } else { Some(0) };
        while let Some(s) = i.and_then(|i| symbols.get(i)) {
            let piece = text.get(s.start..s.start + s.len).unwrap_or_default();
            match self.ids.get(piece) {
                Some(id) => out.push(*id),
                // Never became a token: its bytes, as byte tokens.
                None => out.extend(
                    piece
                        .bytes()
                        .filter_map(|b| self.bytes.get(usize::from(b)).copied().flatten()),
                ),
            }
            i = s.next;
        }
    }
}

fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Format(format!("pre-tokenizer regex: {e}")))?
        .into())
    };
    // `ByteLevel::new(add_prefix_space, trim_offsets, use_regex)`: never a prefix space, which
    // is what candle's builder got wrong.
    let gpt2 = || -> PreTokenizerWrapper { ByteLevel::new(false, false, true).into() };
    let bytes_only = || -> PreTokenizerWrapper { ByteLevel::new(false, false, false).into() };
    Ok(match pre {
        // llama.cpp: digits one by one, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (Sequence::new(vec![split(r"\p{N}")?, gpt2()]).into(), false)
        }
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de" => (gpt2(), false),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "falcon3" | "pixtral" => {
            (Sequence::new(vec![split(REGEX_LLAMA3)?, bytes_only()]).into(), true)
        }
        "qwen2" => (Sequence::new(vec![split(REGEX_QWEN2)?, bytes_only()]).into(), false),
        other => {
            return Err(Error::Unsupported(format!(
                "pre-tokenizer `{other}` (supported: smollm and the starcoder family, gpt-2, llama3, qwen2)"
            )))
        }
    })
}

/// GPT-2's `bytes_to_unicode`, inverted: the printable character each byte was mapped to.
fn byte_decoder() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.iter().map(|b| u32::from(*b)).collect();
    let mut extra = 0u32;
    for b in 0..=255u8 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| char::from_u32(c).map(|c| (c, b)))
        .collect()
}

/// Turns a stream of token bytes into text without ever splitting a UTF-8 character: bytes
/// of an unfinished character wait for the next token; invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds `bytes` and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let (good, rest) = self.pending.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(good).unwrap_or_default());
                    match e.error_len() {
                        // An unfinished character at the end: keep it for the next token.
                        None => {
                            self.pending = rest.to_vec();
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending = rest.get(bad..).unwrap_or_default().to_vec();
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left at the end of the stream, lossily.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn byte_decoder_covers_all_bytes() {
        let d = byte_decoder();
        assert_eq!(d.len(), 256);
        assert_eq!(d.get(&'Ġ'), Some(&b' '));
        assert_eq!(d.get(&'Ċ'), Some(&b'\n'));
    }

    #[test]
    fn utf8_stream_waits_for_whole_characters() {
        let mut s = Utf8Stream::default();
        let euro = "€".as_bytes();
        assert_eq!(s.push(&euro[..1]), "");
        assert_eq!(s.push(&euro[1..2]), "");
        assert_eq!(s.push(&[euro[2], b'!']), "€!");
        assert_eq!(s.push(&[0xFF, b'a']), "\u{FFFD}a");
        assert_eq!(s.push(&euro[..2]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    proptest! {
        #[test]
        fn utf8_stream_reassembles_any_split(text in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..200, 0..8)) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut s = Utf8Stream::default();
            let mut out = String::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                out.push_str(&s.push(&bytes[at..c]));
                at = c;
            }
            out.push_str(&s.finish());
            prop_assert_eq!(out, text);
        }
    }
}
