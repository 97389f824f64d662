//! `client proxy` with unmodified OpenAI clients: the official Python SDK (`pip install
//! openai`, installed by `make test-deps`) and curl, on the whole local stack with the default
//! model. Streaming and non-streaming chat completions and legacy completions, `models.list()`,
//! errors in OpenAI's shape.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;
use std::sync::Arc;
use tests::stack::Stack;

async fn start_proxy(client: client::Client) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(client::proxy::serve(
        listener,
        Arc::new(client),
        client::proxy::DEFAULT_MAX_BODY,
    ));
    addr
}

async fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = {
        let mut cmd = std::mem::replace(cmd, Command::new("true"));
        tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("cannot run the command (make test-deps installs it): {e}"))
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_and_curl_work_through_the_proxy() {
    let stack = Stack::start().await;
    let addr = start_proxy(stack.client(&stack.url())).await;
    let base = format!("http://{addr}/v1");

    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_sdk.py");
    let (ok, out, err) = run(Command::new(&python).args([script, &base, "smollm2"])).await;
    assert!(ok, "the OpenAI SDK script failed:\n{out}\n{err}");
    let seen: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(seen["models"][0], "smollm2");
    assert!(!seen["text"].as_str().unwrap().is_empty());
    assert!(!seen["legacy"].as_str().unwrap().is_empty());

    // curl, streaming: server-sent events as they come.
    let body = r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"stream":true,"max_tokens":8}"#;
    let (ok, out, err) = run(Command::new("curl").args([
        "-sS",
        "-N",
        "-f",
        &format!("{base}/chat/completions"),
        "-H",
        "content-type: application/json",
        "-d",
        body,
    ]))
    .await;
    assert!(ok, "curl failed: {err}");
    assert!(out.starts_with("data: {"), "{out}");
    assert!(out.ends_with("data: [DONE]\n\n"), "{out}");

    // curl on the legacy completions API, streaming: text_completion events.
    let body = r#"{"model":"smollm2","prompt":"Once upon a time","stream":true,"max_tokens":6}"#;
    let (ok, out, err) = run(Command::new("curl").args([
        "-sS",
        "-N",
        "-f",
        &format!("{base}/completions"),
        "-H",
        "content-type: application/json",
        "-d",
        body,
    ]))
    .await;
    assert!(ok, "curl failed: {err}");
    assert!(out.contains(r#""object":"text_completion""#), "{out}");
    assert!(out.ends_with("data: [DONE]\n\n"), "{out}");

    // The verified facts, and errors in OpenAI's shape.
    let (ok, out, _) =
        run(Command::new("curl").args(["-sS", &format!("{base}/attestation")])).await;
    assert!(ok);
    let facts: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(facts["verified"], true);
    assert_eq!(facts["model_sha256"], hex::encode(stack.model_sha256));
    let (_, out, _) = run(Command::new("curl").args(["-sS", &format!("{base}/nope")])).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_nothing_when_attestation_fails() {
    let stack = Stack::start().await;
    let mitm = tests::stack::Mitm::start(stack.relay.local_addr).await;
    let mut file = stack.policy_file();
    file.pcrs.insert("0".into(), "00".repeat(48));
    let policy = file.to_policy().unwrap();
    let client = client::Client::new(client::ClientConfig::new(mitm.url(), policy)).unwrap();
    let addr = start_proxy(client).await;
    let body = r#"{"model":"smollm2","messages":[{"role":"user","content":"PROXY-CANARY"}]}"#;
    let (_, out, _) = run(Command::new("curl").args([
        "-sS",
        "-w",
        "\n%{http_code}",
        &format!("http://{addr}/v1/chat/completions"),
        "-H",
        "content-type: application/json",
        "-d",
        body,
    ]))
    .await;
    let (json, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "502", "{out}");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["error"]["code"], "attestation_failed");
    let requests = mitm.requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("GET /v1/attestation")),
        "{requests:?}"
    );
    stack.stop().await;
}
