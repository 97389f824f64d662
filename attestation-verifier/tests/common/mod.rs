//! Helpers shared by the verifier's integration tests: the real vectors and their verdicts.

#![allow(dead_code)]

use attestation_verifier::{Policy, UnixTime, DEFAULT_MAX_CLOCK_SKEW};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `../shared/vectors/nitro`, beside the checkout (CI provides it).
pub fn nitro_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors/nitro")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    ValidDebug,
    Invalid,
}

pub struct Vector {
    pub file: String,
    pub bytes: Vec<u8>,
    pub verdict: Verdict,
    /// The document's own time from INDEX.md, if it has one.
    pub time: Option<UnixTime>,
}

/// Every vector with its INDEX.md verdict.
pub fn vectors() -> Vec<Vector> {
    let dir = nitro_dir();
    let index = std::fs::read_to_string(dir.join("INDEX.md"))
        .expect("../shared/vectors/nitro/INDEX.md (CI has ../shared beside the checkout)");
    let mut out = Vec::new();
    for line in index
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains(".cbor"))
    {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let (file, verdict, time) = (cols[1], cols[2], cols[3]);
        let verdict = match verdict {
            "valid" => Verdict::Valid,
            "valid-debug" => Verdict::ValidDebug,
            "invalid" => Verdict::Invalid,
            other => panic!("unknown verdict {other} for {file}"),
        };
        let time = (!time.is_empty()).then(|| {
            let t =
                time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
                    .unwrap_or_else(|e| panic!("{file}: bad time {time}: {e}"));
            UnixTime::from_millis((t.unix_timestamp_nanos() / 1_000_000) as u64)
        });
        let bytes = std::fs::read(dir.join(file)).unwrap();
        out.push(Vector {
            file: file.to_owned(),
            bytes,
            verdict,
            time,
        });
    }
    assert!(out.len() >= 30, "INDEX.md lists {} vectors", out.len());
    out
}

/// A policy that checks nothing optional.
pub fn open_policy(allow_debug: bool) -> Policy {
    Policy {
        pcrs: BTreeMap::new(),
        allow_debug,
        max_age: None,
        max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
        nonce: None,
        public_key: None,
        user_data: None,
    }
}
