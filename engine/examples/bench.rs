//! The engine's side of `make bench-engine`: time to first token, prefill and decode speed on
//! one stream, aggregate decode speed on several concurrent streams, and peak RSS, as JSON.
//!
//! `bench MODEL.gguf PROMPT.txt [--tokens 128] [--streams 8] [--runs 3] [--threads 2]
//! [--kernels NAME]` (one of `Kernels::supported`, by name; the fastest by default)

use engine::{Completion, EngineConfig, GenerationParams, Message, SamplingParams};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args.get(i + 1).ok_or("missing value")?.parse()?),
            None => Ok(default),
        }
    };
    let (model, prompt) = match (args.first(), args.get(1)) {
        (Some(m), Some(p)) => (m.clone(), std::fs::read_to_string(p)?.trim().to_string()),
        _ => return Err("usage: bench MODEL.gguf PROMPT.txt [--tokens N] [--streams N] [--runs N] [--threads N]".into()),
    };
    let (tokens, streams, runs, threads) = (
        opt("--tokens", 128)?,
        opt("--streams", 8)?,
        opt("--runs", 3)?,
        opt("--threads", 2)?,
    );

    let kernels = match args.iter().position(|a| a == "--kernels") {
        Some(i) => {
            let name = args.get(i + 1).ok_or("missing value")?;
            engine::kernels::Kernels::by_name(name).ok_or("no such kernels on this CPU")?
        }
        None => engine::kernels::Kernels::detect(),
    };
    let t0 = Instant::now();
    // All streams' prompts fit in one step, so every stream starts decoding at the same step
    // and the aggregate decode window below holds decode steps only.
    let engine = engine::load(
        zeroize::Zeroizing::new(std::fs::read(&model)?),
        EngineConfig {
            threads,
            prefill_chunk: 4096,
            max_sequences: streams.max(1),
            kernels,
            ..EngineConfig::default()
        },
    )?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let messages = [Message::new("user", prompt)];
    let params = GenerationParams {
        max_tokens: Some(tokens),
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..Default::default()
    };
    // Warm-up: page in the weights and size the buffers.
    engine
        .chat(
            &messages,
            GenerationParams {
                max_tokens: Some(8),
                ..params.clone()
            },
        )?
        .wait()?;

    let mut ttft = Vec::new();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut prompt_tokens = 0;
    let mut text = String::new();
    for _ in 0..runs {
        let c: Completion = engine.chat(&messages, params.clone())?.wait()?;
        prompt_tokens = c.usage.prompt_tokens;
        let first = c.timings.queued + c.timings.prefill;
        ttft.push(first.as_secs_f64() * 1e3);
        prefill.push(c.usage.prompt_tokens as f64 / c.timings.prefill.as_secs_f64());
        decode.push((c.usage.completion_tokens - 1) as f64 / c.timings.decode.as_secs_f64());
        text = c.text;
    }

    let mut aggregate = Vec::new();
    for _ in 0..runs {
        let gens = (0..streams)
            .map(|_| engine.chat(&messages, params.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let done = gens
            .into_iter()
            .map(|g| g.wait())
            .collect::<Result<Vec<_>, _>>()?;
        let firsts = done.iter().map(|c| c.timings.queued + c.timings.prefill);
        let ends = done
            .iter()
            .map(|c| c.timings.queued + c.timings.prefill + c.timings.decode);
        let window = ends.max().unwrap_or_default() - firsts.max().unwrap_or_default();
        let produced: usize = done.iter().map(|c| c.usage.completion_tokens - 1).sum();
        aggregate.push(produced as f64 / window.as_secs_f64());
    }

    let out = serde_json::json!({
        "engine": "ours",
        "kernels": kernels.name(),
        "threads": threads,
        "load_ms": load_ms,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": tokens,
        "ttft_ms": median(ttft),
        "prefill_tok_s": median(prefill),
        "decode_tok_s": median(decode),
        "streams": streams,
        "aggregate_decode_tok_s": median(aggregate),
        "peak_rss_mib": peak_rss_mib(),
        "text": text,
    });
    println!("{out}");
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// VmHWM: the most resident memory this process ever had.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
