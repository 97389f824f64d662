//! The `client` binary as users run it, against the whole local stack: `client policy` writes a
//! policy from the image's measurements and the two digests, `client attest` prints what it
//! verified, `client chat` streams an answer, and a wrong policy fails naming the check.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::process::{Command, Output};
use tests::stack::Stack;

/// `target/<profile>/client`. `cargo test` does not build other packages' binaries, so
/// `make test` builds them first.
fn client_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("client");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p client` (`make test` does)",
        bin.display()
    );
    bin
}

async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || Command::new(client_bin()).args(args).output().unwrap())
        .await
        .unwrap()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_attest_and_chat_from_the_command_line() {
    let stack = Stack::start().await;
    let dir = tests::tempdir("client-cli");
    let measurements = dir.join("measurements.json");
    let m = common::nsm::mock::ImageMeasurement::from_label(tests::IMAGE);
    let pcrs: std::collections::BTreeMap<u8, [u8; 48]> =
        [(0, m.pcr0), (1, m.pcr1), (2, m.pcr2)].into();
    std::fs::write(
        &measurements,
        host::policy::measurements_json(&pcrs).to_string(),
    )
    .unwrap();
    let want = stack.policy_file();
    let policy = dir.join("policy.toml");
    let out = run(s(&[
        "policy",
        "--measurements",
        measurements.to_str().unwrap(),
        "--model-sha256",
        &want.model_sha256,
        "--config-sha256",
        &want.config_sha256,
        "--root",
        stack.root_pem().to_str().unwrap(),
        "--output",
        policy.to_str().unwrap(),
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = client::policy::ClientPolicyFile::load(&policy).unwrap();
    assert_eq!(written.pcrs, want.pcrs);
    assert_eq!(written.model_sha256, want.model_sha256);

    let url = stack.url();
    let out = run(s(&[
        "attest",
        "--url",
        &url,
        "--policy",
        policy.to_str().unwrap(),
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let facts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(facts["model"], "smollm2");
    assert_eq!(
        facts["pcrs"]["16"],
        hex::encode(common::sealed::model_pcr16(&stack.model_sha256))
    );

    let out = run(s(&[
        "chat",
        "--url",
        &url,
        "--policy",
        policy.to_str().unwrap(),
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "Say hello.",
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());

    // Another model pinned: refused, and the message names the check.
    let mut wrong = want.clone();
    wrong.model_sha256 = "00".repeat(32);
    let wrong_path = dir.join("wrong.toml");
    std::fs::write(&wrong_path, wrong.to_toml()).unwrap();
    let out = run(s(&[
        "attest",
        "--url",
        &url,
        "--policy",
        wrong_path.to_str().unwrap(),
    ]))
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PCR16"), "{err}");
    stack.stop().await;
}
