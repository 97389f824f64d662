//! The engine's side of `make bench-engine`: time to first token, prefill and decode speed on
//! one stream; for each number of concurrent streams, the aggregate decode speed and the
//! median and 99th percentile of the time between two tokens of a stream; peak RSS; as JSON.
//!
//! `bench MODEL.gguf PROMPT.txt [--tokens 128] [--streams 1,8,32] [--runs 3] [--threads 2]
//! [--kernels NAME]` (one of `Kernels::supported`, by name; the fastest by default)

use engine::{Completion, Engine, EngineConfig, Event, GenerationParams, Message, SamplingParams};
use std::time::{Duration, Instant};

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
        _ => return Err("usage: bench MODEL.gguf PROMPT.txt [--tokens N] [--streams N,N..] [--runs N] [--threads N]".into()),
    };
    let (tokens, runs, threads) = (
        opt("--tokens", 128)?,
        opt("--runs", 3)?,
        opt("--threads", 2)?,
    );
    let streams: Vec<usize> = match args.iter().position(|a| a == "--streams") {
        Some(i) => args
            .get(i + 1)
            .ok_or("missing value")?
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()?,
        None => vec![1, 8, 32],
    };

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
            max_sequences: streams.iter().copied().max().unwrap_or(1).max(1),
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

    let mut concurrency = Vec::new();
    for &n in &streams {
        let (mut aggregate, mut gaps) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (tok_s, g) = concurrent(&engine, &messages, &params, n)?;
            aggregate.push(tok_s);
            gaps.extend(g);
        }
        gaps.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            gaps.get(((gaps.len() as f64 * p) as usize).min(gaps.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        concurrency.push(serde_json::json!({
            "streams": n,
            "aggregate_decode_tok_s": median(aggregate),
            "itl_p50_ms": pct(0.5),
            "itl_p99_ms": pct(0.99),
        }));
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
        "concurrency": concurrency,
        "peak_rss_mib": peak_rss_mib(),
        "text": text,
    });
    println!("{out}");
    Ok(())
}

/// `n` requests submitted together, each read on its own thread as a client would: the
/// aggregate decode rate over the window in which all of them decode (from the last first
/// token to the last end), and every time between two consecutive tokens of a stream, in ms.
fn concurrent(
    engine: &Engine,
    messages: &[Message],
    params: &GenerationParams,
    n: usize,
) -> Result<(f64, Vec<f64>), Box<dyn std::error::Error>> {
    let gens = (0..n)
        .map(|_| engine.chat(messages, params.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let streams = std::thread::scope(|s| {
        let readers: Vec<_> = gens
            .into_iter()
            .map(|mut g| {
                s.spawn(move || {
                    let mut times = Vec::new();
                    let mut produced = 0;
                    while let Some(ev) = g.blocking_next() {
                        match ev {
                            Event::Text(_) => times.push(Instant::now()),
                            Event::Done { usage, .. } => produced = usage.completion_tokens,
                            Event::Failed(e) => return Err(e),
                        }
                    }
                    Ok((times, produced))
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().map_err(|_| "a reader panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let mut firsts = Vec::new();
    let mut ends = Vec::new();
    let mut gaps = Vec::new();
    let mut produced = 0;
    for s in streams {
        let (times, made) = s?;
        let (Some(first), Some(last)) = (times.first(), times.last()) else {
            continue;
        };
        firsts.push(*first);
        ends.push(*last);
        produced += made.saturating_sub(1);
        gaps.extend(times.windows(2).map(|w| {
            w.get(1)
                .zip(w.first())
                .map_or(Duration::ZERO, |(b, a)| *b - *a)
                .as_secs_f64()
                * 1e3
        }));
    }
    let window = match (firsts.iter().max(), ends.iter().max()) {
        (Some(f), Some(e)) => *e - *f,
        _ => Duration::ZERO,
    };
    Ok((produced as f64 / window.as_secs_f64(), gaps))
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
