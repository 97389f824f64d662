//! The serving loop: a bounded admission queue, continuous batching of prompt chunks and decode
//! steps across sequences, per-request event streams, and cancellation when a stream is dropped.
//!
//! One engine thread owns the model's mutable state (the KV caches and scratch buffers); the
//! matrix work of each step runs on a rayon pool of `threads` workers. A sequence is admitted
//! only when its worst case (prompt plus `max_tokens`) fits in the KV budget, the way TGI
//! reserves `max_total_tokens`: a request is never cut off halfway for lack of memory, and
//! memory is bounded by configuration, not by load.

use crate::kernels::Kernels;
use crate::model::{Chunk, KvCache, Logits, Model, Scratch};
use crate::sampling::{Sampler, SamplingParams};
use crate::template::{ChatTemplate, Message};
use crate::tokenizer::{Tokenizer, Utf8Stream};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Engine limits. Every one bounds memory or latency under load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Worker threads for the matrix work (the enclave's vCPUs).
    pub threads: usize,
    /// Sequences decoded together in one batch.
    pub max_sequences: usize,
    /// Requests allowed to wait for a slot; one more is refused with [`Error::QueueFull`].
    pub queue_capacity: usize,
    /// Bytes of KV cache shared by all running sequences.
    pub kv_budget_bytes: usize,
    /// Longest sequence (prompt plus completion) in tokens; also capped by the model's
    /// training context and by what fits in half the KV budget (all of it with one slot).
    pub max_context: usize,
    /// `max_tokens` when a request does not say.
    pub default_max_tokens: usize,
    /// Prompt tokens processed per step, so a long prompt does not stall the others' decoding.
    pub prefill_chunk: usize,
    /// The kernel implementation: the fastest this CPU supports unless a benchmark or a test
    /// picks another of [`Kernels::supported`]. Not configurable from outside: the enclave
    /// always runs the detected one.
    #[serde(skip)]
    pub kernels: Kernels,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_sequences: 16,
            queue_capacity: 64,
            kv_budget_bytes: 160 << 20,
            max_context: 8192,
            default_max_tokens: 512,
            prefill_chunk: 512,
            kernels: Kernels::detect(),
        }
    }
}

/// What to generate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationParams {
    /// Tokens to generate at most; `None` is [`EngineConfig::default_max_tokens`], never more
    /// than the context allows.
    pub max_tokens: Option<usize>,
    /// Up to 4 strings that end generation; they are not part of the output (OpenAI's `stop`).
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Keep generating through end-of-generation tokens (llama.cpp's `ignore_eos`), for
    /// benchmarks that need an exact number of tokens.
    pub ignore_eos: bool,
}

const MAX_STOPS: usize = 4;
const MAX_STOP_BYTES: usize = 256;

/// Why generation ended, as OpenAI reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// Token counts, as OpenAI reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Tokens sampled, not counting the end-of-generation token.
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// Where the time went, for metrics and benchmarks (never content).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Waiting in the queue.
    pub queued: Duration,
    /// From admission to the first sampled token (the prompt's prefill).
    pub prefill: Duration,
    /// From the first sampled token to the end.
    pub decode: Duration,
}

/// One event of a generation's stream.
#[derive(Debug)]
pub enum Event {
    /// New text; never empty, never a split UTF-8 character.
    Text(String),
    /// The generation ended; no event follows.
    Done {
        /// Why it ended.
        finish_reason: FinishReason,
        /// Tokens in and out.
        usage: Usage,
        /// Where the time went.
        timings: Timings,
    },
    /// The generation failed; no event follows.
    Failed(Error),
}

/// A whole completion, gathered from the stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}

/// The stream of a submitted request. Dropping it cancels the request: the engine notices at
/// its next step and frees the sequence.
#[derive(Debug)]
pub struct Generation {
    rx: mpsc::UnboundedReceiver<Event>,
    prompt_tokens: usize,
    max_tokens: usize,
}

impl Generation {
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// The most tokens it may generate (the request's `max_tokens`, or the default the
    /// engine chose): with [`Generation::prompt_tokens`], its worst case.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The next event, or `None` after `Done`/`Failed`.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is ready now, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// [`Generation::next`] for threads outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// Waits for the whole completion (outside an async runtime).
    pub fn wait(mut self) -> Result<Completion> {
        let mut text = String::new();
        while let Some(ev) = self.blocking_next() {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done {
                    finish_reason,
                    usage,
                    timings,
                } => {
                    return Ok(Completion {
                        text,
                        finish_reason,
                        usage,
                        timings,
                    })
                }
                Event::Failed(e) => return Err(e),
            }
        }
        Err(Error::Stopped)
    }
}

/// A loaded model serving requests.
pub struct Engine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    context: usize,
    default_max_tokens: usize,
    kv_bytes_per_token: usize,
    model_name: String,
    description: String,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    capacity: usize,
    running: AtomicUsize,
    kv_reserved: AtomicUsize,
}

/// A snapshot of the engine's load, for readiness and metrics (no content).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sequences in the batch (prefilling or decoding).
    pub running: usize,
    /// Requests waiting for a slot.
    pub queued: usize,
    /// KV-cache bytes reserved by the running sequences.
    pub kv_reserved_bytes: usize,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    shutdown: bool,
}

struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    sampling: SamplingParams,
    ignore_eos: bool,
    tx: mpsc::UnboundedSender<Event>,
    submitted: Instant,
}

impl Engine {
    pub(crate) fn start(
        mut model: Model,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        model_name: String,
        cfg: EngineConfig,
    ) -> Result<Self> {
        if cfg.threads == 0
            || cfg.max_sequences == 0
            || cfg.prefill_chunk == 0
            || cfg.default_max_tokens == 0
        {
            return Err(Error::Config(
                "threads, max_sequences, prefill_chunk and default_max_tokens must be positive"
                    .into(),
            ));
        }
        let per_token = model.config().kv_bytes_per_token();
        let description = model.describe();
        // With more than one slot, one request's worst case may take at most half the KV
        // budget: the longest request then always runs beside another, instead of holding
        // the whole budget while every other request waits for it to finish.
        let share = if cfg.max_sequences > 1 { 2 } else { 1 };
        let context = cfg
            .max_context
            .min(model.config().n_ctx_train)
            .min(cfg.kv_budget_bytes / share / per_token.max(1));
        if context < 2 {
            return Err(Error::Config(format!(
                "a KV budget of {} bytes holds no useful context ({per_token} bytes per token, one request may take 1/{share} of the budget)",
                cfg.kv_budget_bytes
            )));
        }
        model.fit_context(context);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .thread_name(|i| format!("engine-{i}"))
            .build()
            .map_err(|e| Error::Config(format!("worker threads: {e}")))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            capacity: cfg.queue_capacity,
            running: AtomicUsize::new(0),
            kv_reserved: AtomicUsize::new(0),
        });
        let tokenizer = Arc::new(tokenizer);
        let worker = Worker {
            model,
            tokenizer: tokenizer.clone(),
            shared: shared.clone(),
            pool,
            cfg: cfg.clone(),
            scratch: Scratch::default(),
            running: Vec::new(),
            reserved: 0,
        };
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || worker.run())
            .map_err(|e| Error::Config(format!("engine thread: {e}")))?;
        Ok(Engine {
            shared,
            thread: Some(thread),
            tokenizer,
            template,
            context,
            default_max_tokens: cfg.default_max_tokens,
            kv_bytes_per_token: per_token,
            model_name,
            description,
        })
    }

    /// The longest sequence (prompt plus completion) a request may ask for.
    pub fn context_length(&self) -> usize {
        self.context
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The model's family and weight types ([`Model::describe`]), for logs.
    pub fn describe(&self) -> &str {
        &self.description
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn kv_bytes_per_token(&self) -> usize {
        self.kv_bytes_per_token
    }

    /// The current load.
    pub fn stats(&self) -> Stats {
        let queued = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .jobs
            .len();
        Stats {
            running: self.shared.running.load(Ordering::Relaxed),
            queued,
            kv_reserved_bytes: self.shared.kv_reserved.load(Ordering::Relaxed),
        }
    }

    /// The prompt text the chat template makes of `messages`.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        self.template.render(messages)
    }

    /// The prompt tokens of `messages`: the template's text with its special tokens, the
    /// messages' contents as plain text (a control token written in a message is its
    /// characters, not the token), so a user cannot forge a turn.
    pub fn chat_tokens(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let (text, contents) = self.template.render_delimited(messages)?;
        self.tokenizer.encode_allowing(&text, |r| {
            !contents.iter().any(|c| r.start < c.end && c.start < r.end)
        })
    }

    /// Starts a chat completion.
    pub fn chat(&self, messages: &[Message], params: GenerationParams) -> Result<Generation> {
        let prompt = self.chat_tokens(messages)?;
        self.generate(prompt, params)
    }

    /// Starts a completion of raw prompt text (special tokens are parsed).
    pub fn complete(&self, prompt: &str, params: GenerationParams) -> Result<Generation> {
        self.generate(self.tokenizer.encode(prompt)?, params)
    }

    /// Starts a completion of prompt token ids.
    pub fn generate(&self, prompt: Vec<u32>, params: GenerationParams) -> Result<Generation> {
        params.sampling.validate()?;
        if prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(t) = prompt
            .iter()
            .find(|t| **t as usize >= self.tokenizer.vocab_size())
        {
            return Err(Error::InvalidRequest(format!(
                "token id {t} is outside the vocabulary"
            )));
        }
        if params.stop.len() > MAX_STOPS
            || params
                .stop
                .iter()
                .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(Error::InvalidRequest(format!(
                "at most {MAX_STOPS} stop sequences of 1 to {MAX_STOP_BYTES} bytes"
            )));
        }
        let p = prompt.len();
        let max_tokens = match params.max_tokens {
            Some(0) => {
                return Err(Error::InvalidRequest(
                    "max_tokens must be at least 1".into(),
                ))
            }
            Some(n) => n,
            None => self
                .default_max_tokens
                .min(self.context.saturating_sub(p))
                .max(1),
        };
        if p.saturating_add(max_tokens) > self.context {
            return Err(Error::ContextLength {
                prompt: p,
                completion: max_tokens,
                context: self.context,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job {
            prompt,
            max_tokens,
            stop: params.stop,
            sampling: params.sampling,
            ignore_eos: params.ignore_eos,
            tx,
            submitted: Instant::now(),
        };
        let mut q = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if q.shutdown {
            return Err(Error::Stopped);
        }
        if q.jobs.len() >= self.shared.capacity {
            return Err(Error::QueueFull {
                capacity: self.shared.capacity,
            });
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.wake.notify_one();
        Ok(Generation {
            rx,
            prompt_tokens: p,
            max_tokens,
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .shutdown = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Seq {
    prompt: Vec<u32>,
    fed: usize,
    next: u32,
    cache: KvCache,
    sampler: Sampler,
    max_tokens: usize,
    generated: usize,
    stop: Vec<String>,
    ignore_eos: bool,
    utf8: Utf8Stream,
    held: String,
    tx: mpsc::UnboundedSender<Event>,
    reserved: usize,
    submitted: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
}

struct Worker {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    shared: Arc<Shared>,
    pool: rayon::ThreadPool,
    cfg: EngineConfig,
    scratch: Scratch,
    running: Vec<Seq>,
    reserved: usize,
}

impl Worker {
    fn run(mut self) {
        loop {
            if !self.admit() {
                for s in self.running.drain(..) {
                    let _ = s.tx.send(Event::Failed(Error::Stopped));
                }
                return;
            }
            // A dropped stream is a cancelled request: free its sequence now.
            let before = self.running.len();
            self.running.retain(|s| !s.tx.is_closed());
            if self.running.len() != before {
                self.reserved = self.running.iter().map(|s| s.reserved).sum();
            }
            self.publish();
            if !self.running.is_empty() {
                self.step();
                self.publish();
            }
        }
    }

    fn publish(&self) {
        self.shared
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.shared
            .kv_reserved
            .store(self.reserved, Ordering::Relaxed);
    }

    /// Moves queued jobs into the batch while slots and KV budget allow, waiting when there is
    /// nothing to do. Returns false on shutdown.
    fn admit(&mut self) -> bool {
        let per_token = self.model.config().kv_bytes_per_token();
        let mut q = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if q.shutdown {
                for j in q.jobs.drain(..) {
                    let _ = j.tx.send(Event::Failed(Error::Stopped));
                }
                return false;
            }
            q.jobs.retain(|j| !j.tx.is_closed());
            while self.running.len() < self.cfg.max_sequences {
                // First come, first served: a large request at the head waits for room rather
                // than being overtaken forever by small ones.
                let Some(need) = q
                    .jobs
                    .front()
                    .map(|j| (j.prompt.len() + j.max_tokens) * per_token)
                else {
                    break;
                };
                if self.reserved + need > self.cfg.kv_budget_bytes {
                    break;
                }
                let Some(job) = q.jobs.pop_front() else { break };
                self.reserved += need;
                let capacity = job.prompt.len() + job.max_tokens;
                self.running.push(Seq {
                    cache: self.model.new_cache(capacity),
                    sampler: Sampler::new(job.sampling),
                    prompt: job.prompt,
                    fed: 0,
                    next: 0,
                    max_tokens: job.max_tokens,
                    generated: 0,
                    stop: job.stop,
                    ignore_eos: job.ignore_eos,
                    utf8: Utf8Stream::default(),
                    held: String::new(),
                    tx: job.tx,
                    reserved: need,
                    submitted: job.submitted,
                    admitted: Instant::now(),
                    first_token: None,
                });
            }
            if !self.running.is_empty() {
                return true;
            }
            self.publish();
            q = self
                .shared
                .wake
                .wait(q)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn step(&mut self) {
        let mut budget = self.cfg.prefill_chunk;
        let mut chunks = Vec::with_capacity(self.running.len());
        let mut owners = Vec::with_capacity(self.running.len());
        for (i, s) in self.running.iter_mut().enumerate() {
            let Seq {
                prompt,
                fed,
                next,
                cache,
                ..
            } = s;
            if *fed < prompt.len() {
                if budget == 0 {
                    continue;
                }
                let n = (prompt.len() - *fed).min(budget);
                budget -= n;
                let done = *fed + n == prompt.len();
                chunks.push(Chunk {
                    cache,
                    tokens: prompt.get(*fed..*fed + n).unwrap_or_default(),
                    logits: if done { Logits::Last } else { Logits::None },
                });
                *fed += n;
                if done {
                    owners.push(i);
                }
            } else {
                chunks.push(Chunk {
                    cache,
                    tokens: std::slice::from_ref(next),
                    logits: Logits::Last,
                });
                owners.push(i);
            }
        }
        let (model, scratch) = (&self.model, &mut self.scratch);
        let result = self.pool.install(|| model.forward(&mut chunks, scratch));
        drop(chunks);
        let mut logits = match result {
            Ok(l) => l,
            Err(e) => {
                for s in self.running.drain(..) {
                    let _ = s.tx.send(Event::Failed(e.clone()));
                }
                self.reserved = 0;
                return;
            }
        };
        let vocab = self.model.config().n_vocab;
        let mut finished = Vec::new();
        for (row, i) in logits.chunks_exact_mut(vocab).zip(owners) {
            let Some(s) = self.running.get_mut(i) else {
                continue;
            };
            let tok = s.sampler.sample(row);
            if let Some(reason) = s.accept(tok, &self.tokenizer) {
                finished.push((i, reason));
            }
        }
        for (i, reason) in finished.into_iter().rev() {
            let s = self.running.swap_remove(i);
            self.reserved -= s.reserved;
            s.finish(reason);
        }
    }
}

impl Seq {
    /// Takes the sampled token; returns why the sequence ends, if it does.
    fn accept(&mut self, tok: u32, tokenizer: &Tokenizer) -> Option<FinishReason> {
        let now = Instant::now();
        self.first_token.get_or_insert(now);
        if tokenizer.is_eog(tok) && !self.ignore_eos {
            let tail = self.utf8.finish();
            self.emit(&tail, true);
            return Some(FinishReason::Stop);
        }
        self.generated += 1;
        self.next = tok;
        let text = self.utf8.push(tokenizer.token_bytes(tok));
        let last = self.generated >= self.max_tokens;
        let text = if last {
            text + &self.utf8.finish()
        } else {
            text
        };
        if self.emit(&text, last) {
            return Some(FinishReason::Stop);
        }
        last.then_some(FinishReason::Length)
    }

    /// Sends the text that can no longer turn into a stop sequence. Returns true if a stop
    /// sequence matched (the text before it is sent, the rest dropped).
    fn emit(&mut self, text: &str, flush: bool) -> bool {
        self.held.push_str(text);
        let found = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        let (send, stopped) = match found {
            Some(at) => (at, true),
            None if flush => (self.held.len(), false),
            None => (self.held.len() - held_back(&self.held, &self.stop), false),
        };
        let out: String = self.held.drain(..send).collect();
        if !out.is_empty() {
            let _ = self.tx.send(Event::Text(out));
        }
        if stopped {
            self.held.clear();
        }
        stopped
    }

    fn finish(self, finish_reason: FinishReason) {
        let first = self.first_token.unwrap_or(self.admitted);
        let timings = Timings {
            queued: self.admitted.saturating_duration_since(self.submitted),
            prefill: first.saturating_duration_since(self.admitted),
            decode: first.elapsed(),
        };
        let usage = Usage {
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.generated,
            total_tokens: self.prompt.len() + self.generated,
        };
        let _ = self.tx.send(Event::Done {
            finish_reason,
            usage,
            timings,
        });
    }
}

/// Bytes at the end of `text` that could be the start of a stop sequence.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > keep && text.ends_with(s.get(..i).unwrap_or_default()) {
                keep = i;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_keeps_only_possible_stop_prefixes() {
        let stops = vec!["</end>".to_string(), "éa".to_string()];
        assert_eq!(held_back("hello </e", &stops), 3);
        assert_eq!(held_back("hello", &stops), 0);
        assert_eq!(held_back("café", &stops), "é".len());
        assert_eq!(held_back("</end", &stops), 5);
    }
}
