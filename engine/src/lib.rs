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
    #[error("invalid model file: {0}")]
    Format(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(
        "this model's context window is {context} tokens, but {} were requested ({prompt} in the prompt, {completion} to generate)",
        prompt + completion
    )]
    ContextLength {
        prompt: usize,
        completion: usize,
        context: usize,
    },
    #[error("the sequence's KV cache is full ({capacity} tokens)")]
    ContextFull { capacity: usize },
    #[error("the engine is busy: {capacity} requests are already waiting; retry later")]
    QueueFull { capacity: usize },
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
