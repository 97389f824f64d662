//! Bringing your own model, as a model owner does: `enclave --check-model` says what it would
//! serve and refuses what it cannot, naming the reason, and `make run` (scripts/run-local.sh)
//! with a model the enclave refuses stops within seconds with that reason, before sealing
//! anything, instead of retrying forever.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `target/<profile>/`, where `make test` builds every binary first.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn enclave(args: &[&str]) -> Output {
    let bin = bin_dir().join("enclave");
    assert!(
        bin.exists(),
        "{} is missing (`make test` builds it)",
        bin.display()
    );
    Command::new(bin).args(args).output().unwrap()
}

/// The default model with its `general.architecture` rewritten to `mamba` (same length), a
/// family neither the fast path nor this build runs: a real file that is refused for one reason.
fn refused_model(dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(tests::default_model()).expect("run `make model` first");
    let key = b"general.architecture";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the key is in the metadata");
    // Key, then the value type (u32 8 = string), the string length (u64 5) and "llama".
    let value = at + key.len() + 4 + 8;
    assert_eq!(&bytes[value..value + 5], b"llama");
    bytes[value..value + 5].copy_from_slice(b"mamba");
    let path = dir.join("mamba.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("byo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn check_model_describes_what_it_serves_and_names_what_it_refuses() {
    let ok = enclave(&["--check-model", tests::default_model().to_str().unwrap()]);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.contains("llama, 30 layers: Q4_1 ×210"), "{out}");
    assert!(out.contains("context 3640 tokens"), "{out}");

    let dir = tempdir("check");
    let refused = enclave(&["--check-model", refused_model(&dir).to_str().unwrap()]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(err.contains("model architecture `mamba`"), "{err}");
    assert!(
        err.contains("llama, qwen2, qwen3"),
        "the families it does run: {err}"
    );

    // Too large for the KV budget is refused too, with the numbers.
    let small = enclave(&[
        "--check-model",
        tests::default_model().to_str().unwrap(),
        "--kv-mib",
        "0",
    ]);
    let err = String::from_utf8_lossy(&small.stderr);
    assert_eq!(small.status.code(), Some(2), "{err}");
    assert!(err.contains("KV budget"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn make_run_stops_with_the_enclaves_reason_for_a_refused_model() {
    let dir = tempdir("run");
    let model = refused_model(&dir);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let t0 = Instant::now();
    // The script as `make run` runs it, with the binaries `make test` built (no rebuild: the
    // `cargo` it calls is `true`) and its own state and ports.
    let out = Command::new("bash")
        .arg(root.join("scripts/run-local.sh"))
        .current_dir(&root)
        .env("MODEL", &model)
        .env("CARGO", "true")
        .env("BIN", bin_dir())
        .env("STATE", dir.join("state"))
        .env("PROXY", free_port())
        .env("RELAY", free_port())
        .env("KMS", free_port())
        .output()
        .unwrap();
    let elapsed = t0.elapsed();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("model architecture `mamba`"), "{stderr}");
    assert!(stderr.contains("nothing was sealed"), "{stderr}");
    assert!(
        !dir.join("state/model.sealed").exists(),
        "a refused model is not sealed"
    );
    // Seconds, not a retry loop (generous for a loaded CI machine).
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The second test model through the whole stack, as a model owner would bring it: sealed,
/// released by KMS to the attested enclave, and asked through the attested channel. Qwen2.5
/// answers "Paris", greedily, in chat; and the legacy completions API continues a raw prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen_answers_through_the_whole_stack() {
    use common::bhttp::Request;
    let name = "qwen2.5-coder-0.5b-instruct";
    let stack = tests::stack::Stack::start_model(
        false,
        tests::stack::enclave_config(),
        &tests::qwen_model(),
        name,
        |_| {},
    )
    .await;
    let client = stack.client(&stack.url());
    let body = tests::stack::chat_body(
        name,
        "What is the capital of France? Answer in one word.",
        false,
        8,
    );
    let request = Request::new("POST", "/v1/chat/completions", body)
        .with_header("content-type", "application/json");
    let response = client.send(&request).await.unwrap();
    let status = response.status;
    let bytes = response.bytes().await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{answer:?}");

    let body = serde_json::json!({
        "model": name, "prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0,
    });
    let request = Request::new(
        "POST",
        "/v1/completions",
        serde_json::to_vec(&body).unwrap(),
    )
    .with_header("content-type", "application/json");
    let response = client.send(&request).await.unwrap();
    let status = response.status;
    let bytes = response.bytes().await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty());
    stack.stop().await;
}
