//! `host serve` against a scripted fake enclave (faults) and against the real enclave in
//! local mode: streams relayed as they come, an enclave dying mid-stream or restarting, huge
//! bodies, slow clients, a thousand concurrent streams, rate and in-flight limits, client
//! disconnects cancelling the enclave's work, and no content in metrics or logs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use common::transport::Endpoint;
use host::serve::config::ServeConfig;
use host::serve::http::OHTTP_REQ;
use host::serve::Relay;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::fake_enclave::{self, Script};
use tests::http::{parse, request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn logs() -> Arc<Mutex<Vec<u8>>> {
    tests::captured_logs()
}

fn socket(tag: &str) -> Endpoint {
    Endpoint::Unix(tests::tempdir(tag).join("enclave.sock"))
}

async fn relay(enclave: &Endpoint, edit: impl FnOnce(&mut ServeConfig)) -> Relay {
    logs();
    let mut cfg = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        enclave: enclave.to_string(),
        ping_interval_ms: 100,
        enclave_timeout_ms: 2_000,
        max_backoff_ms: 200,
        ..Default::default()
    };
    edit(&mut cfg);
    host::serve::start(cfg, None).await.unwrap()
}

async fn wait_ready(addr: SocketAddr, want: bool) {
    tests::http::wait_ready(addr, want, Duration::from_secs(20)).await;
}

async fn post(addr: SocketAddr, body: &[u8]) -> tests::http::Response {
    request(addr, "POST", "/v1/ohttp", Some(OHTTP_REQ), body).await
}

/// Posts `body` to `/v1/ohttp` on a raw connection and reads no more than the 200 status line.
async fn post_and_read_status(s: &mut TcpStream, body: &[u8]) {
    s.write_all(
        format!("POST /v1/ohttp HTTP/1.1\r\nhost: t\r\ncontent-type: {OHTTP_REQ}\r\ncontent-length: {}\r\n\r\n", body.len())
            .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(body).await.unwrap();
    let mut first = [0u8; 64];
    let n = s.read(&mut first).await.unwrap();
    assert!(std::str::from_utf8(&first[..n])
        .unwrap()
        .starts_with("HTTP/1.1 200"));
}

fn echo(chunks: usize, delay_ms: u64) -> Script {
    Script::Echo {
        chunks,
        delay: Duration::from_millis(delay_ms),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_relayed_and_no_content_reaches_metrics_logs_or_audit() {
    let ep = socket("relay-canary");
    let audit_dir = tests::tempdir("audit");
    let audit_path = audit_dir.join("audit.jsonl");
    let record = r#"{"request_id":"r-1","model":"fake","tokens_in":3}"#.to_string();
    let _fake = fake_enclave::start(&ep, echo(3, 20), vec![record.clone()]);
    let r = relay(&ep, |c| c.audit_log = Some(audit_path.clone())).await;
    wait_ready(r.local_addr, true).await;

    let canary = b"CANARY-7f3a9c-secret-prompt-bytes";
    let resp = post(r.local_addr, canary).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("content-type"),
        Some("message/ohttp-chunked-res")
    );
    assert!(resp.complete);
    assert_eq!(resp.body, canary);
    assert!(resp.header("x-request-id").is_some());

    // Attestation: the nonce is passed through, and the document comes back as CBOR.
    let a = request(r.local_addr, "GET", "/v1/attestation?nonce=00ff", None, b"").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("application/cbor"));
    assert_eq!(a.body, b"fake-document:\x00\xff");
    for bad in [
        "",
        "?nonce=",
        "?nonce=zz",
        &format!("?nonce={}", "ab".repeat(65)),
    ] {
        let a = request(
            r.local_addr,
            "GET",
            &format!("/v1/attestation{bad}"),
            None,
            b"",
        )
        .await;
        assert_eq!(a.status, 400, "{bad}: {}", a.text());
        assert!(a.text().contains("bad_nonce"));
    }

    let metrics = request(r.admin_addr, "GET", "/metrics", None, b"")
        .await
        .text();
    assert!(
        metrics.contains(r#"relay_requests_total{route="/v1/ohttp",status="200"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("relay_attestation_requests_total 1"));
    assert!(metrics.contains("relay_enclave_ready 1"));
    assert!(metrics.contains(&format!("relay_body_bytes_in_total {}", canary.len())));
    assert!(metrics.contains("relay_audit_events_total 1"));

    // The audit record arrived and was written as one JSON line.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&audit_path)
        .unwrap_or_default()
        .contains(&record)
    {
        assert!(Instant::now() < deadline, "audit record not written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let canary = std::str::from_utf8(canary).unwrap();
    assert!(!metrics.contains(canary));
    let logged = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(
        logged.contains("\"route\":\"/v1/ohttp\""),
        "the request was logged"
    );
    assert!(!logged.contains(canary), "a body reached the log");
    assert!(!std::fs::read_to_string(&audit_path)
        .unwrap()
        .contains(canary));
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enclave_dying_mid_stream_cuts_the_response_and_nothing_hangs() {
    let ep = socket("relay-die");
    let _fake = fake_enclave::start(&ep, Script::DieMidStream, vec![]);
    let r = relay(&ep, |_| {}).await;
    wait_ready(r.local_addr, true).await;
    let resp = tokio::time::timeout(Duration::from_secs(10), post(r.local_addr, &[1; 64]))
        .await
        .expect("the client was left hanging");
    assert_eq!(resp.status, 200);
    assert!(!resp.complete, "a cut stream must not look complete");
    assert_eq!(resp.body, [1; 32]);
    // The relay itself is fine.
    assert_eq!(
        request(r.local_addr, "GET", "/healthz", None, b"")
            .await
            .status,
        200
    );
    let metrics = request(r.admin_addr, "GET", "/metrics", None, b"")
        .await
        .text();
    assert!(
        metrics.contains("relay_upstream_failures_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_reconnects_when_the_enclave_restarts() {
    let ep = socket("relay-restart");
    let fake = fake_enclave::start(&ep, echo(1, 0), vec![]);
    let r = relay(&ep, |_| {}).await;
    wait_ready(r.local_addr, true).await;
    fake.kill();
    wait_ready(r.local_addr, false).await;
    // Requests fail fast while it is down.
    let t0 = Instant::now();
    let resp = post(r.local_addr, b"x").await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(resp.header("retry-after").is_some());
    assert!(t0.elapsed() < Duration::from_secs(2));

    let _fake = fake_enclave::start(&ep, echo(1, 0), vec![]);
    wait_ready(r.local_addr, true).await;
    assert_eq!(post(r.local_addr, b"again").await.body, b"again");
    let metrics = request(r.admin_addr, "GET", "/metrics", None, b"")
        .await
        .text();
    let connects: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("relay_enclave_connects_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(connects >= 2, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_body_is_refused_without_being_read() {
    let ep = socket("relay-huge");
    let fake = fake_enclave::start(&ep, echo(1, 0), vec![]);
    let r = relay(&ep, |c| c.max_body_bytes = 1 << 16).await;
    wait_ready(r.local_addr, true).await;

    // Declared: 1 GB. Only the headers are sent, and the answer comes anyway.
    let mut s = TcpStream::connect(r.local_addr).await.unwrap();
    s.write_all(
        format!("POST /v1/ohttp HTTP/1.1\r\nhost: t\r\ncontent-type: {OHTTP_REQ}\r\ncontent-length: 1000000000\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&[0; 4096]).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), tests::http::read_response(&mut s))
        .await
        .expect("413 must not wait for the body");
    assert_eq!(resp.status, 413);
    assert!(resp.text().contains("body_too_large"));

    // Undeclared (chunked): cut once it passes the limit.
    let mut s = TcpStream::connect(r.local_addr).await.unwrap();
    s.write_all(
        format!("POST /v1/ohttp HTTP/1.1\r\nhost: t\r\ncontent-type: {OHTTP_REQ}\r\ntransfer-encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let chunk = [b"8000\r\n".as_slice(), &[0u8; 0x8000], b"\r\n"].concat();
    // 2 MiB in all, then the body's end: a relay without the limit would pass a whole
    // request on.
    let writer = async {
        for _ in 0..64 {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await;
    assert_eq!(parse(&raw).status, 413);
    // The enclave never received a whole request: the declared one was refused before any
    // byte went on, the chunked one was cut before its end.
    assert_eq!(fake.bodies.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    let ep = socket("relay-slow");
    let _fake = fake_enclave::start(&ep, echo(1, 0), vec![]);
    let r = relay(&ep, |c| {
        c.header_timeout_ms = 300;
        c.body_timeout_ms = 300;
        c.idle_timeout_ms = 300;
    })
    .await;
    wait_ready(r.local_addr, true).await;

    // Headers that never end: the connection is closed.
    let mut s = TcpStream::connect(r.local_addr).await.unwrap();
    s.write_all(b"POST /v1/ohttp HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a slow-loris client was kept");

    // A body that trickles: 408.
    let mut s = TcpStream::connect(r.local_addr).await.unwrap();
    s.write_all(
        format!("POST /v1/ohttp HTTP/1.1\r\nhost: t\r\ncontent-type: {OHTTP_REQ}\r\ncontent-length: 100\r\n\r\n0123456789")
            .as_bytes(),
    )
    .await
    .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), tests::http::read_response(&mut s))
        .await
        .expect("a trickling body was kept");
    assert_eq!(resp.status, 408);

    // An idle keep-alive connection is closed.
    let mut s = TcpStream::connect(r.local_addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "an idle connection was kept");
    assert_eq!(parse(&buf).status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_head_is_cut_and_a_long_stream_is_not() {
    let ep = socket("relay-trickle");
    let _fake = fake_enclave::start(&ep, echo(4, 250), vec![]);
    // Only the header limit is short: bytes that keep moving do not save a head that never
    // ends, and a response that streams for longer than the limit is not cut.
    let r = relay(&ep, |c| {
        c.header_timeout_ms = 300;
        c.idle_timeout_ms = 60_000;
    })
    .await;
    wait_ready(r.local_addr, true).await;

    let mut s = TcpStream::connect(r.local_addr).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut cut = false;
    for b in b"POST /v1/ohttp HTTP/1.1\r\nhost: t\r\nx-slow: "
        .iter()
        .cycle()
        .take(200)
    {
        if s.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => {
                cut = true;
                break;
            }
            Ok(Ok(_)) => panic!("the relay answered a head that never ended"),
            Err(_) => {}
        }
    }
    assert!(cut, "a head trickling for {:?} was kept", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // 4 pieces 250 ms apart: 750 ms of streaming against a 300 ms header limit.
    let body: Vec<u8> = (0..64u8).collect();
    let resp = post(r.local_addr, &body).await;
    assert!(resp.complete && resp.body == body, "{:?}", resp.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_complete_in_bounded_memory() {
    let ep = socket("relay-1000");
    let _fake = fake_enclave::start(&ep, echo(4, 10), vec![]);
    let r = relay(&ep, |c| {
        c.rate_burst = 10_000.0;
        c.max_in_flight_per_client = 10_000;
    })
    .await;
    wait_ready(r.local_addr, true).await;
    let rss_before = rss_kib();
    let addr = r.local_addr;
    let tasks: Vec<_> = (0..1000u32)
        .map(|i| {
            tokio::spawn(async move {
                let body: Vec<u8> = (0..1024u32).map(|j| (i * 31 + j) as u8).collect();
                let resp = post(addr, &body).await;
                if !(resp.complete && resp.body == body) {
                    eprintln!(
                        "stream {i}: complete {} len {} headers {:?}",
                        resp.complete,
                        resp.body.len(),
                        resp.headers
                    );
                }
                (resp.status, resp.complete && resp.body == body)
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, true));
    }
    let grown = rss_kib().saturating_sub(rss_before);
    // 1000 streams of 1 KiB each through two hops: tens of MiB at most, not unbounded.
    assert!(grown < 256 * 1024, "RSS grew by {grown} KiB");
    let metrics = request(r.admin_addr, "GET", "/metrics", None, b"")
        .await
        .text();
    assert!(metrics.contains(r#"relay_requests_total{route="/v1/ohttp",status="200"} 1000"#));
    assert!(
        metrics.contains("relay_in_flight_requests 0"),
        "every stream is done and /metrics is not a client request: {metrics}"
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_and_in_flight_limits_answer_429_and_503() {
    let ep = socket("relay-limits");
    let fake = fake_enclave::start(&ep, echo(2, 1_000), vec![]);
    let r = relay(&ep, |c| {
        c.rate_per_second = 0.5;
        c.rate_burst = 3.0;
        c.max_in_flight = 1;
    })
    .await;
    wait_ready(r.local_addr, true).await;
    let addr = r.local_addr;
    // One slow stream holds the only slot.
    let slow = tokio::spawn(async move { post(addr, b"slow stream").await });
    fake.wait_streams(1).await;
    let busy = post(addr, b"x").await;
    assert_eq!(busy.status, 503, "{}", busy.text());
    assert!(busy.text().contains("overloaded"));
    assert!(busy.header("retry-after").is_some());
    // The burst of 3 is spent (slow, busy, this one); the next is over the rate.
    let _ = post(addr, b"x").await;
    let limited = post(addr, b"x").await;
    assert_eq!(limited.status, 429, "{}", limited.text());
    assert!(limited.header("retry-after").is_some());
    assert_eq!(slow.await.unwrap().status, 200);
    // Health and metrics are not rate-limited.
    assert_eq!(
        request(addr, "GET", "/healthz", None, b"").await.status,
        200
    );
    let metrics = request(r.admin_addr, "GET", "/metrics", None, b"")
        .await
        .text();
    assert!(metrics.contains("relay_rate_limited_total 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_every_slot() {
    let ep = socket("relay-per-client");
    let fake = fake_enclave::start(&ep, echo(2, 1_000), vec![]);
    let r = relay(&ep, |c| c.max_in_flight_per_client = 2).await;
    wait_ready(r.local_addr, true).await;
    let addr = r.local_addr;
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { post(addr, b"slow stream").await }))
        .collect();
    fake.wait_streams(2).await;
    let third = post(addr, b"x").await;
    assert_eq!(third.status, 429, "{}", third.text());
    assert!(third.text().contains("too_many_in_flight"));
    assert!(third.header("retry-after").is_some());
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
    // The slots come back when the streams end.
    assert_eq!(post(addr, b"x").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_and_its_work_cancelled() {
    let ep = socket("relay-stall");
    // A large answer over two seconds: more than the sockets between the relay and the client
    // hold, so the relay's writes wait while the enclave still has pieces to send.
    // (Loopback's 64 KiB segments let the kernel take up to 4 MiB, tcp_wmem's maximum.)
    let mut fake = fake_enclave::start(&ep, echo(128, 30), vec![]);
    let r = relay(&ep, |c| {
        c.write_stall_ms = 500;
        c.max_body_bytes = 16 << 20;
    })
    .await;
    wait_ready(r.local_addr, true).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(r.local_addr).await.unwrap();
    let body = vec![7u8; 12 << 20];
    post_and_read_status(&mut s, &body).await;
    // Never read again, but keep the connection open: the relay cuts it.
    tokio::time::timeout(Duration::from_secs(10), fake.cancelled.recv())
        .await
        .expect("a client that stopped reading kept its stream in the enclave")
        .unwrap();
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_going_away_cancels_the_work_in_the_enclave() {
    let ep = socket("relay-cancel");
    let mut fake = fake_enclave::start(&ep, echo(50, 100), vec![]);
    let r = relay(&ep, |_| {}).await;
    wait_ready(r.local_addr, true).await;
    let mut s = TcpStream::connect(r.local_addr).await.unwrap();
    let body = [9u8; 500];
    post_and_read_status(&mut s, &body).await;
    drop(s);
    tokio::time::timeout(Duration::from_secs(10), fake.cancelled.recv())
        .await
        .expect("the enclave kept working for a client that left")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_routes_methods_and_content_types_get_json_errors() {
    let ep = socket("relay-routes");
    let _fake = fake_enclave::start(&ep, echo(1, 0), vec![]);
    let r = relay(&ep, |_| {}).await;
    wait_ready(r.local_addr, true).await;
    let a = r.local_addr;
    let cases = [
        (request(a, "GET", "/nope", None, b"").await, 404),
        (request(a, "GET", "/v1/ohttp", None, b"").await, 405),
        (
            request(a, "POST", "/v1/ohttp", Some("application/json"), b"{}").await,
            415,
        ),
    ];
    for (resp, status) in cases {
        assert_eq!(resp.status, status);
        let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert!(v["error"]["code"].is_string(), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_streams_and_stops_accepting() {
    let ep = socket("relay-drain");
    let fake = fake_enclave::start(&ep, echo(4, 150), vec![]);
    let r = relay(&ep, |c| c.shutdown_grace_ms = 10_000).await;
    wait_ready(r.local_addr, true).await;
    let addr = r.local_addr;
    let stream = tokio::spawn(async move { post(addr, b"0123456789abcdef").await });
    fake.wait_streams(1).await;
    r.shutdown().await;
    let resp = stream.await.unwrap();
    assert_eq!(resp.status, 200);
    assert!(resp.complete, "the in-flight stream was cut by shutdown");
    assert_eq!(resp.body, b"0123456789abcdef");
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

/// A self-signed certificate for 127.0.0.1, made with the openssl CLI.
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-days",
            "1",
            "-subj",
            "/CN=relay-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the TLS test needs the openssl CLI (Debian package openssl)");
    assert!(status.success());
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_client_listener() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let ep = socket("relay-tls");
    let _fake = fake_enclave::start(&ep, echo(2, 0), vec![]);
    let dir = tests::tempdir("tls");
    let (cert, key) = self_signed(&dir);
    let r = relay(&ep, |c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&cert).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let tcp = TcpStream::connect(r.local_addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let req = format!(
            "POST /v1/ohttp HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-type: {OHTTP_REQ}\r\ncontent-length: 6\r\n\r\nsecret"
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let _ = tls.read_to_end(&mut raw).await;
        let resp = parse(&raw);
        if resp.status == 200 {
            break resp.body;
        }
        assert_eq!(resp.status, 503, "{}", resp.text());
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body, b"secret");
    // Plain HTTP to a TLS listener gets nowhere.
    let mut plain = TcpStream::connect(r.local_addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut raw)).await;
    assert!(!raw.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_to_the_operator_listener_only() {
    let ep = socket("relay-admin");
    let _fake = fake_enclave::start(&ep, echo(2, 1_000), vec![]);
    let r = relay(&ep, |_| {}).await;
    wait_ready(r.local_addr, true).await;
    assert_eq!(post(r.local_addr, b"counted").await.status, 200);
    // Clients' listener: no metrics (they tell every client's sizes and timings).
    let public = request(r.local_addr, "GET", "/metrics", None, b"").await;
    assert_eq!(public.status, 404, "{}", public.text());
    assert!(!public.text().contains("relay_requests_total"));
    // The operator's: the metrics and the probes, and none of the client routes.
    let admin = request(r.admin_addr, "GET", "/metrics", None, b"").await;
    assert_eq!(admin.status, 200);
    assert!(
        admin
            .text()
            .contains(r#"relay_requests_total{route="/v1/ohttp",status="200"} 1"#),
        "{}",
        admin.text()
    );
    assert!(
        admin.text().contains(r#"route="other",status="404"} 1"#),
        "the public /metrics probe counts as an unknown route: {}",
        admin.text()
    );
    assert_eq!(
        request(r.admin_addr, "GET", "/readyz", None, b"")
            .await
            .status,
        200
    );
    assert_eq!(
        request(r.admin_addr, "GET", "/healthz", None, b"")
            .await
            .status,
        200
    );
    let ohttp = request(r.admin_addr, "POST", "/v1/ohttp", None, b"x").await;
    assert_eq!(ohttp.status, 404);
    assert_eq!(
        request(r.admin_addr, "POST", "/metrics", None, b"")
            .await
            .status,
        405
    );
    // The default keeps the operator's listener on loopback.
    assert!(ServeConfig::default().admin_listen.ip().is_loopback());
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_reaches_an_enclave_through_hybrid_vsock() {
    // An emulated enclave's vsock port 5000 behind its VMM's Unix socket: the relay speaks
    // `CONNECT 5000` there, then the same frames as over vsock.
    let dir = tests::tempdir("relay-hvsock");
    let guest = Endpoint::Unix(dir.join("guest.sock"));
    let _fake = fake_enclave::start(&guest, echo(2, 0), vec![]);
    let device = dir.join("vhost.vsock");
    let device_did = tests::stack::hybrid_vsock_device(&device, 5000, guest);
    let ep: Endpoint = format!("hvsock:{}:5000", device.display()).parse().unwrap();
    let r = relay(&ep, |_| {}).await;
    wait_ready(r.local_addr, true).await;
    let answer = post(r.local_addr, b"through the hybrid socket").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, b"through the hybrid socket");
    // The control connection and the request's, at least, each named the port.
    let count = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::Relaxed);
    assert!(count(&device_did.spliced) >= 2);
    // A port nothing listens on: the device closes each attempt, the relay stays not ready.
    let wrong: Endpoint = format!("hvsock:{}:5001", device.display()).parse().unwrap();
    let r2 = relay(&wrong, |_| {}).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while count(&device_did.refused) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never tried"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        request(r2.local_addr, "GET", "/readyz", None, b"")
            .await
            .status,
        503
    );
    r2.shutdown().await;
    r.shutdown().await;
}
