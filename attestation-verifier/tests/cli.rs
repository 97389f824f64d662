//! The `attestation-verifier` binary: exit 0 valid, 1 rejected (reason on stderr and in
//! JSON), 2 usage or I/O error; policy files; stdin; inspect.

// Test code: a panic is a test failure, which is what these lints guard against elsewhere.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
mod forge;

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attestation-verifier"))
        .args(args)
        .output()
        .unwrap()
}

fn vector(name: &str) -> String {
    common::nitro_dir()
        .join(name)
        .to_string_lossy()
        .into_owned()
}

const MARLIN_TIME: &str = "2024-02-26T07:02:01.439Z";
const MARLIN_PCR0: &str = "17bf8f048519797be90497001a7559a3d555395937117d76f8baaedf56ca6d97952de79479bc0c76e5d176d20f663790";

#[test]
fn valid_rejected_and_usage_exit_codes() {
    let doc = vector("marlin_sample1.cbor");
    let ok = cli(&[
        "verify",
        &doc,
        "--at",
        MARLIN_TIME,
        "--pcr",
        &format!("0={MARLIN_PCR0}"),
    ]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("VALID"));

    let now = cli(&["verify", &doc]);
    assert_eq!(now.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&now.stderr).contains("certificate_expired"));

    let wrong_pcr = cli(&[
        "verify",
        &doc,
        "--at",
        "1708930921439",
        "--pcr",
        &format!("0={}", "00".repeat(48)),
        "--json",
    ]);
    assert_eq!(wrong_pcr.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&wrong_pcr.stdout).unwrap();
    assert_eq!(json["valid"], false);
    assert_eq!(json["error"]["check"], "pcr_mismatch");

    for bad in [
        vec!["verify", "/nonexistent/doc"],
        vec!["verify", &doc, "--pcr", "0=zz"],
        vec!["verify", &doc, "--pcr", "40=00"],
        vec!["verify", &doc, "--at", "yesterday"],
        vec!["verify", &doc, "--root", "/nonexistent.pem"],
        vec!["frobnicate"],
    ] {
        assert_eq!(cli(&bad).status.code(), Some(2), "{bad:?}");
    }
}

#[test]
fn debug_documents_need_allow_debug() {
    let doc = vector("eternis_example.cbor");
    let at = "2024-09-09T19:49:12.400Z";
    assert_eq!(cli(&["verify", &doc, "--at", at]).status.code(), Some(1));
    let ok = cli(&["verify", &doc, "--at", at, "--allow-debug", "--json"]);
    assert_eq!(ok.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(json["document"]["debug"], true);
}

#[test]
fn policy_file_and_stdin() {
    let dir = std::env::temp_dir().join(format!("av-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!("max_age_secs = 10\n[pcrs]\n0 = \"{MARLIN_PCR0}\"\n"),
    )
    .unwrap();
    let bytes = std::fs::read(vector("marlin_sample1.cbor")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_attestation-verifier"))
        .args([
            "verify",
            "-",
            "--at",
            MARLIN_TIME,
            "--policy",
            policy.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same document 11 s later is too old for this policy.
    let late = cli(&[
        "verify",
        &vector("marlin_sample1.cbor"),
        "--at",
        "1708930932440",
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert_eq!(late.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&late.stderr).contains("too_old"));

    std::fs::write(&policy, "max_agee = 10\n").unwrap();
    let typo = cli(&[
        "verify",
        &vector("marlin_sample1.cbor"),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert_eq!(
        typo.status.code(),
        Some(2),
        "unknown policy keys are a usage error"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inspect_marks_output_unverified() {
    let out = cli(&["inspect", &vector("base_hinted_repaired.cbor")]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("UNVERIFIED"));
    assert!(text.contains("cabundle[3]:") && text.contains("PCR15"));
    let json = cli(&["inspect", &vector("base_hinted_repaired.cbor"), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert_eq!(v["cabundle"].as_array().unwrap().len(), 4);
    assert_eq!(
        cli(&["inspect", &vector("nitrotpm_live_NOT_ENCLAVE.cbor")])
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn inspect_escapes_control_characters_from_the_document() {
    // An unverified document chooses its module_id and its certificates' names: none of it
    // may reach the terminal as a control sequence or a line of its own.
    let forge = forge::Forge::new(|p, s| {
        if p == forge::LEAF {
            s.cn = "leaf\u{1b}[2J".into();
        }
    });
    let mut payload = forge.payload();
    payload.set(
        "module_id",
        forge::enc(|e| e.text("i-0\u{1b}]0;owned\u{7}\nVALID attestation document")),
    );
    let dir = std::env::temp_dir().join(format!("av-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("doc.cbor");
    std::fs::write(&path, forge.document(&payload)).unwrap();
    let out = cli(&["inspect", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "{text:?}"
    );
    assert!(
        text.contains(r"module_id:   i-0\u{1b}]0;owned\u{7}\nVALID attestation document"),
        "{text}"
    );
    assert!(!text.lines().any(|l| l.starts_with("VALID")), "{text}");
    // RFC 4514 escapes the name's control character itself; it must arrive still escaped.
    assert!(text.contains(r"CN=leaf\1b[2J"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
