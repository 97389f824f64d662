//! Fuzz target: arbitrary bytes through parse and full verification, under the AWS root and
//! at a time when the seed documents' chains were valid. It must never panic.
//! Run with `make fuzz` (seed it with `cp ../../shared/vectors/nitro/*.cbor corpus/verify/`).

#![no_main]

use attestation_verifier::{verify, Policy, TrustAnchor, UnixTime, UnverifiedDocument, DEFAULT_MAX_CLOCK_SKEW};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let _ = UnverifiedDocument::parse(data).map(|d| d.unverified().timestamp);
    let policy = Policy {
        pcrs: BTreeMap::new(),
        allow_debug: true,
        max_age: None,
        max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
        nonce: None,
        public_key: None,
        user_data: None,
    };
    // Each document's own timestamp, so mutated-but-genuine inputs reach the signature checks.
    let at = UnverifiedDocument::parse(data)
        .map(|d| UnixTime::from_millis(d.unverified().timestamp))
        .unwrap_or_else(|_| UnixTime::from_millis(1_767_472_867_402));
    let _ = verify(data, &[TrustAnchor::aws_nitro_root()], at, &policy);
});
