//! Hostile input never panics and never yields a partial result: random bytes, and real
//! documents with random byte flips, truncations and insertions, all come back as `Err`
//! (or, for an untouched real document, as its verdict).

// Test code: a panic is a test failure, which is what these lints guard against elsewhere.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use attestation_verifier::{verify, TrustAnchor, UnixTime, UnverifiedDocument};
use proptest::prelude::*;
use std::sync::OnceLock;

fn real_docs() -> &'static Vec<(Vec<u8>, UnixTime)> {
    static DOCS: OnceLock<Vec<(Vec<u8>, UnixTime)>> = OnceLock::new();
    DOCS.get_or_init(|| {
        common::vectors()
            .into_iter()
            .filter_map(|v| v.time.map(|t| (v.bytes, t)))
            .collect()
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Truncate { len: usize },
    Insert { at: usize, byte: u8 },
    Delete { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Delete { at }),
    ]
}

fn apply(doc: &mut Vec<u8>, m: &Mutation) {
    let n = doc.len();
    match *m {
        Mutation::Flip { at, mask } => doc[at % n] ^= mask,
        Mutation::Truncate { len } => doc.truncate(len % n),
        Mutation::Insert { at, byte } => doc.insert(at % (n + 1), byte),
        Mutation::Delete { at } => {
            doc.remove(at % n);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
        let roots = [TrustAnchor::aws_nitro_root()];
        prop_assert!(verify(&bytes, &roots, UnixTime::now(), &common::open_policy(true)).is_err());
    }

    #[test]
    fn mutated_real_documents_never_panic(
        which in any::<prop::sample::Index>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let (doc, at) = which.get(real_docs());
        let mut doc = doc.clone();
        for m in &mutations {
            if doc.is_empty() {
                break;
            }
            apply(&mut doc, m);
        }
        let roots = [TrustAnchor::aws_nitro_root()];
        // Must not panic; a mutation may be a no-op in rare cases (e.g. inside an ignored
        // high bit), so only the absence of panics and consistency are asserted here.
        let verdict = verify(&doc, &roots, *at, &common::open_policy(true));
        let parsed = UnverifiedDocument::parse(&doc);
        if parsed.is_err() {
            prop_assert!(verdict.is_err());
        }
    }
}

/// Signature and payload bytes are all covered: flipping a bit of any byte of a valid
/// document makes it invalid.
#[test]
fn every_payload_and_signature_bit_matters() {
    let docs = real_docs();
    let (doc, at) = &docs[0];
    let roots = [TrustAnchor::aws_nitro_root()];
    let policy = common::open_policy(true);
    verify(doc, &roots, *at, &policy).unwrap();
    // Every byte, one bit of each (the bit moving with the offset, so every bit position is
    // tried across the document).
    for i in 0..doc.len() {
        let bit = i % 8;
        let mut d = doc.clone();
        d[i] ^= 1 << bit;
        assert!(
            verify(&d, &roots, *at, &policy).is_err(),
            "byte {i} bit {bit}"
        );
    }
}
