//! Every real AWS document in `../shared/vectors/nitro` gets its INDEX.md verdict at its own
//! timestamp, and every one is rejected at the current time.

// Test code: a panic is a test failure, which is what these lints guard against elsewhere.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use attestation_verifier::{verify, TrustAnchor, UnixTime, UnverifiedDocument, VerifyError};
use common::{open_policy, vectors, Verdict};

#[test]
fn verdicts_at_document_time() {
    let roots = [TrustAnchor::aws_nitro_root()];
    for v in vectors() {
        let at = v.time.unwrap_or_else(UnixTime::now);
        let strict = verify(&v.bytes, &roots, at, &open_policy(false));
        let lenient = verify(&v.bytes, &roots, at, &open_policy(true));
        match v.verdict {
            Verdict::Valid => {
                let doc = strict.unwrap_or_else(|e| panic!("{}: {e}", v.file));
                assert!(!doc.is_debug(), "{}", v.file);
                assert_eq!(
                    doc.timestamp(),
                    at,
                    "{}: INDEX time is the document's",
                    v.file
                );
            }
            Verdict::ValidDebug => {
                assert_eq!(strict, Err(VerifyError::DebugMode), "{}", v.file);
                let doc = lenient.unwrap_or_else(|e| panic!("{}: {e}", v.file));
                assert!(doc.is_debug(), "{}", v.file);
            }
            Verdict::Invalid => {
                let err = lenient.expect_err(&v.file);
                eprintln!("{}: rejected: {err}", v.file);
            }
        }
    }
}

#[test]
fn all_rejected_now() {
    let roots = [TrustAnchor::aws_nitro_root()];
    for v in vectors() {
        let err = verify(&v.bytes, &roots, UnixTime::now(), &open_policy(true)).expect_err(&v.file);
        if v.verdict != Verdict::Invalid {
            assert!(
                matches!(err, VerifyError::CertificateExpired { .. }),
                "{}: {err}",
                v.file
            );
        }
    }
}

#[test]
fn invalid_vectors_fail_the_check_index_names() {
    let roots = [TrustAnchor::aws_nitro_root()];
    let by_name = |name: &str| vectors().into_iter().find(|v| v.file == name).unwrap();
    let at = |v: &common::Vector| v.time.unwrap();

    let v = by_name("base_hinted_corrupted_INVALID.cbor");
    assert!(matches!(
        UnverifiedDocument::parse(&v.bytes),
        Err(VerifyError::Cbor { .. })
    ));

    let v = by_name("blocky_nitrite_selfsigned_INVALID.cbor");
    assert_eq!(
        UnverifiedDocument::parse(&v.bytes).unwrap_err(),
        VerifyError::UnprotectedHeader
    );

    for name in ["eternis_5f42eb915e45.cbor", "eternis_invalid.cbor"] {
        let v = by_name(name);
        assert_eq!(
            verify(&v.bytes, &roots, at(&v), &open_policy(true)),
            Err(VerifyError::Signature),
            "{name}"
        );
    }

    let v = by_name("nitrotpm_live_NOT_ENCLAVE.cbor");
    assert!(matches!(
        UnverifiedDocument::parse(&v.bytes),
        Err(VerifyError::UnknownField { ref key }) if key == "nitrotpm_pcrs"
    ));
}
