//! Families off the fast path, served by candle-transformers' own quantized models, so the
//! product never refuses a model candle runs: Phi-2 (`phi2`), GLM-4 (`glm4`) and llama-family
//! mixtures of experts in the per-expert layout (`ffn_gate.N`, which candle's `quantized_llama`
//! reads). Slower than [`crate::model`]'s fused loops (candle's graph, its own kernels, and a
//! KV cache grown by concatenation), and it gives every sequence its own clone of the model,
//! which shares the weights and owns the cache.
//!
//! Unlike the fast path, candle copies the weights out of the decrypted buffer into its own
//! storage; the buffer is zeroized as soon as they are read, but candle's copies are freed
//! without zeroizing. They live in enclave memory, which the host cannot read, and die with it.

use crate::gguf::Gguf;
use crate::model::{Config, Logits};
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_glm4, quantized_llama, quantized_phi};
use std::io::Cursor;
use zeroize::Zeroizing;

/// The families the fallback takes, by `general.architecture`.
pub const ARCHITECTURES: &str = "phi2, glm4, llama mixtures of experts (per-expert tensors)";

/// One of candle-transformers' models, weights shared between clones, the KV cache not.
#[derive(Clone)]
enum Weights {
    Llama(quantized_llama::ModelWeights),
    Phi2(quantized_phi::ModelWeights),
    Glm4(quantized_glm4::ModelWeights),
}

/// A model loaded by candle-transformers.
pub struct Fallback {
    weights: Weights,
    cfg: Config,
    family: String,
}

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback")
            .field("family", &self.family)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Whether candle-transformers has a model for `arch`.
pub fn takes(arch: &str) -> bool {
    matches!(arch, "llama" | "phi2" | "glm4")
}

impl Fallback {
    /// Loads `bytes` (already parsed as `g`) with candle-transformers, then zeroizes them.
    pub fn load(bytes: Zeroizing<Vec<u8>>, g: &Gguf) -> Result<Self> {
        let arch = g.str("general.architecture")?.to_string();
        let cfg = Config::for_fallback(g, &arch)?;
        let mut reader = Cursor::new(bytes.as_slice());
        let refused = |e: candle_core::Error| {
            Error::Unsupported(format!(
                "candle-transformers cannot run this `{arch}` file: {e}"
            ))
        };
        let content = gguf_file::Content::read(&mut reader).map_err(refused)?;
        let dev = &Device::Cpu;
        let weights = match arch.as_str() {
            "llama" => Weights::Llama(
                quantized_llama::ModelWeights::from_gguf(content, &mut reader, dev)
                    .map_err(refused)?,
            ),
            "phi2" => Weights::Phi2(
                quantized_phi::ModelWeights::from_gguf(content, &mut reader, dev)
                    .map_err(refused)?,
            ),
            "glm4" => Weights::Glm4(
                quantized_glm4::ModelWeights::from_gguf(
                    content,
                    &mut reader,
                    dev,
                    candle_core::DType::F32,
                )
                .map_err(refused)?,
            ),
            other => {
                return Err(Error::Unsupported(format!(
                    "model architecture `{other}` (candle-transformers runs {ARCHITECTURES})"
                )))
            }
        };
        drop(bytes);
        Ok(Fallback {
            weights,
            cfg,
            family: arch,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn describe(&self) -> String {
        format!(
            "{}, {} layers, through candle-transformers (off the fast path)",
            self.family, self.cfg.n_layer
        )
    }

    /// A new sequence: the model with an empty KV cache.
    pub fn sequence(&self) -> Sequence {
        Sequence {
            weights: self.weights.clone(),
            pending: Vec::new(),
            done: 0,
        }
    }
}

/// One sequence's model state.
pub struct Sequence {
    weights: Weights,
    /// Prompt tokens received in chunks that asked for no logits, not yet run.
    pending: Vec<u32>,
    /// Positions already in candle's cache.
    done: usize,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Sequence {
    /// Appends `tokens` and returns the logits `want` asks for. A prompt's chunks are held
    /// until its last one, then run as one: candle's results depend on how rows are grouped,
    /// so this keeps a sequence's output independent of what else is being served (at the cost
    /// of the fast path's interleaving of long prompts with other sequences' decoding).
    pub fn step(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        self.pending.extend_from_slice(tokens);
        match want {
            Logits::None => Ok(Vec::new()),
            Logits::Last => self.flush(),
            Logits::All => {
                // candle's models give the last position's logits only: one position at a time.
                let all = std::mem::take(&mut self.pending);
                let (before, these) = all.split_at(all.len() - tokens.len());
                self.pending = before.to_vec();
                if !self.pending.is_empty() {
                    self.flush()?;
                }
                let mut out = Vec::new();
                for t in these {
                    self.pending.push(*t);
                    out.extend(self.flush()?);
                }
                Ok(out)
            }
        }
    }

    /// Runs the pending tokens; the logits after the last of them.
    fn flush(&mut self) -> Result<Vec<f32>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let failed =
            |e: candle_core::Error| Error::Unsupported(format!("candle-transformers: {e}"));
        let input = Tensor::new(self.pending.as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .map_err(failed)?;
        let out = match &mut self.weights {
            Weights::Llama(m) => m.forward(&input, self.done),
            Weights::Phi2(m) => m.forward(&input, self.done),
            Weights::Glm4(m) => m.forward(&input, self.done),
        }
        .map_err(failed)?;
        self.done += self.pending.len();
        self.pending.clear();
        // `[1, vocab]` from every one of these models: the last position only.
        out.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(failed)
    }
}
