//! Fuzzes the host↔enclave frame decoder the way the enclave reads a connection: a preface,
//! then frames one after another, each header checked against a maximum before its payload is
//! taken. Nothing may panic, and every frame that decodes must encode back to the same bytes'
//! meaning (decode(encode(m)) == m).

#![no_main]

use common::wire::{check_preface, decode_header, Message, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((preface, mut rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    // Most inputs will not carry the right preface; decode their frames anyway.
    let _ = check_preface(preface);
    while let Some((header, tail)) = rest.split_first_chunk::<HEADER_LEN>() {
        let Ok((ty, len)) = decode_header(header, MAX) else {
            return;
        };
        let Some(payload) = tail.get(..len) else {
            return;
        };
        rest = tail.get(len..).unwrap_or_default();
        if let Ok(m) = Message::decode(ty, payload) {
            let frame = m.encode();
            let header: &[u8; HEADER_LEN] = frame.first_chunk().unwrap();
            let (ty2, len2) = decode_header(header, usize::MAX).unwrap();
            assert_eq!(ty2, ty);
            let again = Message::decode(ty2, frame.get(HEADER_LEN..HEADER_LEN + len2).unwrap());
            assert_eq!(again.as_ref(), Ok(&m));
            let _ = format!("{m:?}");
        }
    }
});
