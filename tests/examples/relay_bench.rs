//! The upstreams and the latency probe of `make bench-relay` (bench/relay.sh).
//!
//! ```text
//! relay_bench upstream --framed SOCK --http SOCK
//!     an echo enclave on SOCK with our framing (what `host serve` forwards to), and the same
//!     echo over HTTP/1.1 on the second socket (what nginx proxies to)
//! relay_bench latency --relay HOST:PORT --direct SOCK [--n 5000] [--size 256]
//!     sequential small requests straight to the enclave socket and through the relay;
//!     prints p50/p99 of both and what the relay adds, as JSON
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use common::transport::Endpoint;
use common::wire::io::{open, read_frame, read_preface, write_frame};
use common::wire::{Message, DEFAULT_MAX_PAYLOAD};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("upstream") => upstream(&args).await,
        Some("latency") => latency(&args).await,
        _ => {
            eprintln!("usage: relay_bench upstream --framed SOCK --http SOCK | latency --relay ADDR --direct SOCK");
            std::process::exit(2);
        }
    }
}

async fn upstream(args: &[String]) {
    let framed: Endpoint = format!("unix:{}", arg(args, "--framed").unwrap())
        .parse()
        .unwrap();
    let http = arg(args, "--http").unwrap();
    let _fake = tests::fake_enclave::start(
        &framed,
        tests::fake_enclave::Script::Echo {
            chunks: 1,
            delay: Duration::ZERO,
        },
        vec![],
    );
    let _ = std::fs::remove_file(&http);
    let listener = tokio::net::UnixListener::bind(&http).unwrap();
    eprintln!("upstreams ready");
    loop {
        let (conn, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    use http_body_util::BodyExt;
                    let body = req.into_body().collect().await?.to_bytes();
                    let mut resp = hyper::Response::new(http_body_util::Full::new(body));
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(common::media::RESPONSE_MEDIA_TYPE),
                    );
                    Ok::<_, hyper::Error>(resp)
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                .await;
        });
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn latency(args: &[String]) {
    let relay = arg(args, "--relay").unwrap();
    let direct: Endpoint = format!("unix:{}", arg(args, "--direct").unwrap())
        .parse()
        .unwrap();
    let n: usize = arg(args, "--n").map_or(5000, |v| v.parse().unwrap());
    let size: usize = arg(args, "--size").map_or(256, |v| v.parse().unwrap());
    let body = vec![0x42u8; size];

    let mut direct_times = Vec::with_capacity(n);
    let mut relay_times = Vec::with_capacity(n);
    let mut tcp = tokio::net::TcpStream::connect(&relay).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let head = format!(
        "POST /v1/ohttp HTTP/1.1\r\nhost: bench\r\ncontent-type: message/ohttp-chunked-req\r\ncontent-length: {size}\r\n\r\n"
    );
    let request = [head.as_bytes(), &body].concat();
    let mut buf = vec![0u8; 64 << 10];
    // Interleaved, so both see the same machine state; the first 10% warm up.
    for i in 0..n + n / 10 {
        let t0 = Instant::now();
        let mut conn = direct.connect().await.unwrap();
        open(&mut conn, &Message::RequestData(body.clone()))
            .await
            .unwrap();
        write_frame(&mut conn, &Message::RequestEnd).await.unwrap();
        read_preface(&mut conn).await.unwrap();
        let mut got = 0;
        loop {
            match read_frame(&mut conn, DEFAULT_MAX_PAYLOAD).await.unwrap() {
                Message::ResponseData(b) => got += b.len(),
                Message::ResponseEnd => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, size);
        let d = t0.elapsed();

        let t0 = Instant::now();
        tcp.write_all(&request).await.unwrap();
        let mut have = 0;
        loop {
            let k = tcp.read(&mut buf[have..]).await.unwrap();
            assert!(k > 0, "relay closed the connection");
            have += k;
            if response_complete(&buf[..have]) {
                break;
            }
        }
        let r = t0.elapsed();
        assert!(
            buf.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..have])
        );
        if i >= n / 10 {
            direct_times.push(d);
            relay_times.push(r);
        }
    }
    direct_times.sort();
    relay_times.sort();
    let (d50, d99) = (
        percentile(&direct_times, 0.5),
        percentile(&direct_times, 0.99),
    );
    let (r50, r99) = (
        percentile(&relay_times, 0.5),
        percentile(&relay_times, 0.99),
    );
    println!(
        "{}",
        serde_json::json!({
            "requests": n,
            "body_bytes": size,
            "direct_p50_ms": d50, "direct_p99_ms": d99,
            "relay_p50_ms": r50, "relay_p99_ms": r99,
            "added_p50_ms": r50 - d50, "added_p99_ms": r99 - d99,
        })
    );
}

/// Whether `raw` holds a whole response: by its content-length, or its last chunk.
fn response_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    match head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        Some(len) => raw.len() >= end + 4 + len,
        None => raw.ends_with(b"\r\n0\r\n\r\n"),
    }
}
