//! The inference engine that runs inside the enclave (DESIGN.md §4.4, §5): llama-family GGUF
//! models loaded from the decrypted in-memory buffer, the model's own tokenizer and chat
//! template, sampling, UTF-8-safe streaming, cancellation, and continuous batching.
//!
//! ```no_run
//! # fn main() -> Result<(), engine::Error> {
//! let bytes = zeroize::Zeroizing::new(std::fs::read("model.gguf").map_err(|e| engine::Error::Config(e.to_string()))?);
//! let engine = engine::load(bytes, engine::EngineConfig::default())?;
//! let reply = engine
//!     .chat(&[engine::Message::new("user", "Hello!")], engine::GenerationParams::default())?
//!     .wait()?;
//! println!("{}", reply.text);
//! # Ok(()) }
//! ```
//!
//! candle reads the GGUF and dequantizes tensor types without a native kernel; the forward pass
//! and its SIMD kernels are this crate's own (see [`kernels`] and [`model`]) because candle's
//! per-operation graph and its scalar Q4_1 path are several times slower than llama.cpp on a
//! model this small.

#![deny(unsafe_code)]

pub mod engine;
pub mod fallback;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod sampling;
pub mod template;
pub mod tokenizer;

pub use engine::{
    Completion, Engine, EngineConfig, Event, FinishReason, Generation, GenerationParams, Stats,
    Timings, Usage,
};
pub use sampling::SamplingParams;
pub use template::Message;

use zeroize::Zeroizing;

/// Everything that can go wrong, without any prompt or output text in the message.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The file is not a well-formed GGUF, or its tensors, vocabulary or metadata contradict
    /// one another (a shape that does not fit, a token id out of range). The text names the
    /// tensor or key, never weights. Strings, not sources: the GGUF reader is ours and says
    /// what is wrong where it finds it, and this error crosses threads in the stream.
    #[error("invalid model file: {0}")]
    Format(String),
    /// A well-formed model this engine cannot run: an architecture, quantization, tokenizer
    /// or template feature it does not implement.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// [`EngineConfig`] asks for something impossible (no threads, a KV budget too small for
    /// one sequence), or the engine's threads could not be started.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// A request the engine refuses before queueing it: empty messages, a role the template
    /// lacks, sampling parameters out of range.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Prompt and completion together exceed the model's context window.
    #[error(
        "this model's context window is {context} tokens, but {} were requested ({prompt} in the prompt, {completion} to generate)",
        prompt + completion
    )]
    ContextLength {
        /// Tokens in the prompt, after the chat template.
        prompt: usize,
        /// Tokens the request asked to generate.
        completion: usize,
        /// The model's context window.
        context: usize,
    },
    /// The KV cache budget cannot hold this sequence's next token (the budget is shared by
    /// all running sequences).
    #[error("the sequence's KV cache is full ({capacity} tokens)")]
    ContextFull {
        /// Tokens the sequence holds.
        capacity: usize,
    },
    /// The admission queue is full; the caller should retry later (HTTP 429/503).
    #[error("the engine is busy: {capacity} requests are already waiting; retry later")]
    QueueFull {
        /// The queue's length.
        capacity: usize,
    },
    /// The engine's worker has stopped (shut down, or a panic in it was caught).
    #[error("the engine has stopped")]
    Stopped,
}

pub type Result<T> = std::result::Result<T, Error>;

/// Loads a GGUF model from `bytes` (the decrypted buffer, which the engine keeps and zeroizes
/// on drop) and starts serving it.
pub fn load(bytes: Zeroizing<Vec<u8>>, cfg: EngineConfig) -> Result<Engine> {
    let g = gguf::Gguf::parse(&bytes)?;
    let tokenizer = tokenizer::Tokenizer::from_gguf(&g)?;
    let template = template::ChatTemplate::from_gguf(&g)?;
    let name = g.opt_str("general.name").unwrap_or("model").to_string();
    let model = model::Model::load(bytes, &g, cfg.kernels)?;
    Engine::start(model, tokenizer, template, name, cfg)
}
