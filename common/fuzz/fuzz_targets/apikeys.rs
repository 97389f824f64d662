//! Fuzzes the API key list the host delivers to the enclave (`common::apikeys`): the signed
//! envelope, its base64, the list JSON and its checks, and presented keys. Nothing may panic,
//! and nothing but a list signed by the signer may verify.

#![no_main]

use common::apikeys::{parse_key, KeyList};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A signer whose private key nobody has: no input may verify under it.
    let signer = [0x42u8; 32];
    assert!(KeyList::verify(data, &signer, 0).is_err());
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some((id, secret)) = parse_key(text) {
            assert!(!id.is_empty() && secret.len() == 32);
        }
    }
});
