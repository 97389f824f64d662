//! One test per verifier check: a valid forged document, broken in exactly one way, must fail
//! with the error that names that check; and the few tolerances (tag 18, indefinite maps,
//! null optionals, high-S signatures, unknown non-critical extensions) must pass.

// Test code: a panic is a test failure, which is what these lints guard against elsewhere.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
mod forge;

use attestation_verifier::{
    verify, CborErrorKind, CertPosition, Policy, TrustAnchor, UnixTime, UnverifiedDocument,
    VerifyError,
};
use common::open_policy;
use forge::{enc, ext, pcrs, Forge, Payload, LEAF};
use std::time::Duration;

fn check(forge: &Forge, doc: &[u8], policy: &Policy) -> Result<(), VerifyError> {
    verify(
        doc,
        &[forge.anchor()],
        UnixTime::from_millis(forge.now_ms),
        policy,
    )
    .map(|_| ())
}

fn valid_doc(forge: &Forge) -> Vec<u8> {
    forge.document(&forge.payload())
}

fn with_payload(edit: impl FnOnce(&mut Payload)) -> Result<(), VerifyError> {
    let f = Forge::valid();
    let mut p = f.payload();
    edit(&mut p);
    check(&f, &f.document(&p), &open_policy(false))
}

fn with_chain(tweak: impl Fn(usize, &mut forge::Spec)) -> Result<(), VerifyError> {
    let f = Forge::new(tweak);
    check(&f, &valid_doc(&f), &open_policy(false))
}

/// Re-wraps `payload` bytes in an envelope built by `envelope` (the signature still valid).
fn envelope(f: &Forge, payload: &[u8], build: impl FnOnce(&[u8], &[u8]) -> Vec<u8>) -> Vec<u8> {
    let sig = f.sign(&[0xa1, 0x01, 0x38, 0x22], payload);
    build(payload, &sig)
}

fn bstr(b: &[u8]) -> Vec<u8> {
    enc(|e| e.bytes(b))
}

#[test]
fn the_forged_baseline_is_valid() {
    let f = Forge::valid();
    check(&f, &valid_doc(&f), &open_policy(false)).unwrap();
}

// --- envelope ------------------------------------------------------------------------------

#[test]
fn envelope_size_is_bounded() {
    let f = Forge::valid();
    let big = vec![0u8; attestation_verifier::MAX_DOCUMENT_SIZE + 1];
    assert!(matches!(
        check(&f, &big, &open_policy(false)),
        Err(VerifyError::DocumentTooLarge { .. })
    ));
}

#[test]
fn envelope_tags() {
    let f = Forge::valid();
    let doc = valid_doc(&f);
    let mut tagged = vec![0xd2];
    tagged.extend_from_slice(&doc);
    check(&f, &tagged, &open_policy(false)).expect("tag 18 is COSE_Sign1");
    let mut other = vec![0xd8, 0x62]; // tag 98, COSE_Sign
    other.extend_from_slice(&doc);
    assert_eq!(
        check(&f, &other, &open_policy(false)),
        Err(VerifyError::UnexpectedTag { tag: 98 })
    );
}

#[test]
fn envelope_must_be_a_definite_array_of_four() {
    let f = Forge::valid();
    let doc = valid_doc(&f);
    let mut three = doc.clone();
    three[0] = 0x83;
    assert_eq!(
        check(&f, &three, &open_policy(false)),
        Err(VerifyError::EnvelopeShape)
    );
    let mut indefinite = doc.clone();
    indefinite[0] = 0x9f;
    indefinite.push(0xff);
    assert_eq!(
        check(&f, &indefinite, &open_policy(false)),
        Err(VerifyError::EnvelopeShape)
    );
}

#[test]
fn protected_header_must_be_es384_exactly() {
    let f = Forge::valid();
    let payload = f.payload().encode();
    // ES256 ({1: -7}), correctly signed over its own protected bytes.
    let sig = f.sign(&[0xa1, 0x01, 0x26], &payload);
    let doc = enc(|e| {
        e.array(4)
            .bytes(&[0xa1, 0x01, 0x26])
            .map(0)
            .bytes(&payload)
            .bytes(&sig)
    });
    assert_eq!(
        check(&f, &doc, &open_policy(false)),
        Err(VerifyError::ProtectedHeader)
    );
}

#[test]
fn unprotected_header_must_be_empty() {
    let f = Forge::valid();
    let payload = f.payload().encode();
    let doc = envelope(&f, &payload, |p, s| {
        enc(|e| {
            e.array(4)
                .bytes(&[0xa1, 0x01, 0x38, 0x22])
                .map(1)
                .uint(4)
                .bytes(b"kid")
                .bytes(p)
                .bytes(s)
        })
    });
    assert_eq!(
        check(&f, &doc, &open_policy(false)),
        Err(VerifyError::UnprotectedHeader)
    );
}

#[test]
fn payload_must_be_a_definite_byte_string() {
    let f = Forge::valid();
    let payload = f.payload().encode();
    let doc = envelope(&f, &payload, |p, s| {
        let mut d = vec![0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0, 0x5f];
        d.extend_from_slice(&bstr(p));
        d.push(0xff);
        d.extend_from_slice(&bstr(s));
        d
    });
    assert!(matches!(
        check(&f, &doc, &open_policy(false)),
        Err(VerifyError::Cbor { error, .. }) if error.kind == CborErrorKind::ChunkedString
    ));
}

#[test]
fn non_minimal_length_heads_are_rejected() {
    let f = Forge::valid();
    let payload = f.payload().encode();
    let doc = envelope(&f, &payload, |p, s| {
        let mut d = vec![0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0, 0x5a];
        d.extend_from_slice(&(p.len() as u32).to_be_bytes());
        d.extend_from_slice(p);
        d.extend_from_slice(&bstr(s));
        d
    });
    assert!(matches!(
        check(&f, &doc, &open_policy(false)),
        Err(VerifyError::Cbor { error, .. }) if error.kind == CborErrorKind::NonMinimal
    ));
}

#[test]
fn signature_must_be_96_bytes() {
    let f = Forge::valid();
    let payload = f.payload().encode();
    let doc = envelope(&f, &payload, |p, s| {
        enc(|e| {
            e.array(4)
                .bytes(&[0xa1, 0x01, 0x38, 0x22])
                .map(0)
                .bytes(p)
                .bytes(&s[..95])
        })
    });
    assert_eq!(
        check(&f, &doc, &open_policy(false)),
        Err(VerifyError::SignatureLength { len: 95 })
    );
}

#[test]
fn trailing_bytes_are_rejected() {
    let f = Forge::valid();
    let mut doc = valid_doc(&f);
    doc.push(0x00);
    assert!(matches!(
        check(&f, &doc, &open_policy(false)),
        Err(VerifyError::Cbor { error, .. }) if error.kind == CborErrorKind::TrailingBytes
    ));
}

// --- payload -------------------------------------------------------------------------------

#[test]
fn indefinite_payload_map_is_accepted() {
    with_payload(|p| p.indefinite = true).unwrap();
}

#[test]
fn null_and_absent_optional_fields_are_accepted() {
    with_payload(|p| {
        p.remove("nonce");
        p.set("user_data", enc(|e| e.null()));
    })
    .unwrap();
}

#[test]
fn duplicate_keys_are_rejected() {
    let err = with_payload(|p| {
        let (k, v) = p.entries[0].clone();
        p.push_raw(k, v);
    });
    assert_eq!(err, Err(VerifyError::DuplicateField { field: "module_id" }));
}

#[test]
fn duplicate_pcr_indices_are_rejected() {
    let dup = enc(|e| e.map(2).uint(1).bytes(&[1; 48]).uint(1).bytes(&[2; 48]));
    assert_eq!(
        with_payload(|p| {
            p.set("pcrs", dup);
        }),
        Err(VerifyError::DuplicatePcr { index: 1 })
    );
}

#[test]
fn unknown_keys_are_rejected() {
    assert_eq!(
        with_payload(|p| {
            p.set("nitrotpm_pcrs", enc(|e| e.map(0)));
        }),
        Err(VerifyError::UnknownField {
            key: "nitrotpm_pcrs".into()
        })
    );
    assert!(matches!(
        with_payload(|p| {
            p.push_raw(enc(|e| e.uint(1)), enc(|e| e.uint(1)));
        }),
        Err(VerifyError::UnknownField { .. })
    ));
}

#[test]
fn mandatory_fields_are_required() {
    for field in [
        "module_id",
        "digest",
        "timestamp",
        "pcrs",
        "certificate",
        "cabundle",
    ] {
        assert_eq!(
            with_payload(|p| {
                p.remove(field);
            }),
            Err(VerifyError::MissingField { field }),
            "{field}"
        );
    }
}

#[test]
fn digest_must_be_sha384() {
    assert_eq!(
        with_payload(|p| {
            p.set("digest", enc(|e| e.text("SHA256")));
        }),
        Err(VerifyError::UnsupportedDigest {
            got: "SHA256".into()
        })
    );
}

#[test]
fn timestamp_must_be_positive() {
    assert_eq!(
        with_payload(|p| {
            p.set("timestamp", enc(|e| e.uint(0)));
        }),
        Err(VerifyError::ZeroTimestamp)
    );
}

#[test]
fn pcr_shape() {
    assert_eq!(
        with_payload(|p| {
            p.set("pcrs", pcrs([0u8, 32].into_iter()));
        }),
        Err(VerifyError::PcrIndexOutOfRange { index: 32 })
    );
    let short = enc(|e| e.map(1).uint(0).bytes(&[1; 32]));
    assert!(matches!(
        with_payload(|p| {
            p.set("pcrs", short);
        }),
        Err(VerifyError::FieldSize {
            field: "pcr value",
            len: 32,
            ..
        })
    ));
    assert!(matches!(
        with_payload(|p| {
            p.set("pcrs", enc(|e| e.map(0)));
        }),
        Err(VerifyError::FieldSize {
            field: "pcrs",
            len: 0,
            ..
        })
    ));
    // 33 entries stop at the 33rd on the count, before it is read: its index (a duplicate
    // of 0) would be refused otherwise, so the error shows which check fired. Indefinite
    // and definite lengths alike.
    let entries: Vec<u8> = (0..33u64)
        .flat_map(|i| enc(|e| e.uint(i % 32).bytes(&[1; 48])))
        .collect();
    let indefinite = [&[0xbf][..], &entries, &[0xff]].concat();
    let definite = [&[0xb8, 33][..], &entries].concat();
    for many in [indefinite, definite] {
        let e = with_payload(|p| {
            p.set("pcrs", many);
        });
        assert!(
            matches!(
                e,
                Err(VerifyError::FieldSize {
                    field: "pcrs",
                    len: 33,
                    max: 32,
                    ..
                })
            ),
            "{e:?}"
        );
    }
    // Within the count, that duplicate entry is what is refused.
    let mut duplicate = vec![0xb8, 32];
    for i in 0..32u64 {
        duplicate.extend(enc(|e| e.uint(i % 31).bytes(&[1; 48])));
    }
    assert!(matches!(
        with_payload(|p| {
            p.set("pcrs", duplicate);
        }),
        Err(VerifyError::DuplicatePcr { index: 0 })
    ));
    // 32 PCRs is the most and is fine (signature aside: pcrs beyond 16 are allowed).
    with_payload(|p| {
        p.set("pcrs", pcrs(0..32));
    })
    .unwrap();
}

#[test]
fn field_types_are_checked() {
    assert_eq!(
        with_payload(|p| {
            p.set("module_id", bstr(b"x"));
        }),
        Err(VerifyError::FieldType {
            field: "module_id",
            expected: "text"
        })
    );
    assert!(matches!(
        with_payload(|p| {
            p.set("nonce", enc(|e| e.text("abc")));
        }),
        Err(VerifyError::FieldType { field: "nonce", .. })
    ));
}

#[test]
fn tags_and_floats_are_rejected_in_the_payload() {
    // A tagged timestamp (tag 1, epoch time).
    assert!(with_payload(|p| {
        p.set("timestamp", vec![0xc1, 0x1a, 0x65, 0x00, 0x00, 0x00]);
    })
    .is_err());
    assert!(matches!(
        with_payload(|p| {
            p.set("user_data", vec![0xf9, 0x3c, 0x00]);
        }),
        Err(VerifyError::FieldType { .. }) | Err(VerifyError::Cbor { .. })
    ));
}

#[test]
fn sizes_are_bounded() {
    assert!(matches!(
        with_payload(|p| {
            p.set("user_data", bstr(&[0; 1025]));
        }),
        Err(VerifyError::FieldSize {
            field: "user_data",
            len: 1025,
            ..
        })
    ));
    with_payload(|p| {
        p.set("user_data", bstr(&[0; 1024]));
    })
    .unwrap();
    assert!(matches!(
        with_payload(|p| {
            p.set("certificate", bstr(&[]));
        }),
        Err(VerifyError::FieldSize {
            field: "certificate",
            len: 0,
            ..
        })
    ));
    assert!(matches!(
        with_payload(|p| {
            p.set("certificate", bstr(&[0; 1025]));
        }),
        Err(VerifyError::FieldSize {
            field: "certificate",
            ..
        })
    ));
    assert!(matches!(
        with_payload(|p| {
            p.set("cabundle", enc(|e| e.array(0)));
        }),
        Err(VerifyError::FieldSize {
            field: "cabundle",
            len: 0,
            ..
        })
    ));
}

// --- chain ---------------------------------------------------------------------------------

#[test]
fn untrusted_root() {
    let f = Forge::valid();
    let other = Forge::valid();
    assert_eq!(
        verify(
            &valid_doc(&f),
            &[other.anchor(), TrustAnchor::aws_nitro_root()],
            UnixTime::from_millis(f.now_ms),
            &open_policy(false)
        )
        .map(|_| ()),
        Err(VerifyError::UntrustedRoot)
    );
}

#[test]
fn expired_and_not_yet_valid_certificates() {
    for position in 0..=LEAF {
        let err = with_chain(|p, s| {
            if p == position {
                s.not_before -= 7200;
                s.not_after = s.not_before + 60;
            }
        });
        let want = if position == LEAF {
            CertPosition::Leaf
        } else {
            CertPosition::CaBundle(position)
        };
        assert!(
            matches!(err, Err(VerifyError::CertificateExpired { position: p, .. }) if p == want),
            "{position}: {err:?}"
        );
    }
    let err = with_chain(|p, s| {
        if p == 2 {
            s.not_before += 7200;
        }
    });
    assert!(matches!(
        err,
        Err(VerifyError::CertificateNotYetValid {
            position: CertPosition::CaBundle(2),
            ..
        })
    ));
}

#[test]
fn issuer_must_match_subject() {
    let err = with_chain(|p, s| {
        if p == 3 {
            s.issuer_name = Some("someone else".into());
        }
    });
    assert_eq!(
        err,
        Err(VerifyError::IssuerMismatch {
            position: CertPosition::CaBundle(3)
        })
    );
}

#[test]
fn intermediates_must_be_cas() {
    assert_eq!(
        with_chain(|p, s| {
            if p == 2 {
                s.basic_constraints = Some((false, None));
            }
        }),
        Err(VerifyError::NotCa {
            position: CertPosition::CaBundle(2)
        })
    );
    assert_eq!(
        with_chain(|p, s| {
            if p == 1 {
                s.basic_constraints = None;
            }
        }),
        Err(VerifyError::NotCa {
            position: CertPosition::CaBundle(1)
        })
    );
}

#[test]
fn path_length_is_respected() {
    assert_eq!(
        with_chain(|p, s| {
            if p == 1 {
                s.basic_constraints = Some((true, Some(1)));
            }
        }),
        Err(VerifyError::PathLenExceeded {
            position: CertPosition::CaBundle(1),
            path_len: 1,
            below: 2
        })
    );
}

#[test]
fn cas_need_key_cert_sign() {
    use x509_cert::ext::pkix::{KeyUsage, KeyUsages};
    assert_eq!(
        with_chain(|p, s| {
            if p == 3 {
                s.key_usage = Some(KeyUsage(KeyUsages::DigitalSignature.into()));
            }
        }),
        Err(VerifyError::MissingKeyCertSign {
            position: CertPosition::CaBundle(3)
        })
    );
}

#[test]
fn leaf_rules() {
    use x509_cert::ext::pkix::{KeyUsage, KeyUsages};
    assert_eq!(
        with_chain(|p, s| {
            if p == LEAF {
                s.basic_constraints = Some((true, None));
            }
        }),
        Err(VerifyError::LeafIsCa)
    );
    assert_eq!(
        with_chain(|p, s| {
            if p == LEAF {
                s.key_usage = Some(KeyUsage(KeyUsages::NonRepudiation.into()));
            }
        }),
        Err(VerifyError::LeafMissingDigitalSignature)
    );
    assert_eq!(
        with_chain(|p, s| {
            if p == LEAF {
                s.key_usage = None;
            }
        }),
        Err(VerifyError::LeafMissingDigitalSignature)
    );
}

#[test]
fn unknown_critical_extensions_are_rejected_non_critical_ones_ignored() {
    let unknown = |critical| {
        move |p: usize, s: &mut forge::Spec| {
            if p == 2 {
                s.extra
                    .push(ext("1.3.6.1.4.1.99999.1", critical, &der::asn1::Null));
            }
        }
    };
    assert_eq!(
        with_chain(unknown(true)),
        Err(VerifyError::UnknownCriticalExtension {
            position: CertPosition::CaBundle(2),
            oid: "1.3.6.1.4.1.99999.1".into()
        })
    );
    with_chain(unknown(false)).unwrap();
}

#[test]
fn critical_extensions_the_verifier_does_not_process_are_rejected() {
    use x509_cert::ext::pkix::certpolicy::PolicyInformation;
    use x509_cert::ext::pkix::crl::CrlDistributionPoints;
    use x509_cert::ext::pkix::{CertificatePolicies, ExtendedKeyUsage};
    let eku = ExtendedKeyUsage(vec![der::oid::ObjectIdentifier::new_unwrap(
        "1.3.6.1.5.5.7.3.1",
    )]);
    let policies = CertificatePolicies(vec![PolicyInformation {
        policy_identifier: der::oid::ObjectIdentifier::new_unwrap("2.5.29.32.0"),
        policy_qualifiers: None,
    }]);
    let crl = CrlDistributionPoints(vec![]);
    // (oid, critical, non-critical)
    let cases = [
        (
            "2.5.29.37",
            ext("2.5.29.37", true, &eku),
            ext("2.5.29.37", false, &eku),
        ),
        (
            "2.5.29.32",
            ext("2.5.29.32", true, &policies),
            ext("2.5.29.32", false, &policies),
        ),
        (
            "2.5.29.31",
            ext("2.5.29.31", true, &crl),
            ext("2.5.29.31", false, &crl),
        ),
    ];
    for (oid, marked_critical, not_critical) in &cases {
        for position in [1, LEAF] {
            let with = |critical: bool| {
                with_chain(|p, s| {
                    if p == position {
                        s.extra.push(if critical {
                            marked_critical.clone()
                        } else {
                            not_critical.clone()
                        });
                    }
                })
            };
            let at = if position == LEAF {
                CertPosition::Leaf
            } else {
                CertPosition::CaBundle(position)
            };
            assert_eq!(
                with(true),
                Err(VerifyError::UnknownCriticalExtension {
                    position: at,
                    oid: (*oid).into()
                }),
                "{oid} at {position}"
            );
            with(false).unwrap_or_else(|e| panic!("{oid} non-critical at {position}: {e}"));
        }
    }
}

#[test]
fn certificates_must_be_valid_at_the_documents_timestamp_too() {
    let f = Forge::valid();
    // Two hours before the leaf's notBefore (the forge's leaf starts an hour before now):
    // the chain is valid at verification time, not when the document says it was made.
    let mut p = f.payload();
    let at = f.now_ms - 3 * 3600 * 1000;
    p.set("timestamp", enc(|e| e.uint(at)));
    assert_eq!(
        check(&f, &f.document(&p), &open_policy(false)),
        Err(VerifyError::CertificateInvalidAtTimestamp {
            position: CertPosition::CaBundle(0),
            timestamp_ms: at
        })
    );
    // Within every certificate's validity it passes.
    let mut p = f.payload();
    p.set("timestamp", enc(|e| e.uint(f.now_ms - 1800 * 1000)));
    check(&f, &f.document(&p), &open_policy(false)).unwrap();
}

#[test]
fn duplicate_extensions_are_rejected() {
    let err = with_chain(|p, s| {
        if p == 1 {
            s.extra.push(ext(
                "2.5.29.19",
                true,
                &x509_cert::ext::pkix::BasicConstraints {
                    ca: true,
                    path_len_constraint: Some(2),
                },
            ));
        }
    });
    assert!(
        matches!(
            err,
            Err(VerifyError::DuplicateExtension { .. }) | Err(VerifyError::CertificateParse { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn certificate_signatures_are_verified() {
    for position in 1..=LEAF {
        let err = with_chain(|p, s| {
            if p == position {
                s.wrong_signer = true;
            }
        });
        let want = if position == LEAF {
            CertPosition::Leaf
        } else {
            CertPosition::CaBundle(position)
        };
        assert_eq!(
            err,
            Err(VerifyError::CertificateSignature { position: want }),
            "{position}"
        );
    }
}

#[test]
fn only_ecdsa_p384_sha384() {
    let err = with_chain(|p, s| {
        if p == 3 {
            s.sig_oid = forge::ECDSA_SHA256;
        }
    });
    assert!(matches!(
        err,
        Err(VerifyError::UnsupportedAlgorithm {
            position: CertPosition::CaBundle(3),
            ..
        })
    ));
}

#[test]
fn certificates_must_be_v3() {
    let err = with_chain(|p, s| {
        if p == 2 {
            s.version = x509_cert::Version::V1;
        }
    });
    assert_eq!(
        err,
        Err(VerifyError::CertificateVersion {
            position: CertPosition::CaBundle(2)
        })
    );
}

#[test]
fn garbage_certificates_are_parse_errors() {
    let err = with_payload(|p| {
        p.set("certificate", bstr(b"not a certificate"));
    });
    assert!(matches!(
        err,
        Err(VerifyError::CertificateParse {
            position: CertPosition::Leaf,
            ..
        })
    ));
}

// --- signature -----------------------------------------------------------------------------

/// The order n of P-384 (SEC 2 §2.5.1), big-endian.
const P384_N: [u8; 48] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xc7, 0x63, 0x4d, 0x81, 0xf4, 0x37, 0x2d, 0xdf,
    0x58, 0x1a, 0x0d, 0xb2, 0x48, 0xb0, 0xa7, 0x7a, 0xec, 0xec, 0x19, 0x6a, 0xcc, 0xc5, 0x29, 0x73,
];

/// n - s, big-endian.
fn negate(s: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 48];
    let mut borrow = 0i16;
    for i in (0..48).rev() {
        let mut d = i16::from(P384_N[i]) - i16::from(s[i]) - borrow;
        borrow = 0;
        if d < 0 {
            d += 256;
            borrow = 1;
        }
        out[i] = d as u8;
    }
    out
}

#[test]
fn cose_signature_is_verified_and_high_s_accepted() {
    let f = Forge::valid();
    let doc = valid_doc(&f);
    let sig_at = doc.len() - 96;

    let mut flipped = doc.clone();
    flipped[sig_at + 10] ^= 1;
    assert_eq!(
        check(&f, &flipped, &open_policy(false)),
        Err(VerifyError::Signature)
    );

    // (r, n - s) is the same signature's other form: exactly one of s and n - s is "high".
    let mut other_s = doc.clone();
    let s = negate(&doc[sig_at + 48..]);
    other_s[sig_at + 48..].copy_from_slice(&s);
    check(&f, &other_s, &open_policy(false)).expect("both low-S and high-S verify");

    // A payload changed after signing.
    let mut p = f.payload();
    let doc = f.document(&p);
    p.set("user_data", bstr(b"other"));
    let tampered = enc(|e| {
        e.array(4)
            .bytes(&[0xa1, 0x01, 0x38, 0x22])
            .map(0)
            .bytes(&p.encode())
            .bytes(&doc[doc.len() - 96..])
    });
    assert_eq!(
        check(&f, &tampered, &open_policy(false)),
        Err(VerifyError::Signature)
    );
}

// --- policy --------------------------------------------------------------------------------

#[test]
fn debug_mode_is_rejected_unless_allowed() {
    let f = Forge::valid();
    let mut p = f.payload();
    let zero_012 = enc(|e| {
        e.map(16);
        for i in 0..16u8 {
            e.uint(u64::from(i))
                .bytes(&[if i < 3 { 0 } else { i + 1 }; 48]);
        }
        e
    });
    p.set("pcrs", zero_012);
    let doc = f.document(&p);
    assert_eq!(
        check(&f, &doc, &open_policy(false)),
        Err(VerifyError::DebugMode)
    );
    check(&f, &doc, &open_policy(true)).unwrap();
    // PCR0 zero alone is not debug mode.
    let mut p = f.payload();
    p.set(
        "pcrs",
        enc(|e| {
            e.map(3)
                .uint(0)
                .bytes(&[0; 48])
                .uint(1)
                .bytes(&[1; 48])
                .uint(2)
                .bytes(&[2; 48])
        }),
    );
    check(&f, &f.document(&p), &open_policy(false)).unwrap();
    // Without PCR0-2 the debug check cannot be made: rejected.
    let mut p = f.payload();
    p.set("pcrs", pcrs([5u8].into_iter()));
    assert_eq!(
        check(&f, &f.document(&p), &open_policy(false)),
        Err(VerifyError::PcrMissing { index: 0 })
    );
}

#[test]
fn pcrs_are_compared_exactly_and_zero_is_no_wildcard() {
    let f = Forge::valid();
    let doc = valid_doc(&f);
    let mut policy = open_policy(false);
    policy.pcrs.insert(4, [5; 48]);
    check(&f, &doc, &policy).unwrap();
    policy.pcrs.insert(0, [0; 48]);
    assert_eq!(
        check(&f, &doc, &policy),
        Err(VerifyError::PcrMismatch {
            index: 0,
            expected: vec![0; 48],
            got: vec![1; 48]
        })
    );
    let mut policy = open_policy(false);
    policy.pcrs.insert(16, [0; 48]);
    assert_eq!(
        check(&f, &doc, &policy),
        Err(VerifyError::PcrMissing { index: 16 })
    );
}

#[test]
fn freshness() {
    let f = Forge::valid();
    let doc = valid_doc(&f);
    let mut policy = open_policy(false);
    policy.max_age = Some(Duration::from_secs(30));
    let at = |ms: u64| verify(&doc, &[f.anchor()], UnixTime::from_millis(ms), &policy).map(|_| ());
    at(f.now_ms + 30_000).unwrap();
    assert_eq!(
        at(f.now_ms + 30_001),
        Err(VerifyError::TooOld {
            age_ms: 30_001,
            max_ms: 30_000
        })
    );
    at(f.now_ms - 60_000).unwrap();
    assert_eq!(
        at(f.now_ms - 60_001),
        Err(VerifyError::FromTheFuture {
            ahead_ms: 60_001,
            skew_ms: 60_000
        })
    );
}

#[test]
fn nonce_public_key_and_user_data() {
    let f = Forge::valid();
    let doc = valid_doc(&f);
    let mut policy = open_policy(false);
    policy.nonce = Some(b"nonce".to_vec());
    policy.user_data = Some(b"user".to_vec());
    check(&f, &doc, &policy).unwrap();
    policy.nonce = Some(b"nonc3".to_vec());
    assert_eq!(
        check(&f, &doc, &policy),
        Err(VerifyError::PolicyFieldMismatch { field: "nonce" })
    );
    policy.nonce = None;
    policy.user_data = Some(b"user2".to_vec());
    assert_eq!(
        check(&f, &doc, &policy),
        Err(VerifyError::PolicyFieldMismatch { field: "user_data" })
    );
    policy.user_data = None;
    policy.public_key = Some(vec![1, 2, 3]);
    assert_eq!(
        check(&f, &doc, &policy),
        Err(VerifyError::PolicyFieldMissing {
            field: "public_key"
        })
    );
}

#[test]
fn checks_run_in_order_chain_before_policy() {
    // A document that fails both the chain (expired leaf) and the policy (wrong nonce)
    // reports the chain: policy answers are never given for ungenuine documents.
    let f = Forge::new(|p, s| {
        if p == LEAF {
            s.not_after = s.not_before + 60;
        }
    });
    let mut policy = open_policy(false);
    policy.nonce = Some(b"other".to_vec());
    assert!(matches!(
        check(&f, &valid_doc(&f), &policy),
        Err(VerifyError::CertificateExpired { .. })
    ));
    // Parsing alone hands out nothing but the unverified view.
    let parsed = UnverifiedDocument::parse(&valid_doc(&f)).unwrap();
    assert_eq!(parsed.unverified().nonce.as_deref(), Some(&b"nonce"[..]));
}
