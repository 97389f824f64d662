//! The transformer of the llama family and its relatives (Qwen2, Qwen3, Gemma 2 and 3,
//! Phi-3): weights referenced in place in the decrypted GGUF buffer, one KV cache per
//! sequence, and a forward pass over a batch that mixes prompt chunks and decode steps of
//! different sequences (continuous batching).
//!
//! The graph is candle-transformers' `quantized_llama` (RMSNorm, RoPE, grouped-query attention,
//! SwiGLU) with what `quantized_qwen2`, `quantized_qwen3`, `gemma2`, `quantized_gemma3` and
//! `quantized_phi3` add (q/k/v biases, NeoX RoPE, per-head QK-norm, post-norms, GELU,
//! sliding-window layers, soft caps, fused projections), written as fused loops over buffers
//! kept between steps. Where candle differs from llama.cpp the reference is llama.cpp's graph
//! (`src/models/*.cpp`): candle's Gemma 3 uses SiLU where Gemma uses GELU-tanh, its windows are
//! one position wider, its Gemma 2 windows every layer, and its Phi-3 ignores the file's RoPE
//! base and LongRoPE factors. Quantized weights stay in GGML's block layout and are multiplied
//! by the kernels in [`crate::kernels`], as are F16 and BF16 ones; Q3_K and Q2_K, which have no
//! kernels of their own, are rewritten at load as Q6_K with the same weights ([`q3k_to_q6k`],
//! [`q2k_to_q6k`]; Q2_K's per-16 minimums kept beside and subtracted from the products);
//! nothing is dequantized to f32 but a type candle knows and we do not (none of the
//! quantizations llama.cpp writes today).

use crate::gguf::{Gguf, TensorRef};
use crate::kernels::{
    dequantize_half_row, dequantize_packed_row, dequantize_row, q2k_to_q6k, q3k_to_q6k, repack,
    BlockQ8, Glu, HalfKind, Kernels, KvSpan, QuantKind, Score, PACK, Q2K_BLOCK_BYTES,
    Q3K_BLOCK_BYTES, QK,
};
use crate::{Error, Result};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::cell::RefCell;
use std::io::Cursor;
use std::ops::Range;
use zeroize::Zeroizing;

/// The model families on the fast path, by `general.architecture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2 and 3.x, Mistral, SmolLM: RMSNorm, GGML's interleaved RoPE, SwiGLU.
    Llama,
    /// Qwen2 and Qwen2.5: llama's graph with q/k/v biases and NeoX RoPE.
    Qwen2,
    /// Qwen3 (dense): Qwen2 without biases, with RMSNorm on each query and key head.
    Qwen3,
    /// Gemma 2: norms after attention and feed-forward too, GELU (tanh), embeddings scaled by
    /// √d, every other layer attending within a window, and soft-capped attention scores and
    /// logits.
    Gemma2,
    /// Gemma 3: Gemma 2 without the soft caps, with QK-norm, and five sliding-window layers
    /// (their own RoPE base) to one global one.
    Gemma3,
    /// Phi-3 and Phi-3.5 (dense): llama's graph with one fused Q/K/V projection, one fused
    /// gate/up projection, NeoX RoPE and, for the long-context models, LongRoPE factors.
    Phi3,
    /// A family off the fast path, run by candle-transformers ([`crate::fallback`]).
    Fallback,
}

impl Arch {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "gemma2" => Some(Arch::Gemma2),
            "gemma3" => Some(Arch::Gemma3),
            "phi3" => Some(Arch::Phi3),
            _ => None,
        }
    }

    /// The `general.architecture` value, which also prefixes the family's metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
            Arch::Fallback => "fallback",
        }
    }

    /// Whether RoPE rotates the two halves of a head (GPT-NeoX, `LLAMA_ROPE_TYPE_NEOX` in
    /// llama.cpp) rather than adjacent pairs.
    fn neox(self) -> bool {
        !matches!(self, Arch::Llama)
    }

    fn gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
}

/// The families this engine's fast path runs, for error messages.
pub const ARCHITECTURES: &str = "llama, qwen2, qwen3, gemma2, gemma3, phi3";

/// Model dimensions, from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    /// The context length the model was trained with.
    pub n_ctx_train: usize,
    pub rope_base: f32,
    /// Positions are multiplied by this before rotation (`rope.scaling.type = linear`); for
    /// Gemma 3, in its global layers only.
    pub rope_scale: f32,
    pub rms_eps: f32,
    /// Sliding-window attention: each position of a local layer sees the last `window`
    /// positions, itself included (llama.cpp's `LLAMA_SWA_TYPE_STANDARD`), and rotates with
    /// `rope_base_local`. Layer `i` is local unless `(i + 1) % pattern == 0`.
    pub sliding: Option<Sliding>,
    /// Scale of the attention scores (1/√head_dim except Gemma 2 and 3 27B's
    /// 1/√(n_embd/n_head)).
    pub attn_scale: f32,
    /// Gemma 2's soft caps: attention scores become `c · tanh(s / c)`, and so do the logits.
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    /// `rope.scaling.attn_factor`: cosines and sines are multiplied by it (llama.cpp's
    /// `rope_attn_factor`; LongRoPE models set it).
    pub rope_attn_factor: f32,
    /// `rope.scaling.original_context_length`: LongRoPE's long factors apply to contexts
    /// longer than this, its short ones otherwise (llama.cpp's `n_ctx_orig_yarn`).
    pub n_ctx_orig: usize,
}

/// Where and how a model attends within a window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sliding {
    pub window: usize,
    pub pattern: usize,
    pub rope_base_local: f32,
}

impl Sliding {
    fn local(&self, layer: usize) -> bool {
        !(layer + 1).is_multiple_of(self.pattern.max(1))
    }
}

impl Config {
    /// The dimensions the engine needs (context, vocabulary, KV cache size) of a family only
    /// candle-transformers runs.
    pub(crate) fn for_fallback(g: &Gguf, name: &str) -> Result<Self> {
        let key = |k: &str| format!("{name}.{k}");
        let dim = |k: &str| -> Result<usize> {
            match g.opt_u64(&key(k))? {
                Some(v) if v > 0 && v <= 1 << 24 => Ok(v as usize),
                Some(v) => Err(Error::Format(format!(
                    "GGUF `{}` = {v} is out of range",
                    key(k)
                ))),
                None => Err(Error::Format(format!("GGUF `{}` is missing", key(k)))),
            }
        };
        let n_embd = dim("embedding_length")?;
        let n_head = dim("attention.head_count")?;
        let n_head_kv = match g.opt_u64(&key("attention.head_count_kv"))? {
            Some(_) => dim("attention.head_count_kv")?,
            None => n_head,
        };
        let head_dim = match g.opt_u64(&key("attention.key_length"))? {
            Some(_) => dim("attention.key_length")?,
            None => n_embd / n_head,
        };
        Ok(Config {
            arch: Arch::Fallback,
            n_layer: dim("block_count")?,
            n_embd,
            n_ff: dim("feed_forward_length").unwrap_or(n_embd),
            n_head,
            n_head_kv,
            head_dim,
            n_vocab: g.array("tokenizer.ggml.tokens")?.len(),
            n_ctx_train: dim("context_length")?,
            rope_base: 10_000.0,
            rope_scale: 1.0,
            rms_eps: 1e-5,
            sliding: None,
            attn_scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            rope_attn_factor: 1.0,
            n_ctx_orig: 0,
        })
    }

    /// Floats of K (or of V) per token per layer.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Floats of Q (and of the attention output) per token.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Bytes of KV cache one token takes across all layers: keys and values in half
    /// precision on the fast path (see [`KvCache`]), in f32 in candle-transformers' models.
    pub fn kv_bytes_per_token(&self) -> usize {
        let value = if matches!(self.arch, Arch::Fallback) {
            std::mem::size_of::<f32>()
        } else {
            std::mem::size_of::<f16>()
        };
        2 * self.n_layer * self.kv_dim() * value
    }

    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let name = g.str("general.architecture")?;
        let arch = Arch::from_name(name).ok_or_else(|| {
            Error::Unsupported(format!(
                "model architecture `{name}` (this engine runs {ARCHITECTURES})"
            ))
        })?;
        let key = |k: &str| format!("{name}.{k}");
        if let Some(experts) = g.opt_u64(&key("expert_count"))? {
            if experts > 0 {
                return Err(Error::Unsupported(format!(
                    "mixture-of-experts {name} ({experts} experts)"
                )));
            }
        }
        let rope_scale = match g.opt_str(&key("rope.scaling.type")) {
            None | Some("none") => 1.0,
            Some("linear") => {
                let factor = g.opt_f32(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                if !(factor.is_finite() && factor >= 1.0) {
                    return Err(Error::Format(format!(
                        "RoPE scaling factor {factor} is out of range"
                    )));
                }
                1.0 / factor
            }
            Some(kind) => return Err(Error::Unsupported(format!("RoPE scaling `{kind}`"))),
        };
        let dim = |k: &str, max: u64| -> Result<usize> {
            let k = key(k);
            let v = g.u64(&k)?;
            if v == 0 || v > max {
                return Err(Error::Format(format!(
                    "GGUF `{k}` = {v} is out of range 1..={max}"
                )));
            }
            usize::try_from(v).map_err(|_| Error::Format(format!("GGUF `{k}` is too large")))
        };
        let opt_dim = |k: &str, max: u64| -> Result<Option<usize>> {
            match g.opt_u64(&key(k))? {
                Some(_) => dim(k, max).map(Some),
                None => Ok(None),
            }
        };
        let n_embd = dim("embedding_length", 1 << 16)?;
        let n_head = dim("attention.head_count", 1 << 10)?;
        let n_head_kv = opt_dim("attention.head_count_kv", 1 << 10)?.unwrap_or(n_head);
        if n_head % n_head_kv != 0 {
            return Err(Error::Format(format!(
                "{n_head} heads are not a multiple of {n_head_kv} KV heads"
            )));
        }
        // Qwen3 and Gemma give the head size explicitly; it need not be n_embd / n_head.
        let head_dim = match opt_dim("attention.key_length", 1 << 12)? {
            Some(k) => k,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => {
                return Err(Error::Format(format!(
                    "{n_embd} embedding dims do not divide into {n_head} heads"
                )))
            }
        };
        if let Some(v) = opt_dim("attention.value_length", 1 << 12)? {
            if v != head_dim {
                return Err(Error::Unsupported(format!(
                    "value heads of {v} dims with key heads of {head_dim}"
                )));
            }
        }
        if head_dim % 2 != 0 {
            return Err(Error::Format(format!("head dimension {head_dim} is odd")));
        }
        if let Some(rot) = g.opt_u64(&key("rope.dimension_count"))? {
            if rot != head_dim as u64 {
                return Err(Error::Unsupported(format!(
                    "partial RoPE ({rot} of {head_dim} dims)"
                )));
            }
        }
        let n_vocab = g.array("tokenizer.ggml.tokens")?.len();
        let n_layer = dim("block_count", 1 << 10)?;
        let rope_base = g.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let sliding = match arch {
            // Gemma 2: every other layer local, 4,096 positions unless the file says
            // otherwise, one RoPE base for all (llama.cpp's `llama_model_gemma2`).
            Arch::Gemma2 => Some(Sliding {
                window: opt_dim("attention.sliding_window", 1 << 24)?.unwrap_or(4096),
                pattern: opt_dim("attention.sliding_window_pattern", 64)?.unwrap_or(2),
                rope_base_local: g.opt_f32(&key("rope.freq_base_swa"))?.unwrap_or(rope_base),
            }),
            Arch::Gemma3 => Some(Sliding {
                window: dim("attention.sliding_window", 1 << 24)?,
                // Gemma 3: five local layers to one global (llama.cpp's `set_swa_pattern(6)`);
                // local layers rotate with base 10,000 (its `rope_freq_base_train_swa`).
                pattern: opt_dim("attention.sliding_window_pattern", 64)?.unwrap_or(6),
                rope_base_local: g.opt_f32(&key("rope.local_freq_base"))?.unwrap_or(10_000.0),
            }),
            // Phi-3's files carry a sliding window that llama.cpp ignores (its conversion
            // does not say which layers use it); so do we, to give the same answers.
            _ => None,
        };
        // Gemma 2 27B (46 layers) and Gemma 3 27B (62) scale queries by their
        // query_pre_attn_scalar, n_embd / n_head (llama.cpp's `f_attention_scale`); every
        // other model by the head size.
        let attn_scale = match arch {
            Arch::Gemma2 if n_layer == 46 => 1.0 / ((n_embd / n_head) as f32).sqrt(),
            Arch::Gemma3 if n_layer == 62 => 1.0 / ((n_embd / n_head) as f32).sqrt(),
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        // Gemma 2's caps, with llama.cpp's defaults when the file has none; zero turns one off.
        let cap = |k: &str, default: f32| -> Result<Option<f32>> {
            match g.opt_f32(&key(k))?.unwrap_or(default) {
                0.0 => Ok(None),
                c if c.is_finite() && c > 0.0 => Ok(Some(c)),
                c => Err(Error::Format(format!(
                    "soft cap `{k}` = {c} is out of range"
                ))),
            }
        };
        let (attn_softcap, final_softcap) = match arch {
            Arch::Gemma2 => (
                cap("attn_logit_softcapping", 50.0)?,
                cap("final_logit_softcapping", 30.0)?,
            ),
            _ => (None, None),
        };
        let rope_attn_factor = g.opt_f32(&key("rope.scaling.attn_factor"))?.unwrap_or(1.0);
        if !(rope_attn_factor.is_finite() && rope_attn_factor > 0.0) {
            return Err(Error::Format(format!(
                "RoPE attention factor {rope_attn_factor} is out of range"
            )));
        }
        let n_ctx_train = dim("context_length", 1 << 24)?;
        let cfg = Config {
            arch,
            n_layer,
            n_embd,
            n_ff: dim("feed_forward_length", 1 << 18)?,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            n_ctx_train,
            rope_base,
            rope_scale,
            rms_eps: g
                .opt_f32(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            sliding,
            attn_scale,
            attn_softcap,
            final_softcap,
            rope_attn_factor,
            n_ctx_orig: opt_dim("rope.scaling.original_context_length", 1 << 24)?
                .unwrap_or(n_ctx_train),
        };
        let positive = |x: f32| x.is_finite() && x > 0.0;
        let local_base = cfg.sliding.map_or(1.0, |s| s.rope_base_local);
        if n_vocab == 0
            || !positive(cfg.rope_base)
            || !positive(cfg.rms_eps)
            || !positive(local_base)
        {
            return Err(Error::Format(
                "vocabulary, RoPE base or RMS epsilon is invalid".into(),
            ));
        }
        Ok(cfg)
    }
}

/// A weight matrix: in place in the model buffer with a native kernel, or dequantized.
#[derive(Debug)]
enum Matrix {
    /// `packed`: re-laid out in groups of [`PACK`] rows by [`repack`]. `offset` is in the
    /// [`Store`]; `converted_from` names the file's type when it was rewritten at load, and
    /// `mins` holds what Q2_K subtracts per 16 weights (`cols / 16` per row, [`q2k_to_q6k`]).
    Quant {
        kind: QuantKind,
        rows: usize,
        cols: usize,
        offset: usize,
        packed: bool,
        converted_from: Option<&'static str>,
        mins: Option<Vec<f32>>,
    },
    /// F16 or BF16 rows in place, multiplied against f32 activations.
    Half {
        kind: HalfKind,
        rows: usize,
        cols: usize,
        offset: usize,
    },
    F32 {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
}

impl Matrix {
    fn rows(&self) -> usize {
        match self {
            Matrix::Quant { rows, .. } | Matrix::Half { rows, .. } | Matrix::F32 { rows, .. } => {
                *rows
            }
        }
    }

    /// The tensor type, for [`Model::describe`].
    fn type_name(&self) -> String {
        match self {
            Matrix::Quant {
                kind,
                converted_from: Some(from),
                ..
            } => format!("{from} (as {})", kind.name()),
            Matrix::Quant { kind, .. } => kind.name().into(),
            Matrix::Half {
                kind: HalfKind::F16,
                ..
            } => "F16".into(),
            Matrix::Half {
                kind: HalfKind::Bf16,
                ..
            } => "BF16".into(),
            Matrix::F32 { .. } => "F32 (dequantized)".into(),
        }
    }
}

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    /// Qwen2's attention biases, added after the projections.
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    /// Qwen3's RMSNorm over each query and key head (`head_dim` weights).
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
    /// Gemma's norms of the attention and feed-forward outputs, before the residual adds.
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
}

/// A loaded model: on the fast path, or through candle-transformers for the families only it
/// runs.
pub struct Model(Inner);

enum Inner {
    Native(Native),
    Fallback(crate::fallback::Fallback),
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Native(m) => m.fmt(f),
            Inner::Fallback(m) => m.fmt(f),
        }
    }
}

impl Model {
    /// Builds the model over `bytes`, a GGUF file already parsed as `g`: on the fast path if
    /// its family is one of [`ARCHITECTURES`], else through candle-transformers if that has
    /// a model for it, else an error naming what neither runs.
    pub fn load(bytes: Zeroizing<Vec<u8>>, g: &Gguf, kernels: Kernels) -> Result<Self> {
        match Config::from_gguf(g) {
            Err(Error::Unsupported(why)) => {
                let arch = g.str("general.architecture")?;
                if !crate::fallback::takes(arch) {
                    return Err(Error::Unsupported(format!(
                        "{why}; candle-transformers runs {} but not this",
                        crate::fallback::ARCHITECTURES
                    )));
                }
                crate::fallback::Fallback::load(bytes, g)
                    .map(|m| Model(Inner::Fallback(m)))
                    .map_err(|e| match e {
                        Error::Unsupported(c) => Error::Unsupported(format!("{why}; {c}")),
                        other => other,
                    })
            }
            Err(e) => Err(e),
            Ok(_) => Native::load(bytes, g, kernels).map(|m| Model(Inner::Native(m))),
        }
    }

    /// Sets up the model for sequences of at most `context` tokens (see [`Native`]).
    pub fn fit_context(&mut self, context: usize) {
        if let Inner::Native(m) = &mut self.0 {
            m.fit_context(context);
        }
    }

    pub fn config(&self) -> &Config {
        match &self.0 {
            Inner::Native(m) => &m.cfg,
            Inner::Fallback(m) => m.config(),
        }
    }

    /// The family and the weights' types, for the load log.
    pub fn describe(&self) -> String {
        match &self.0 {
            Inner::Native(m) => m.describe(),
            Inner::Fallback(m) => m.describe(),
        }
    }

    /// The kernels of the fast path (the fallback uses candle's own).
    pub fn kernels(&self) -> Kernels {
        match &self.0 {
            Inner::Native(m) => m.kernels,
            Inner::Fallback(_) => Kernels::Scalar,
        }
    }

    /// An empty KV cache for a sequence of at most `capacity` tokens. Memory is committed as
    /// the sequence grows and returned when the cache is dropped.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache {
            k: (0..self.config().n_layer).map(|_| Vec::new()).collect(),
            v: (0..self.config().n_layer).map(|_| Vec::new()).collect(),
            len: 0,
            capacity,
            fallback: match &self.0 {
                Inner::Native(_) => None,
                Inner::Fallback(m) => Some(Box::new(m.sequence())),
            },
        }
    }

    /// Runs one step over `batch`: each entry appends its tokens to its own sequence. Returns
    /// the logits the entries asked for, in order, each `n_vocab` long.
    pub fn forward(&self, batch: &mut [Chunk<'_>], s: &mut Scratch) -> Result<Vec<f32>> {
        match &self.0 {
            Inner::Native(m) => m.forward(batch, s),
            Inner::Fallback(m) => forward_fallback(m.config(), batch),
        }
    }
}

/// A batch entry fits its cache and holds only tokens of the vocabulary.
fn check_chunk(cfg: &Config, c: &Chunk<'_>) -> Result<()> {
    if c.cache.len + c.tokens.len() > c.cache.capacity {
        return Err(Error::ContextFull {
            capacity: c.cache.capacity,
        });
    }
    match c.tokens.iter().find(|t| **t as usize >= cfg.n_vocab) {
        Some(t) => Err(Error::InvalidRequest(format!(
            "token id {t} is outside the vocabulary"
        ))),
        None => Ok(()),
    }
}

/// The fallback's step: one sequence after the other (candle batches within a sequence).
fn forward_fallback(cfg: &Config, batch: &mut [Chunk<'_>]) -> Result<Vec<f32>> {
    let mut logits = Vec::new();
    for c in batch.iter_mut() {
        check_chunk(cfg, c)?;
        let Some(seq) = c.cache.fallback.as_mut() else {
            return Err(Error::InvalidRequest(
                "a KV cache of another model was passed".into(),
            ));
        };
        logits.extend(seq.step(c.tokens, c.logits)?);
        c.cache.len += c.tokens.len();
    }
    Ok(logits)
}

/// The bytes the weights are read from: the decrypted GGUF file, in which the matrices are
/// multiplied in place, and the matrices rewritten at load into a type with a kernel
/// (addressed from the file's length on). Both zeroized when dropped.
struct Store {
    file: Zeroizing<Vec<u8>>,
    converted: Zeroizing<Vec<u8>>,
}

impl Store {
    fn get(&self, r: Range<usize>) -> Option<&[u8]> {
        let n = self.file.len();
        if r.start >= n {
            self.converted.get(r.start - n..r.end.checked_sub(n)?)
        } else {
            self.file.get(r)
        }
    }

    fn get_mut(&mut self, r: Range<usize>) -> Option<&mut [u8]> {
        let n = self.file.len();
        if r.start >= n {
            self.converted.get_mut(r.start - n..r.end.checked_sub(n)?)
        } else {
            self.file.get_mut(r)
        }
    }
}

/// Where [`matrix_rows`] writes the matrices it rewrites: a buffer sized for all of them
/// before the first is written (so it never reallocates and leaves no unzeroized copy), whose
/// offsets start at the file's length.
struct Conversions {
    base: usize,
    buf: RefCell<Zeroizing<Vec<u8>>>,
}

impl Conversions {
    /// Room for every Q2_K and Q3_K matrix of `g` as Q6_K. Sized from the tensors' checked byte
    /// ranges (a tensor that does not fit the file counts nothing: loading it fails anyway), so
    /// the room is at most 2.5 × the file; an allocation that fails is an error, not an abort.
    fn for_file(g: &Gguf, file_len: usize) -> Result<Self> {
        let mut bytes = 0usize;
        for (name, info) in &g.content().tensor_infos {
            let block = match info.ggml_dtype {
                GgmlDType::Q2K => Q2K_BLOCK_BYTES,
                GgmlDType::Q3K => Q3K_BLOCK_BYTES,
                _ => continue,
            };
            if let Ok(t) = g.tensor(name) {
                bytes = bytes.saturating_add(t.range.len() / block * QuantKind::Q6K.block_bytes());
            }
        }
        let mut buf = Zeroizing::new(Vec::new());
        buf.try_reserve_exact(bytes).map_err(|_| {
            Error::Config(format!(
                "no memory for the {} MiB of Q2_K/Q3_K weights rewritten as Q6_K",
                bytes >> 20
            ))
        })?;
        Ok(Self {
            base: file_len,
            buf: RefCell::new(buf),
        })
    }
}

/// A model on the fast path. It owns the decrypted GGUF bytes (zeroized when dropped) and
/// reads the quantized weights from them in place, so loading copies only the small norm
/// vectors (and the rare matrices rewritten into a type with a kernel).
pub struct Native {
    bytes: Store,
    cfg: Config,
    layers: Vec<Layer>,
    embed: Matrix,
    output_norm: Vec<f32>,
    /// `None`: tied to the embedding, as in SmolLM2.
    output: Option<Matrix>,
    inv_freq: Vec<f32>,
    /// The sliding-window layers' RoPE frequencies, when the model has such layers.
    inv_freq_local: Option<Vec<f32>>,
    rope_factors: RopeFactors,
    kernels: Kernels,
}

/// Per-frequency divisors of the RoPE angles.
#[derive(Debug)]
enum RopeFactors {
    None,
    /// Llama 3.1's `rope_freqs`.
    One(Vec<f32>),
    /// Phi-3's LongRoPE `rope_factors_short` and `rope_factors_long`.
    ShortLong(Vec<f32>, Vec<f32>),
}

impl RopeFactors {
    fn for_context(&self, context: usize, cfg: &Config) -> Option<&[f32]> {
        match self {
            RopeFactors::None => None,
            RopeFactors::One(f) => Some(f),
            RopeFactors::ShortLong(short, long) => Some(if context > cfg.n_ctx_orig {
                long
            } else {
                short
            }),
        }
    }
}

/// The global layers' RoPE frequencies: `scale / base^(2i/d)`, divided by the factors.
fn inv_freq(cfg: &Config, factors: Option<&[f32]>) -> Vec<f32> {
    (0..cfg.head_dim / 2)
        .map(|i| {
            let f = cfg.rope_scale / cfg.rope_base.powf(2.0 * i as f32 / cfg.head_dim as f32);
            match factors.and_then(|v| v.get(i)) {
                Some(div) if *div > 0.0 => f / div,
                _ => f,
            }
        })
        .collect()
}

impl std::fmt::Debug for Native {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Native")
            .field("cfg", &self.cfg)
            .field("kernels", &self.kernels)
            .finish_non_exhaustive()
    }
}

impl Native {
    /// Builds the model over `bytes`, a GGUF file already parsed as `g`.
    fn load(bytes: Zeroizing<Vec<u8>>, g: &Gguf, kernels: Kernels) -> Result<Self> {
        let cfg = Config::from_gguf(g)?;
        let (d, kv, qd, hd) = (cfg.n_embd, cfg.kv_dim(), cfg.q_dim(), cfg.head_dim);
        let conv = Conversions::for_file(g, bytes.len())?;
        let load = |name: &str, rows: usize, cols: usize| -> Result<Matrix> {
            matrix(&bytes, &conv, g, &g.tensor(name)?, rows, cols)
        };
        // A fused projection (Phi-3's `attn_qkv`, its gate and up in one `ffn_up`): the parts
        // are consecutive rows, so each is a matrix of its own over the same bytes.
        let fused = |name: &str, parts: &[usize], cols: usize| -> Result<Vec<Matrix>> {
            let t = g.tensor(name)?;
            let total: usize = parts.iter().sum();
            if (t.rows, t.cols) != (total, cols) {
                return Err(Error::Format(format!(
                    "tensor `{name}` is {}×{}, expected {total}×{cols}",
                    t.rows, t.cols
                )));
            }
            let mut first = 0;
            parts
                .iter()
                .map(|rows| {
                    let m = matrix_rows(&bytes, &conv, g, &t, first, *rows, cols);
                    first += rows;
                    m
                })
                .collect()
        };
        let vector =
            |name: &str, n: usize| -> Result<Vec<f32>> { vector(&bytes, g, &g.tensor(name)?, n) };
        let optional = |name: &str, n: usize| -> Result<Option<Vec<f32>>> {
            if g.has_tensor(name) {
                vector(name, n).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |w: &str| format!("blk.{i}.{w}.weight");
            let b = |w: &str| format!("blk.{i}.{w}.bias");
            if g.has_tensor(&n("ffn_gate_inp")) {
                return Err(Error::Unsupported("mixture-of-experts layers".into()));
            }
            if ["attn_output", "ffn_down", "attn_qkv", "ffn_up", "ffn_gate"]
                .iter()
                .any(|w| g.has_tensor(&b(w)))
            {
                return Err(Error::Unsupported(format!(
                    "biases on the {} output, fused or feed-forward projections",
                    cfg.arch.name()
                )));
            }
            let [wq, wk, wv]: [Matrix; 3] = if g.has_tensor(&n("attn_qkv")) {
                fused(&n("attn_qkv"), &[qd, kv, kv], d)?
                    .try_into()
                    .map_err(|_| Error::Format("attn_qkv did not split in three".into()))?
            } else {
                [
                    load(&n("attn_q"), qd, d)?,
                    load(&n("attn_k"), kv, d)?,
                    load(&n("attn_v"), kv, d)?,
                ]
            };
            // Phi-3 has no `ffn_gate`: its `ffn_up` holds the gate's rows, then the up's
            // (llama.cpp's LLM_FFN_SWIGLU over one projection: SiLU of the first half).
            let [gate, up]: [Matrix; 2] = if cfg.arch == Arch::Phi3 && !g.has_tensor(&n("ffn_gate"))
            {
                fused(&n("ffn_up"), &[cfg.n_ff, cfg.n_ff], d)?
                    .try_into()
                    .map_err(|_| Error::Format("ffn_up did not split in two".into()))?
            } else {
                [
                    load(&n("ffn_gate"), cfg.n_ff, d)?,
                    load(&n("ffn_up"), cfg.n_ff, d)?,
                ]
            };
            layers.push(Layer {
                attn_norm: vector(&n("attn_norm"), d)?,
                wq,
                wk,
                wv,
                wo: load(&n("attn_output"), d, qd)?,
                bq: optional(&b("attn_q"), qd)?,
                bk: optional(&b("attn_k"), kv)?,
                bv: optional(&b("attn_v"), kv)?,
                q_norm: optional(&n("attn_q_norm"), hd)?,
                k_norm: optional(&n("attn_k_norm"), hd)?,
                ffn_norm: vector(&n("ffn_norm"), d)?,
                gate,
                up,
                down: load(&n("ffn_down"), d, cfg.n_ff)?,
                post_attn_norm: optional(&n("post_attention_norm"), d)?,
                post_ffn_norm: optional(&n("post_ffw_norm"), d)?,
            });
        }
        let mut embed = load("token_embd.weight", cfg.n_vocab, d)?;
        let mut output = if g.has_tensor("output.weight") {
            Some(load("output.weight", cfg.n_vocab, d)?)
        } else {
            None
        };
        let output_norm = vector("output_norm.weight", d)?;
        // Llama 3.1's long-context RoPE: per-frequency divisors (llama.cpp's `rope_freqs`);
        // Phi-3's LongRoPE: one set for contexts up to the original length, one beyond.
        let half = cfg.head_dim / 2;
        let rope_factors = match optional("rope_freqs.weight", half)? {
            Some(f) => RopeFactors::One(f),
            None => match (
                optional("rope_factors_short.weight", half)?,
                optional("rope_factors_long.weight", half)?,
            ) {
                (Some(short), Some(long)) => RopeFactors::ShortLong(short, long),
                (None, None) => RopeFactors::None,
                _ => {
                    return Err(Error::Format(
                        "LongRoPE needs both short and long factors".into(),
                    ))
                }
            },
        };
        let mut bytes = Store {
            file: bytes,
            converted: conv.buf.into_inner(),
        };
        // Re-lay out the quantized matrices in place, the embedding included (its rows are
        // looked up through the packed layout).
        let mut tmp = Vec::new();
        for m in layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.wq,
                    &mut l.wk,
                    &mut l.wv,
                    &mut l.wo,
                    &mut l.gate,
                    &mut l.up,
                    &mut l.down,
                ]
            })
            .chain(output.as_mut())
            .chain([&mut embed])
        {
            if let Matrix::Quant {
                kind,
                rows,
                cols,
                offset,
                packed,
                ..
            } = m
            {
                if kind.packable() && *rows % PACK == 0 {
                    let group = PACK * kind.row_bytes(*cols);
                    for g0 in (0..*rows / PACK).map(|g| *offset + g * group) {
                        if let Some(region) = bytes.get_mut(g0..g0 + group) {
                            tmp.clear();
                            tmp.extend_from_slice(region);
                            repack(*kind, &tmp, *cols / kind.block_elems(), region);
                        }
                    }
                    *packed = true;
                }
            }
        }
        drop(Zeroizing::new(tmp));
        let inv_freq = inv_freq(&cfg, rope_factors.for_context(cfg.n_ctx_orig, &cfg));
        let inv_freq_local = cfg.sliding.map(|sl| {
            (0..half)
                .map(|i| {
                    1.0 / sl
                        .rope_base_local
                        .powf(2.0 * i as f32 / cfg.head_dim as f32)
                })
                .collect()
        });
        Ok(Native {
            bytes,
            cfg,
            layers,
            embed,
            output_norm,
            output,
            inv_freq,
            inv_freq_local,
            rope_factors,
            kernels,
        })
    }

    /// Sets up the model for sequences of at most `context` tokens: LongRoPE models rotate
    /// with their long factors when that exceeds the original context, as llama.cpp does for
    /// its context size.
    fn fit_context(&mut self, context: usize) {
        self.inv_freq = inv_freq(&self.cfg, self.rope_factors.for_context(context, &self.cfg));
    }

    /// The family and how many matrices of each type the weights hold, for the load log:
    /// `qwen2, 24 layers: Q5_0 ×133, Q4K ×12, ...`. `F32` counts matrices dequantized at load.
    /// Every weight matrix, the embedding and the output head included.
    fn matrices(&self) -> impl Iterator<Item = &Matrix> {
        self.layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down])
            .chain(self.output.as_ref())
            .chain([&self.embed])
    }

    fn describe(&self) -> String {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for m in self.matrices() {
            let name = m.type_name();
            match counts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => counts.push((name, 1)),
            }
        }
        let types: Vec<String> = counts.iter().map(|(n, c)| format!("{n} ×{c}")).collect();
        // What loading added to the file's own bytes: the enclave's memory must hold it too.
        let f32_bytes: usize = self
            .matrices()
            .map(|m| match m {
                Matrix::F32 { data, .. }
                | Matrix::Quant {
                    mins: Some(data), ..
                } => 4 * data.len(),
                _ => 0,
            })
            .sum();
        let copies = self.bytes.converted.len() + f32_bytes;
        let extra = if copies > 0 {
            format!(
                "; {} MiB of weights rewritten at load",
                copies.div_ceil(1 << 20)
            )
        } else {
            String::new()
        };
        format!(
            "{}, {} layers: {}{extra}",
            self.cfg.arch.name(),
            self.cfg.n_layer,
            types.join(", ")
        )
    }

    fn forward(&self, batch: &mut [Chunk<'_>], s: &mut Scratch) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (d, kvd, hd) = (cfg.n_embd, cfg.kv_dim(), cfg.head_dim);
        // Where each row of the step comes from: (entry, position in its sequence).
        s.rows.clear();
        for (e, c) in batch.iter().enumerate() {
            check_chunk(cfg, c)?;
            s.rows
                .extend((0..c.tokens.len()).map(|i| (e, c.cache.len + i)));
        }
        let t = s.rows.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        resize(&mut s.x, t * d);
        for (row, tok) in
            s.x.chunks_exact_mut(d)
                .zip(batch.iter().flat_map(|c| c.tokens.iter()))
        {
            self.embed_row(*tok, row);
        }
        if cfg.arch.gemma() {
            let scale = (d as f32).sqrt();
            s.x.iter_mut().for_each(|v| *v *= scale);
        }
        let mscale = cfg.rope_attn_factor;
        rope_tables(&self.inv_freq, mscale, &s.rows, &mut s.cos, &mut s.sin);
        if let Some(f) = &self.inv_freq_local {
            rope_tables(f, mscale, &s.rows, &mut s.cos_local, &mut s.sin_local);
        }

        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            rms_norm(&s.x, &layer.attn_norm, cfg.rms_eps, d, &mut s.xb);
            quantize_rows(self.kernels, &s.xb, d, &mut s.xq);
            self.matmul(
                &mut [
                    (&layer.wq, &mut s.q),
                    (&layer.wk, &mut s.k),
                    (&layer.wv, &mut s.v),
                ],
                &s.xb,
                &s.xq,
                t,
                &mut s.tmp,
            );
            for (x, bias) in [
                (&mut s.q, &layer.bq),
                (&mut s.k, &layer.bk),
                (&mut s.v, &layer.bv),
            ] {
                if let Some(bias) = bias {
                    add_rows(x, bias);
                }
            }
            if let Some(w) = &layer.q_norm {
                rms_norm_in_place(&mut s.q, w, cfg.rms_eps, hd);
            }
            if let Some(w) = &layer.k_norm {
                rms_norm_in_place(&mut s.k, w, cfg.rms_eps, hd);
            }
            let neox = cfg.arch.neox();
            let local = cfg.sliding.is_some_and(|sl| sl.local(li));
            let (cos, sin) = if local {
                (&s.cos_local, &s.sin_local)
            } else {
                (&s.cos, &s.sin)
            };
            rope(&mut s.q, hd, cos, sin, neox);
            rope(&mut s.k, hd, cos, sin, neox);
            // Append this step's keys and values to each sequence's cache.
            let mut at = 0;
            for c in batch.iter_mut() {
                let n = c.tokens.len() * kvd;
                if let (Some(k), Some(v), Some(ck), Some(cv)) = (
                    s.k.get(at..at + n),
                    s.v.get(at..at + n),
                    c.cache.k.get_mut(li),
                    c.cache.v.get_mut(li),
                ) {
                    if ck.capacity() == 0 {
                        ck.reserve_exact(c.cache.capacity * kvd);
                        cv.reserve_exact(c.cache.capacity * kvd);
                    }
                    for (cache, new) in [(ck, k), (cv, v)] {
                        let old = cache.len();
                        cache.resize(old + new.len(), f16::ZERO);
                        if let Some(dst) = cache.get_mut(old..) {
                            dst.convert_from_f32_slice(new);
                        }
                    }
                }
                at += n;
            }
            self.attention(li, batch, s);
            quantize_rows(self.kernels, &s.att, cfg.q_dim(), &mut s.xq);
            self.matmul(&mut [(&layer.wo, &mut s.xb)], &s.att, &s.xq, t, &mut s.tmp);
            if let Some(w) = &layer.post_attn_norm {
                rms_norm_in_place(&mut s.xb, w, cfg.rms_eps, d);
            }
            add(&mut s.x, &s.xb);

            // Feed-forward block.
            rms_norm(&s.x, &layer.ffn_norm, cfg.rms_eps, d, &mut s.xb);
            quantize_rows(self.kernels, &s.xb, d, &mut s.xq);
            self.matmul(
                &mut [(&layer.gate, &mut s.hb), (&layer.up, &mut s.hb2)],
                &s.xb,
                &s.xq,
                t,
                &mut s.tmp,
            );
            let act = if cfg.arch.gemma() {
                Glu::GeluTanh
            } else {
                Glu::Silu
            };
            gated(self.kernels, &mut s.hb, &s.hb2, act);
            quantize_rows(self.kernels, &s.hb, cfg.n_ff, &mut s.hq);
            self.matmul(&mut [(&layer.down, &mut s.xb)], &s.hb, &s.hq, t, &mut s.tmp);
            if let Some(w) = &layer.post_ffn_norm {
                rms_norm_in_place(&mut s.xb, w, cfg.rms_eps, d);
            }
            add(&mut s.x, &s.xb);
        }
        for c in batch.iter_mut() {
            c.cache.len += c.tokens.len();
        }

        // Logits only for the rows that asked for them.
        let mut picked = Vec::new();
        let mut at = 0;
        for c in batch.iter() {
            let n = c.tokens.len();
            match c.logits {
                Logits::None => {}
                Logits::Last => picked.push(at + n - 1),
                Logits::All => picked.extend(at..at + n),
            }
            at += n;
        }
        if picked.is_empty() {
            return Ok(Vec::new());
        }
        let mut h = Vec::with_capacity(picked.len() * d);
        for r in &picked {
            h.extend_from_slice(s.x.get(r * d..(r + 1) * d).unwrap_or_default());
        }
        let mut hn = Vec::new();
        rms_norm(&h, &self.output_norm, cfg.rms_eps, d, &mut hn);
        let mut hq = Vec::new();
        quantize_rows(self.kernels, &hn, d, &mut hq);
        let mut logits = Vec::new();
        let out = self.output.as_ref().unwrap_or(&self.embed);
        self.matmul(
            &mut [(out, &mut logits)],
            &hn,
            &hq,
            picked.len(),
            &mut s.tmp,
        );
        if let Some(cap) = cfg.final_softcap {
            logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        Ok(logits)
    }

    fn embed_row(&self, tok: u32, row: &mut [f32]) {
        let d = self.cfg.n_embd;
        match &self.embed {
            Matrix::Quant {
                kind,
                offset,
                packed: true,
                ..
            } => {
                let group = PACK * kind.row_bytes(d);
                let start = offset + tok as usize / PACK * group;
                let bytes = self.bytes.get(start..start + group).unwrap_or_default();
                dequantize_packed_row(*kind, bytes, tok as usize % PACK, row);
            }
            Matrix::Quant {
                kind,
                offset,
                packed: false,
                ..
            } => {
                let rb = kind.row_bytes(d);
                let start = offset + tok as usize * rb;
                dequantize_row(
                    *kind,
                    self.bytes.get(start..start + rb).unwrap_or_default(),
                    row,
                );
            }
            Matrix::Half { kind, offset, .. } => {
                let start = offset + tok as usize * 2 * d;
                dequantize_half_row(
                    *kind,
                    self.bytes.get(start..start + 2 * d).unwrap_or_default(),
                    row,
                );
            }
            Matrix::F32 { data, .. } => match data.get(tok as usize * d..(tok as usize + 1) * d) {
                Some(src) => row.copy_from_slice(src),
                None => row.fill(0.0),
            },
        }
        if let Matrix::Quant {
            mins: Some(mins), ..
        } = &self.embed
        {
            let per_row = d / 16;
            let mins = mins
                .get(tok as usize * per_row..(tok as usize + 1) * per_row)
                .unwrap_or_default();
            for (ys, m) in row.chunks_exact_mut(16).zip(mins) {
                ys.iter_mut().for_each(|y| *y -= m);
            }
        }
    }

    /// `outs[i] = inputs × W_iᵀ` for `t` rows, all matrices in one parallel pass. Outputs are
    /// row-major `[t][rows_i]`.
    fn matmul(
        &self,
        mats: &mut [(&Matrix, &mut Vec<f32>)],
        xf: &[f32],
        xq: &[BlockQ8],
        t: usize,
        tmp: &mut Vec<f32>,
    ) {
        // The kernels write one weight row (or one packed group of rows) for all t inputs at a
        // time: `[rows][t]`, or `[rows / PACK][t][PACK]` for packed matrices. The result is
        // transposed into place afterwards; for a single input that is a plain copy.
        let total: usize = mats.iter().map(|(m, _)| m.rows()).sum();
        resize(tmp, total * t);
        let threads = rayon::current_num_threads().max(1);
        let mut jobs = Vec::new();
        let mut rest: &mut [f32] = tmp;
        for (m, _) in mats.iter() {
            let (mine, tail) = rest.split_at_mut(m.rows() * t);
            rest = tail;
            // Small enough chunks to balance, large enough to amortize the dispatch.
            // Whole pairs of packed groups, which the widest kernels take together.
            let chunk = (m.rows() / (threads * 8))
                .clamp(16, 512)
                .next_multiple_of(2 * PACK);
            for (i, out) in mine.chunks_mut(chunk * t).enumerate() {
                jobs.push((*m, i * chunk, out));
            }
        }
        let kernels = self.kernels;
        let bytes = &self.bytes;
        jobs.into_par_iter().for_each(|(m, row0, out)| match m {
            Matrix::Quant {
                kind,
                cols,
                offset,
                packed: true,
                ..
            } => {
                let (group, nb) = (PACK * kind.row_bytes(*cols), cols / QK);
                let start = offset + row0 / PACK * group;
                let w = bytes
                    .get(start..start + out.len() / (PACK * t) * group)
                    .unwrap_or_default();
                kernels.quant_groups(*kind, w, xq, nb, out);
            }
            Matrix::Quant {
                kind,
                cols,
                offset,
                packed: false,
                ..
            } => {
                let (rb, nb) = (kind.row_bytes(*cols), cols / QK);
                for (r, o) in out.chunks_exact_mut(t).enumerate() {
                    let start = offset + (row0 + r) * rb;
                    let w = bytes.get(start..start + rb).unwrap_or_default();
                    kernels.quant_row(*kind, w, xq, nb, o);
                }
            }
            Matrix::Half {
                kind, cols, offset, ..
            } => {
                for (r, o) in out.chunks_exact_mut(t).enumerate() {
                    let start = offset + (row0 + r) * 2 * cols;
                    let w = bytes.get(start..start + 2 * cols).unwrap_or_default();
                    kernels.half_row(*kind, w, xf, o);
                }
            }
            Matrix::F32 { cols, data, .. } => {
                for (r, o) in out.chunks_exact_mut(t).enumerate() {
                    let w = data
                        .get((row0 + r) * cols..(row0 + r + 1) * cols)
                        .unwrap_or_default();
                    for (o, x) in o.iter_mut().zip(xf.chunks_exact(*cols)) {
                        *o = kernels.dot(w, x);
                    }
                }
            }
        });
        let mut src: &[f32] = tmp;
        for (m, out) in mats.iter_mut() {
            let rows = m.rows();
            let (mine, tail) = src.split_at(rows * t);
            src = tail;
            resize(out, rows * t);
            if t == 1 {
                out.copy_from_slice(mine);
            } else if matches!(m, Matrix::Quant { packed: true, .. }) {
                for (g, block) in mine.chunks_exact(PACK * t).enumerate() {
                    for (j, eight) in block.chunks_exact(PACK).enumerate() {
                        if let Some(o) = out.get_mut(j * rows + g * PACK..j * rows + (g + 1) * PACK)
                        {
                            o.copy_from_slice(eight);
                        }
                    }
                }
            } else {
                for (r, col) in mine.chunks_exact(t).enumerate() {
                    for (j, v) in col.iter().enumerate() {
                        if let Some(o) = out.get_mut(j * rows + r) {
                            *o = *v;
                        }
                    }
                }
            }
            if let Matrix::Quant {
                mins: Some(mins),
                cols,
                ..
            } = m
            {
                subtract_minimums(self.kernels, mins, *cols, xf, out);
            }
        }
    }

    /// Causal grouped-query attention of every row of the step over its own sequence's cache.
    fn attention(&self, layer: usize, batch: &[Chunk<'_>], s: &mut Scratch) {
        let cfg = &self.cfg;
        let (hd, kvd, nh) = (cfg.head_dim, cfg.kv_dim(), cfg.n_head);
        let group = nh / cfg.n_head_kv;
        let score = Score {
            scale: cfg.attn_scale,
            softcap: cfg.attn_softcap,
        };
        // A sliding-window layer sees the last `window` positions, itself included.
        let window = cfg
            .sliding
            .filter(|sl| sl.local(layer))
            .map_or(usize::MAX, |sl| sl.window);
        let kernels = self.kernels;
        let qd = cfg.q_dim();
        resize(&mut s.att, s.rows.len() * qd);
        // One task per row and KV head, taking the query heads that share it, unless that
        // leaves the workers too few tasks (a single sequence's decode step): then one per
        // query head.
        let per = if s.rows.len() * cfg.n_head_kv >= 2 * rayon::current_num_threads() {
            group
        } else {
            1
        };
        let tasks = nh / per;
        let (rows, q) = (&s.rows, &s.q);
        s.att
            .par_chunks_mut(per * hd)
            .enumerate()
            .for_each(|(i, out)| {
                let (row, h0) = (i / tasks, i % tasks * per);
                let Some(&(e, pos)) = rows.get(row) else {
                    return;
                };
                let Some(c) = batch.get(e) else { return };
                let (Some(keys), Some(vals)) = (c.cache.k.get(layer), c.cache.v.get(layer)) else {
                    return;
                };
                let qh = q
                    .get(row * qd + h0 * hd..row * qd + (h0 + per) * hd)
                    .unwrap_or_default();
                let first = (pos + 1).saturating_sub(window);
                let (keys, vals) = (
                    keys.get(first * kvd..).unwrap_or_default(),
                    vals.get(first * kvd..).unwrap_or_default(),
                );
                let kv = KvSpan {
                    stride: kvd,
                    off: (h0 / group) * hd,
                    n: pos + 1 - first,
                    head_dim: hd,
                };
                let mut scores = Vec::with_capacity(per * kv.n);
                kernels.attend(qh, keys, vals, kv, score, &mut scores, out);
            });
    }
}

/// Which logits a batch entry needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// One sequence's share of a step.
#[derive(Debug)]
pub struct Chunk<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// The keys and values of one sequence, per layer, `[position][kv_head][head_dim]`, in half
/// precision as llama.cpp keeps them by default (`--cache-type-k f16`): half the memory of f32
/// and half the traffic of a decode step, which reads every running sequence's whole cache.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
    len: usize,
    capacity: usize,
    /// The sequence's own model state when candle-transformers runs the model.
    fallback: Option<Box<crate::fallback::Sequence>>,
}

impl KvCache {
    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Buffers reused from step to step, so a decode step allocates almost nothing.
#[derive(Debug, Default)]
pub struct Scratch {
    rows: Vec<(usize, usize)>,
    x: Vec<f32>,
    xb: Vec<f32>,
    xq: Vec<BlockQ8>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    hb: Vec<f32>,
    hb2: Vec<f32>,
    hq: Vec<BlockQ8>,
    tmp: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    cos_local: Vec<f32>,
    sin_local: Vec<f32>,
}

fn resize<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
    v.clear();
    v.resize(n, T::default());
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, d: usize, out: &mut Vec<f32>) {
    resize(out, x.len());
    for (xs, os) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xs.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for ((o, v), w) in os.iter_mut().zip(xs).zip(w) {
            *o = v * r * w;
        }
    }
}

fn quantize_rows(k: Kernels, x: &[f32], cols: usize, out: &mut Vec<BlockQ8>) {
    let nb = cols / QK;
    resize(out, x.len() / cols * nb);
    for (xs, os) in x.chunks_exact(cols).zip(out.chunks_exact_mut(nb)) {
        k.quantize_row(xs, os);
    }
}

/// Rotates every head by position-dependent angles: consecutive pairs `(x[2i], x[2i+1])` as
/// GGML's `rope` mode 0 does, or with `neox` the pairs `(x[i], x[i + hd/2])` (GGML's NeoX
/// mode, which Qwen and most families after Llama use).
fn rope(x: &mut [f32], hd: usize, cos: &[f32], sin: &[f32], neox: bool) {
    let half = hd / 2;
    let rows = cos.len() / half.max(1);
    if rows == 0 {
        return;
    }
    let per_row = x.len() / rows;
    for ((row, c), s) in x
        .chunks_exact_mut(per_row)
        .zip(cos.chunks_exact(half))
        .zip(sin.chunks_exact(half))
    {
        for head in row.chunks_exact_mut(hd) {
            if neox {
                let (a, b) = head.split_at_mut(half);
                for (((a, b), c), s) in a.iter_mut().zip(b.iter_mut()).zip(c).zip(s) {
                    let (x0, x1) = (*a, *b);
                    *a = x0 * c - x1 * s;
                    *b = x0 * s + x1 * c;
                }
            } else {
                for ((pair, c), s) in head.chunks_exact_mut(2).zip(c).zip(s) {
                    if let [a, b] = pair {
                        let (x0, x1) = (*a, *b);
                        *a = x0 * c - x1 * s;
                        *b = x0 * s + x1 * c;
                    }
                }
            }
        }
    }
}

/// The cosines and sines of every row's position for the frequencies `inv_freq`, times
/// `mscale` (GGML's `attn_factor`).
fn rope_tables(
    inv_freq: &[f32],
    mscale: f32,
    rows: &[(usize, usize)],
    cos: &mut Vec<f32>,
    sin: &mut Vec<f32>,
) {
    cos.clear();
    sin.clear();
    for (_, pos) in rows {
        for f in inv_freq {
            let a = *pos as f32 * f;
            cos.push(a.cos() * mscale);
            sin.push(a.sin() * mscale);
        }
    }
}

/// Adds `bias` to every `bias.len()`-long row of `x`.
fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len().max(1)) {
        add(row, bias);
    }
}

/// RMSNorm of every `d`-long piece of `x` (each head, for Qwen3's QK-norm), in place.
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32, d: usize) {
    for xs in x.chunks_exact_mut(d.max(1)) {
        let ss: f32 = xs.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for (v, w) in xs.iter_mut().zip(w) {
            *v *= r * w;
        }
    }
}

/// `gate[i] = act(gate[i]) · up[i]`: SwiGLU with SiLU, GeGLU with GELU.
fn gated(kernels: Kernels, gate: &mut [f32], up: &[f32], act: Glu) {
    if gate.len() >= 1 << 14 {
        gate.par_chunks_mut(4096)
            .zip(up.par_chunks(4096))
            .for_each(|(g, u)| kernels.glu(act, g, u));
    } else {
        kernels.glu(act, gate, up);
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// A weight matrix of `rows × cols`, in place if a native kernel exists for its type.
fn matrix(
    bytes: &[u8],
    conv: &Conversions,
    g: &Gguf,
    t: &TensorRef,
    rows: usize,
    cols: usize,
) -> Result<Matrix> {
    if (t.rows, t.cols) != (rows, cols) {
        return Err(Error::Format(format!(
            "tensor `{}` is {}×{}, expected {rows}×{cols}",
            t.name, t.rows, t.cols
        )));
    }
    matrix_rows(bytes, conv, g, t, 0, rows, cols)
}

/// Rows `first..first + rows` of the `cols`-wide tensor `t`, as a matrix of their own: in place
/// when a kernel takes its type, rewritten into `conv` when one takes an exact equivalent
/// (Q3_K as Q6_K, Q2_K as Q6_K and minimums), else dequantized to f32.
#[allow(clippy::too_many_arguments)]
fn matrix_rows(
    bytes: &[u8],
    conv: &Conversions,
    g: &Gguf,
    t: &TensorRef,
    first: usize,
    rows: usize,
    cols: usize,
) -> Result<Matrix> {
    if t.cols != cols || first.checked_add(rows).is_none_or(|end| end > t.rows) {
        return Err(Error::Format(format!(
            "tensor `{}` ({}×{}) has no rows {first}..{} of {cols}",
            t.name,
            t.rows,
            t.cols,
            first.saturating_add(rows)
        )));
    }
    let kind = match t.dtype {
        GgmlDType::Q4_0 => Some(QuantKind::Q4_0),
        GgmlDType::Q4_1 => Some(QuantKind::Q4_1),
        GgmlDType::Q5_0 => Some(QuantKind::Q5_0),
        GgmlDType::Q5_1 => Some(QuantKind::Q5_1),
        GgmlDType::Q8_0 => Some(QuantKind::Q8_0),
        GgmlDType::Q4K => Some(QuantKind::Q4K),
        GgmlDType::Q5K => Some(QuantKind::Q5K),
        GgmlDType::Q6K => Some(QuantKind::Q6K),
        _ => None,
    };
    // Activations are quantized in blocks of QK, so every quantized matrix needs whole blocks
    // of them (and the GGUF reader already checked that rows hold whole weight blocks).
    let fits = |kind: QuantKind| cols.is_multiple_of(kind.block_elems()) && cols.is_multiple_of(QK);
    let half = match t.dtype {
        GgmlDType::F16 => Some(HalfKind::F16),
        GgmlDType::BF16 => Some(HalfKind::Bf16),
        _ => None,
    };
    let q2k = t.dtype == GgmlDType::Q2K;
    if (q2k || t.dtype == GgmlDType::Q3K) && fits(QuantKind::Q6K) {
        let (block, from) = if q2k {
            (Q2K_BLOCK_BYTES, "Q2_K")
        } else {
            (Q3K_BLOCK_BYTES, "Q3_K")
        };
        let row_bytes = cols / crate::kernels::QK_K * block;
        let start = t.range.start + first * row_bytes;
        let src = bytes
            .get(start..start + rows * row_bytes)
            .ok_or_else(|| Error::Format(format!("tensor `{}` is short", t.name)))?;
        let mut buf = conv.buf.borrow_mut();
        let offset = conv.base + buf.len();
        let needed = rows * QuantKind::Q6K.row_bytes(cols);
        if buf.capacity() - buf.len() < needed {
            // The room was counted from the same tensors: only a file whose tensor table
            // disagrees with itself gets here.
            return Err(Error::Format(format!(
                "tensor `{}` does not fit the room counted for it",
                t.name
            )));
        }
        let mut mins = Vec::with_capacity(if q2k { rows * cols / 16 } else { 0 });
        for blk in src.chunks_exact(block) {
            if q2k {
                let (q6, m) = q2k_to_q6k(blk);
                buf.extend_from_slice(&q6);
                mins.extend_from_slice(&m);
            } else {
                buf.extend_from_slice(&q3k_to_q6k(blk));
            }
        }
        return Ok(Matrix::Quant {
            kind: QuantKind::Q6K,
            rows,
            cols,
            offset,
            packed: false,
            converted_from: Some(from),
            mins: q2k.then_some(mins),
        });
    }
    match (kind, half) {
        (Some(kind), _) if fits(kind) => Ok(Matrix::Quant {
            kind,
            rows,
            cols,
            offset: t.range.start + first * kind.row_bytes(cols),
            packed: false,
            converted_from: None,
            mins: None,
        }),
        (_, Some(kind)) => Ok(Matrix::Half {
            kind,
            rows,
            cols,
            offset: t.range.start + first * 2 * cols,
        }),
        (Some(kind), _) => Err(Error::Format(format!(
            "tensor `{}` of type {kind:?} has rows of {cols} weights, not whole blocks",
            t.name
        ))),
        (None, None) => Ok(Matrix::F32 {
            rows,
            cols,
            data: dequantize(bytes, g, t)?
                .get(first * cols..(first + rows) * cols)
                .map(<[f32]>::to_vec)
                .ok_or_else(|| Error::Format(format!("tensor `{}` is short", t.name)))?,
        }),
    }
}

/// Q2_K's minimums ([`q2k_to_q6k`]) taken off `out` (`[t][rows]`, the product of the Q6_K
/// part with the `t` inputs `xf`): output `r` of input `j` loses `Σ_k mins[r][k] · Σ x_j[16k..16k
/// + 16]`.
fn subtract_minimums(kernels: Kernels, mins: &[f32], cols: usize, xf: &[f32], out: &mut [f32]) {
    let per_row = cols / 16;
    if per_row == 0 {
        return;
    }
    let rows = mins.len() / per_row;
    for (x, out) in xf.chunks_exact(cols).zip(out.chunks_exact_mut(rows.max(1))) {
        let sums: Vec<f32> = x.chunks_exact(16).map(|s| s.iter().sum()).collect();
        let sub = |(o, m): (&mut f32, &[f32])| *o -= kernels.dot(m, &sums);
        if rows * per_row >= 1 << 16 {
            out.par_iter_mut()
                .zip(mins.par_chunks_exact(per_row))
                .for_each(sub);
        } else {
            out.iter_mut().zip(mins.chunks_exact(per_row)).for_each(sub);
        }
    }
}

fn vector(bytes: &[u8], g: &Gguf, t: &TensorRef, n: usize) -> Result<Vec<f32>> {
    if t.rows * t.cols != n {
        return Err(Error::Format(format!(
            "tensor `{}` has {} values, expected {n}",
            t.name,
            t.rows * t.cols
        )));
    }
    dequantize(bytes, g, t)
}

/// Any GGML type candle knows, as f32.
fn dequantize(bytes: &[u8], g: &Gguf, t: &TensorRef) -> Result<Vec<f32>> {
    if t.dtype == GgmlDType::F32 {
        let raw = bytes.get(t.range.clone()).unwrap_or_default();
        return Ok(raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect());
    }
    let err = |e: candle_core::Error| {
        Error::Unsupported(format!("tensor `{}` of type {:?}: {e}", t.name, t.dtype))
    };
    let q = g
        .content()
        .tensor(&mut Cursor::new(bytes), &t.name, &Device::Cpu)
        .map_err(err)?;
    q.dequantize(&Device::Cpu)
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1::<f32>())
        .map_err(err)
}
