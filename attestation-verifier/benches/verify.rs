//! Full verification time of a real AWS document (parse, five P-384 verifications, policy):
//! the target is a median ≤ 2 ms on the 2-core development machine. `make bench`.

// Test code: a panic is a test failure, which is what these lints guard against elsewhere.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestation_verifier::{
    verify, Policy, TrustAnchor, UnixTime, UnverifiedDocument, DEFAULT_MAX_CLOCK_SKEW,
};
use criterion::{criterion_group, criterion_main, Criterion};
use std::collections::BTreeMap;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/vectors/nitro/base_hinted_repaired.cbor"
    );
    let doc = std::fs::read(path).expect("../shared/vectors beside the checkout");
    let at = UnixTime::from_millis(1_767_472_867_402);
    let roots = [TrustAnchor::aws_nitro_root()];
    let policy = Policy {
        pcrs: BTreeMap::new(),
        allow_debug: false,
        max_age: Some(std::time::Duration::from_secs(300)),
        max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
        nonce: None,
        public_key: None,
        user_data: None,
    };
    verify(&doc, &roots, at, &policy).expect("the vector verifies at its own time");

    c.bench_function("verify real document (full)", |b| {
        b.iter(|| verify(black_box(&doc), &roots, at, &policy).is_ok())
    });
    c.bench_function("parse only", |b| {
        b.iter(|| UnverifiedDocument::parse(black_box(&doc)).is_ok())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
