//! Fuzzes everything the enclave's gateway and the client parse from the untrusted side of
//! the channel: chunked-OHTTP requests (decapsulation), binary HTTP requests (RFC 9292, both
//! framings), incrementally decoded binary HTTP responses, and the attestation key binding.
//! Nothing may panic; what decodes must re-encode consistently.

#![no_main]

use common::bhttp::{Request, ResponseDecoder};
use common::binding::Binding;
use common::channel::GatewayKey;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn key() -> &'static GatewayKey {
    static KEY: OnceLock<GatewayKey> = OnceLock::new();
    KEY.get_or_init(|| GatewayKey::generate_with_id(0).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let _ = key().decapsulate(data);
    if let Ok(req) = Request::decode(data, 1 << 20) {
        let again = Request::decode(&req.encode(), 1 << 20).unwrap();
        assert_eq!(again, req);
    }
    // The response decoder, fed in two pieces split by the first byte's value.
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut d = ResponseDecoder::new();
    if d.push(&data[..split]).is_ok() {
        let _ = d.push(&data[split..]);
    }
    if let Ok(b) = Binding::decode(data) {
        assert_eq!(b.encode(), data);
    }
});
