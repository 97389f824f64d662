//! `measure --eif` against images built by AWS's own `eif_build` (the
//! aws-nitro-enclaves-image-format crate's builder, which `nitro-cli build-enclave` uses): the
//! PCRs we compute equal the ones it reported when it built them, for an unsigned image and a
//! signed one (PCR8). `tests/eif/make_fixtures.sh` made the fixtures.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use attestation_verifier::eif::{measure, measure_file};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/eif")
        .join(name)
}

fn check(image: &str, reported: &str, pcrs: &[u8]) {
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(reported)).unwrap()).unwrap();
    let got = measure_file(&fixture(image)).unwrap();
    assert!(got.crc_ok, "{image}: header CRC");
    assert_eq!(got.ramdisks, 2);
    let keys: Vec<u8> = got.pcrs.keys().copied().collect();
    assert_eq!(keys, pcrs, "{image}: which PCRs");
    for (i, v) in &got.pcrs {
        assert_eq!(
            hex::encode(v),
            want[format!("PCR{i}")].as_str().unwrap(),
            "{image}: PCR{i}"
        );
    }
    // The CLI prints nitro-cli's shape.
    assert_eq!(got.to_json()["Measurements"]["PCR0"], want["PCR0"]);
}

#[test]
fn unsigned_image_measures_as_eif_build_reported() {
    check("unsigned.eif", "unsigned.measurements.json", &[0, 1, 2]);
}

#[test]
fn signed_image_measures_as_eif_build_reported_pcr8_included() {
    check("signed.eif", "signed.measurements.json", &[0, 1, 2, 8]);
}

#[test]
fn a_changed_byte_changes_the_measurement_or_is_refused() {
    let bytes = std::fs::read(fixture("unsigned.eif")).unwrap();
    let good = measure(&bytes[..], bytes.len() as u64).unwrap();
    // A byte of the last ramdisk (its filler starts with SHA-256(SHA-256("user.cpio"))):
    // PCR2 and PCR0 change, PCR1 (the boot part) does not.
    let sha = |b: &[u8]| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
    let first = sha(sha(b"user.cpio").as_ref());
    let at = bytes
        .windows(32)
        .position(|w| w == first.as_ref())
        .expect("the user ramdisk");
    let mut changed = bytes.clone();
    changed[at + 10] ^= 1;
    let m = measure(&changed[..], changed.len() as u64).unwrap();
    assert_ne!(m.pcrs[&0], good.pcrs[&0]);
    assert_eq!(m.pcrs[&1], good.pcrs[&1]);
    assert_ne!(m.pcrs[&2], good.pcrs[&2]);
    // Truncated: refused.
    let cut = &bytes[..bytes.len() - 1];
    assert!(measure(cut, cut.len() as u64).is_err());
}
