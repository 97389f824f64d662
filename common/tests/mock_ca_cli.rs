//! `mock-ca init DIR` creates the CA once and reuses it; `mock-ca show DIR` prints a root that
//! verifiers accept; misuse exits 2 and a missing CA exits 1.

// Test code: a panic is a test failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

fn mock_ca(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mock-ca"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn init_is_idempotent_and_show_prints_a_usable_root() {
    let dir = std::env::temp_dir().join(format!("mock-ca-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.join("nested/ca");
    let d = d.to_str().unwrap();

    let first = mock_ca(&["init", d]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = mock_ca(&["init", d]);
    assert!(second.status.success());
    assert_eq!(first.stdout, second.stdout, "the second run reuses the CA");

    let show = mock_ca(&["show", d]);
    assert!(show.status.success());
    let pem = std::fs::read(format!("{d}/root.pem")).unwrap();
    assert_eq!(show.stdout, pem);
    attestation_verifier::TrustAnchor::from_pem(&pem).unwrap();
    // No temporary directories are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("nested"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["ca"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn misuse_and_missing_ca() {
    assert_eq!(mock_ca(&[]).status.code(), Some(2));
    assert_eq!(mock_ca(&["frobnicate", "x"]).status.code(), Some(2));
    assert_eq!(
        mock_ca(&["show", "/nonexistent/mock-ca"]).status.code(),
        Some(1)
    );
}

#[test]
fn measurements_match_the_mock_nsm() {
    let out = mock_ca(&["measurements", "some-image"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let m = common::nsm::mock::ImageMeasurement::from_label("some-image");
    let hex = |v: &[u8]| v.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert!(
        text.contains(&format!("\"PCR0\": \"{}\"", hex(&m.pcr0))),
        "{text}"
    );
    assert!(
        text.contains(&format!("\"PCR4\": \"{}\"", hex(&m.pcr4))),
        "{text}"
    );
    assert!(text.contains("\"Measurements\""));
}
