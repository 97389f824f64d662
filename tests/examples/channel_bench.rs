//! `make bench-channel`: what the attested channel costs, on the whole local stack with the
//! default model or `--model PATH` (mock-kms, the enclave with its OHTTP gateway, `host serve`, `client proxy`,
//! all in this process, loopback TCP and Unix sockets between them).
//!
//! 1. Decode tokens/s and time to first token of one streamed, greedy chat completion through
//!    the proxy and the relay, against the same request to an engine loaded in-process, in
//!    alternated rounds; the ratio and the TTFT the channel adds.
//! 2. For each count in `--streams` (1 and 8 by default), that many such requests at once, on
//!    both paths: the aggregate decode rate over the window in which all of them decode (from
//!    the last first token to the last end, as `engine/examples/bench` counts it) and its ratio
//!    to one stream's.
//! 3. Attestation round trip for a new client: nonce, document from the enclave through the
//!    relay, full verification.
//!
//! ```text
//! channel_bench [--rounds 5] [--max-tokens 128] [--attestations 20] [--model PATH]
//!               [--prompt FILE] [--streams 1,8]
//! ```
//!
//! `--prompt FILE` sends that text as the user's message (engine/bench/prompt.txt is the one
//! `make bench-engine` gives llama.cpp, so the time to first token compares with its
//! in-process figure).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::stack::Stack;

const PROMPT: &str = "Write a long story about a dragon who learns to bake bread.";

fn arg(name: &str, default: usize) -> usize {
    text_arg(name).map_or(default, |v| v.parse().unwrap())
}

fn text_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    ttft: Duration,
    tokens: usize,
    decode: Duration,
    /// When the first and the last text arrived.
    first: Instant,
    last: Instant,
}

impl Run {
    fn tps(&self) -> f64 {
        (self.tokens.saturating_sub(1)) as f64 / self.decode.as_secs_f64()
    }
}

/// Tokens per second of runs made at once, over the window in which all of them decode.
fn aggregate(runs: &[Run]) -> f64 {
    let from = runs.iter().map(|r| r.first).max().unwrap();
    let to = runs.iter().map(|r| r.last).max().unwrap();
    let tokens: usize = runs.iter().map(|r| r.tokens.saturating_sub(1)).sum();
    tokens as f64 / (to - from).as_secs_f64()
}

async fn in_process(engine: &engine::Engine, prompt: &str, max_tokens: usize) -> Run {
    let params = engine::GenerationParams {
        max_tokens: Some(max_tokens),
        sampling: engine::SamplingParams::greedy(),
        ..Default::default()
    };
    let start = Instant::now();
    let mut g = engine
        .chat(&[engine::Message::new("user", prompt)], params)
        .unwrap();
    let (mut first, mut last) = (None, None);
    loop {
        match g.next().await.unwrap() {
            engine::Event::Text(_) => {
                first.get_or_insert_with(Instant::now);
                last = Some(Instant::now());
            }
            engine::Event::Done { usage, .. } => {
                let (first, last) = (first.unwrap(), last.unwrap());
                return Run {
                    ttft: first - start,
                    tokens: usage.completion_tokens,
                    decode: last - first,
                    first,
                    last,
                };
            }
            engine::Event::Failed(e) => panic!("{e}"),
        }
    }
}

async fn through_proxy(
    proxy: std::net::SocketAddr,
    model: &str,
    prompt: &str,
    max_tokens: usize,
) -> Run {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": max_tokens,
        "temperature": 0,
    })
    .to_string();
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/v1/chat/completions")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let mut resp = sender.send_request(req).await.unwrap().into_body();
    let mut pending = Vec::new();
    let (mut first, mut last, mut tokens) = (None, None, 0);
    while let Some(frame) = resp.frame().await {
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let data = &event[6..event.len() - 2];
            if data == b"[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(data).unwrap();
            if v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                first.get_or_insert_with(Instant::now);
                last = Some(Instant::now());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
        }
    }
    let (first, last) = (first.unwrap(), last.unwrap());
    Run {
        ttft: first - start,
        tokens,
        decode: last - first,
        first,
        last,
    }
}

/// `n` runs started together, each on its own task.
async fn at_once<F, R>(n: usize, run: F) -> Vec<Run>
where
    F: Fn() -> R,
    R: std::future::Future<Output = Run> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(run())).collect();
    let mut runs = Vec::with_capacity(n);
    for t in tasks {
        runs.push(t.await.unwrap());
    }
    runs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = arg("--rounds", 5);
    let max_tokens = arg("--max-tokens", 128);
    let attestations = arg("--attestations", 20);

    let model = text_arg("--model").map_or_else(tests::default_model, Into::into);
    let prompt = text_arg("--prompt").map_or_else(
        || PROMPT.to_string(),
        |p| std::fs::read_to_string(p).unwrap().trim().to_string(),
    );
    let name = if text_arg("--model").is_some() {
        model.file_stem().unwrap().to_string_lossy().into_owned()
    } else {
        "smollm2".to_string()
    };

    eprintln!("starting the local stack on {}…", model.display());
    let stack =
        Stack::start_model(false, tests::stack::enclave_config(), &model, &name, |_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(client::proxy::serve(
        listener,
        Arc::new(stack.client(&stack.url())),
        client::proxy::DEFAULT_MAX_BODY,
    ));
    let weights = zeroize::Zeroizing::new(std::fs::read(&model).unwrap());
    let engine = Arc::new(engine::load(weights, stack.cfg.engine.clone()).unwrap());

    // Warm-up: attestation cached, caches and branch predictors warm on both paths.
    through_proxy(proxy, &name, &prompt, 8).await;
    in_process(&engine, &prompt, 8).await;

    let (mut ours, mut local) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let a = through_proxy(proxy, &name, &prompt, max_tokens).await;
        let b = in_process(&engine, &prompt, max_tokens).await;
        assert_eq!(
            a.tokens, b.tokens,
            "both paths generate the same greedy tokens"
        );
        eprintln!(
            "round {round}: channel {:.1} tok/s, TTFT {:.1} ms | in-process {:.1} tok/s, TTFT {:.1} ms ({} tokens)",
            a.tps(),
            a.ttft.as_secs_f64() * 1e3,
            b.tps(),
            b.ttft.as_secs_f64() * 1e3,
            a.tokens
        );
        ours.push(a);
        local.push(b);
    }
    let tps = |v: &[Run]| median(v.iter().map(Run::tps).collect());
    let ttft = |v: &[Run]| median(v.iter().map(|r| r.ttft.as_secs_f64() * 1e3).collect());

    // Concurrent streams, the two paths alternated round by round.
    let streams: Vec<usize> = text_arg("--streams")
        .unwrap_or_else(|| "1,8".into())
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    let mut concurrency = Vec::new();
    for &n in &streams {
        let (mut channel, mut local) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let a = at_once(n, || {
                let (name, prompt) = (name.clone(), prompt.clone());
                async move { through_proxy(proxy, &name, &prompt, max_tokens).await }
            })
            .await;
            let b = at_once(n, || {
                let (engine, prompt) = (engine.clone(), prompt.clone());
                async move { in_process(&engine, &prompt, max_tokens).await }
            })
            .await;
            let (a, b) = (aggregate(&a), aggregate(&b));
            eprintln!("{n} streams, round {round}: channel {a:.1} tok/s | in-process {b:.1} tok/s");
            channel.push(a);
            local.push(b);
        }
        concurrency.push((n, median(channel), median(local)));
    }
    let one = concurrency.iter().find(|c| c.0 == 1).copied();
    let concurrency: Vec<_> = concurrency
        .iter()
        .map(|&(n, channel, local)| {
            serde_json::json!({
                "streams": n,
                "aggregate_decode_tok_s": {"channel": channel, "in_process": local},
                "vs_one_stream": one.map(|o| serde_json::json!({"channel": channel / o.1, "in_process": local / o.2})),
            })
        })
        .collect();

    let mut rtts = Vec::new();
    for _ in 0..attestations {
        let client = stack.client(&stack.url());
        let t = Instant::now();
        client.attest().await.unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());

    let report = serde_json::json!({
        "model": model.display().to_string(),
        "rounds": rounds,
        "completion_tokens": ours[0].tokens,
        "decode_tok_s": {"channel": tps(&ours), "in_process": tps(&local), "ratio": tps(&ours) / tps(&local)},
        "ttft_ms": {"channel": ttft(&ours), "in_process": ttft(&local), "added": ttft(&ours) - ttft(&local)},
        "concurrency": concurrency,
        "attestation_rtt_ms": {"p50": rtts[rtts.len() / 2], "max": rtts[rtts.len() - 1], "n": rtts.len()},
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    stack.stop().await;
}
