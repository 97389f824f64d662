//! The mock NSM behaves like the real one: every request type round-trips through the CBOR
//! the device speaks, PCR semantics match the hardware, and its documents have the exact
//! shape of real ones and verify under the mock root only.

// Test code: a panic is a test failure, which is what these lints guard against elsewhere.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestation_verifier::{
    verify, Policy, TrustAnchor, UnixTime, VerifyError, DEFAULT_MAX_CLOCK_SKEW,
};
use aws_lc_rs::digest::{Context, SHA384};
use common::mock_ca::MockCa;
use common::nsm::mock::{ImageMeasurement, MockNsm, MockNsmConfig, RANDOM_LEN};
use common::nsm::{AttestationRequest, Nsm, NsmError, NsmErrorCode, Request, Response};
use der::Decode;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use x509_cert::Certificate;

fn ca_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("mock-nsm-tests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        MockCa::load_or_create(&d).unwrap();
        d
    })
    .clone()
}

fn measurement() -> ImageMeasurement {
    ImageMeasurement::from_label("mock-nsm-tests")
}

fn nsm(debug: bool) -> MockNsm {
    let mut config = MockNsmConfig::new(measurement());
    config.debug = debug;
    MockNsm::new(MockCa::load(&ca_dir()).unwrap(), config).unwrap()
}

fn mock_root() -> TrustAnchor {
    TrustAnchor::from_der(MockCa::load(&ca_dir()).unwrap().root_der()).unwrap()
}

fn policy(pcrs: BTreeMap<u8, [u8; 48]>) -> Policy {
    Policy {
        pcrs,
        allow_debug: false,
        max_age: Some(std::time::Duration::from_secs(60)),
        max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
        nonce: None,
        public_key: None,
        user_data: None,
    }
}

/// Sends a request the way the driver does: CBOR-encoded, decoded on the other side, and the
/// response likewise (aws-nitro-enclaves-nsm-api `driver::nsm_process_request`).
fn over_the_wire(nsm: &MockNsm, request: Request) -> Response {
    let bytes = serde_cbor::to_vec(&request).unwrap();
    let decoded: Request = serde_cbor::from_slice(&bytes).unwrap();
    let response = nsm.process(decoded);
    let bytes = serde_cbor::to_vec(&response).unwrap();
    serde_cbor::from_slice(&bytes).unwrap()
}

#[test]
fn every_request_type_round_trips() {
    let nsm = nsm(false);
    let m = measurement();
    match over_the_wire(&nsm, Request::DescribePCR { index: 0 }) {
        Response::DescribePCR { lock, data } => {
            assert!(lock);
            assert_eq!(data, m.pcr0);
        }
        other => panic!("{other:?}"),
    }
    let extended = match over_the_wire(
        &nsm,
        Request::ExtendPCR {
            index: 16,
            data: b"x".to_vec(),
        },
    ) {
        Response::ExtendPCR { data } => data,
        other => panic!("{other:?}"),
    };
    let mut ctx = Context::new(&SHA384);
    ctx.update(&[0u8; 48]);
    ctx.update(b"x");
    assert_eq!(
        extended,
        ctx.finish().as_ref(),
        "PCR = SHA-384(PCR || data)"
    );
    assert!(matches!(
        over_the_wire(&nsm, Request::LockPCR { index: 16 }),
        Response::LockPCR
    ));
    assert!(matches!(
        over_the_wire(&nsm, Request::LockPCRs { range: 20 }),
        Response::LockPCRs
    ));
    match over_the_wire(&nsm, Request::DescribeNSM) {
        Response::DescribeNSM {
            version_major,
            max_pcrs,
            locked_pcrs,
            module_id,
            digest,
            ..
        } => {
            assert_eq!(version_major, 1);
            assert_eq!(max_pcrs, 32);
            assert_eq!(locked_pcrs, (0..20).collect());
            assert_eq!(module_id, nsm.module_id());
            assert_eq!(digest, common::nsm::Digest::SHA384);
        }
        other => panic!("{other:?}"),
    }
    let request = Request::Attestation {
        user_data: Some(serde_bytes::ByteBuf::from(b"u".to_vec())),
        nonce: Some(serde_bytes::ByteBuf::from(b"n".to_vec())),
        public_key: None,
    };
    match over_the_wire(&nsm, request) {
        Response::Attestation { document } => {
            let doc = verify(
                &document,
                &[mock_root()],
                UnixTime::now(),
                &policy(BTreeMap::new()),
            )
            .unwrap();
            assert_eq!(doc.user_data(), Some(&b"u"[..]));
            assert_eq!(doc.nonce(), Some(&b"n"[..]));
            assert_eq!(doc.public_key(), None);
        }
        other => panic!("{other:?}"),
    }
    match over_the_wire(&nsm, Request::GetRandom) {
        Response::GetRandom { random } => assert_eq!(random.len(), RANDOM_LEN),
        other => panic!("{other:?}"),
    }
}

fn refused(result: Result<impl std::fmt::Debug, NsmError>) -> NsmErrorCode {
    match result {
        Err(NsmError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn pcr_rules_match_hardware() {
    let nsm = nsm(false);
    // Platform PCRs are locked from the start.
    for i in 0..16 {
        assert_eq!(
            refused(nsm.extend_pcr(i, b"x")),
            NsmErrorCode::ReadOnlyIndex,
            "PCR{i}"
        );
    }
    // Out of range.
    assert_eq!(
        refused(nsm.extend_pcr(32, b"x")),
        NsmErrorCode::InvalidIndex
    );
    assert_eq!(refused(nsm.describe_pcr(32)), NsmErrorCode::InvalidIndex);
    assert_eq!(refused(nsm.lock_pcr(32)), NsmErrorCode::InvalidIndex);
    assert_eq!(refused(nsm.lock_pcrs(33)), NsmErrorCode::InvalidIndex);
    // Application PCRs extend until locked, then never again.
    let before = nsm.describe_pcr(17).unwrap();
    assert!(!before.locked);
    let after = nsm.extend_pcr(17, b"config").unwrap();
    assert_ne!(after, before.value);
    nsm.lock_pcr(17).unwrap();
    assert_eq!(
        refused(nsm.extend_pcr(17, b"more")),
        NsmErrorCode::ReadOnlyIndex
    );
    assert_eq!(
        nsm.describe_pcr(17).unwrap(),
        common::nsm::PcrState {
            locked: true,
            value: after
        }
    );
    // Oversized extension data.
    assert_eq!(
        refused(nsm.extend_pcr(18, &vec![0; 0x1001])),
        NsmErrorCode::InputTooLarge
    );
    // Randomness differs between calls.
    assert_ne!(nsm.get_random().unwrap(), nsm.get_random().unwrap());
}

#[test]
fn attestation_field_limits() {
    let nsm = nsm(false);
    let max = vec![7u8; 1024];
    let over = vec![7u8; 1025];
    let doc = nsm
        .attest(AttestationRequest {
            user_data: Some(&max),
            nonce: Some(&max),
            public_key: Some(&max),
        })
        .unwrap();
    verify(
        &doc,
        &[mock_root()],
        UnixTime::now(),
        &policy(BTreeMap::new()),
    )
    .unwrap();
    for i in 0..3 {
        let mut r = AttestationRequest::default();
        match i {
            0 => r.user_data = Some(&over),
            1 => r.nonce = Some(&over),
            _ => r.public_key = Some(&over),
        }
        assert_eq!(refused(nsm.attest(r)), NsmErrorCode::InputTooLarge);
    }
}

#[test]
fn documents_verify_under_the_mock_root_only() {
    let nsm = nsm(false);
    let m = measurement();
    nsm.extend_pcr(16, b"model").unwrap();
    nsm.lock_pcr(16).unwrap();
    let pcr16 = nsm.describe_pcr(16).unwrap().value;
    let doc = nsm
        .attest(AttestationRequest {
            nonce: Some(b"abc"),
            ..Default::default()
        })
        .unwrap();

    let expected: BTreeMap<u8, [u8; 48]> = [
        (0, m.pcr0),
        (1, m.pcr1),
        (2, m.pcr2),
        (3, m.pcr3),
        (4, m.pcr4),
        (16, pcr16.try_into().unwrap()),
    ]
    .into();
    let mut p = policy(expected);
    p.nonce = Some(b"abc".to_vec());
    let verified = verify(&doc, &[mock_root()], UnixTime::now(), &p).unwrap();
    assert_eq!(verified.pcrs().len(), 17, "PCR0-15 plus the locked PCR16");
    assert!(
        verified.pcr(17).is_none(),
        "unlocked application PCRs are not attested"
    );
    assert_eq!(verified.module_id(), nsm.module_id());

    assert_eq!(
        verify(&doc, &[TrustAnchor::aws_nitro_root()], UnixTime::now(), &p),
        Err(VerifyError::UntrustedRoot)
    );
}

#[test]
fn debug_mode_zeroes_pcr0_to_2() {
    let nsm = nsm(true);
    let doc = nsm.attest(AttestationRequest::default()).unwrap();
    let roots = [mock_root()];
    assert_eq!(
        verify(&doc, &roots, UnixTime::now(), &policy(BTreeMap::new())),
        Err(VerifyError::DebugMode)
    );
    let mut p = policy(BTreeMap::new());
    p.allow_debug = true;
    let v = verify(&doc, &roots, UnixTime::now(), &p).unwrap();
    assert!(v.is_debug());
    assert_eq!(v.pcr(3), Some(&measurement().pcr3));
}

/// Per certificate: (extension OID, critical) in order, then the subject's and the issuer's
/// name attribute types with their string tags.
type CertShape = (Vec<(String, bool)>, Vec<String>, Vec<String>);

/// The parts of a document that make its "shape".
#[derive(Debug, PartialEq)]
struct Shape {
    envelope_prefix: Vec<u8>,
    key_order: Vec<usize>,
    pcr_count: usize,
    pcr_len: usize,
    cabundle_len: usize,
    /// Per certificate: (extension OID, critical) in order, and the name attribute OIDs.
    certs: Vec<CertShape>,
    signature_len: usize,
}

fn shape(doc: &[u8]) -> (Shape, serde_cbor::Value) {
    let envelope: Vec<serde_cbor::Value> = serde_cbor::from_slice(doc).unwrap();
    let payload = match &envelope[2] {
        serde_cbor::Value::Bytes(b) => b.clone(),
        other => panic!("{other:?}"),
    };
    let signature_len = match &envelope[3] {
        serde_cbor::Value::Bytes(b) => b.len(),
        other => panic!("{other:?}"),
    };
    let keys = [
        "module_id",
        "digest",
        "timestamp",
        "pcrs",
        "certificate",
        "cabundle",
        "public_key",
        "user_data",
        "nonce",
    ];
    let key_order = keys
        .iter()
        .map(|k| {
            let mut needle = vec![0x60 | k.len() as u8];
            needle.extend_from_slice(k.as_bytes());
            payload
                .windows(needle.len())
                .position(|w| w == needle)
                .unwrap()
        })
        .collect::<Vec<_>>();
    // Ranks, not offsets: the order of the keys is the shape; their offsets depend on sizes.
    let key_order = key_order
        .iter()
        .map(|p| key_order.iter().filter(|q| *q < p).count())
        .collect();
    let value: serde_cbor::Value = serde_cbor::from_slice(&payload).unwrap();
    let map = match &value {
        serde_cbor::Value::Map(m) => m,
        other => panic!("{other:?}"),
    };
    let get = |k: &str| map.get(&serde_cbor::Value::Text(k.into())).unwrap();
    let (pcr_count, pcr_len) = match get("pcrs") {
        serde_cbor::Value::Map(m) => (
            m.len(),
            match m.values().next().unwrap() {
                serde_cbor::Value::Bytes(b) => b.len(),
                _ => 0,
            },
        ),
        other => panic!("{other:?}"),
    };
    let mut ders = match get("cabundle") {
        serde_cbor::Value::Array(a) => a
            .iter()
            .map(|c| match c {
                serde_cbor::Value::Bytes(b) => b.clone(),
                _ => panic!(),
            })
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let cabundle_len = ders.len();
    match get("certificate") {
        serde_cbor::Value::Bytes(b) => ders.push(b.clone()),
        other => panic!("{other:?}"),
    }
    let names = |n: &x509_cert::name::Name| {
        n.0.iter()
            .flat_map(|rdn| {
                rdn.0
                    .iter()
                    .map(|a| format!("{}:{:?}", a.oid, der::Tagged::tag(&a.value)))
            })
            .collect::<Vec<_>>()
    };
    let certs = ders
        .iter()
        .map(|d| {
            let c = Certificate::from_der(d).unwrap();
            let exts = c
                .tbs_certificate
                .extensions
                .unwrap_or_default()
                .iter()
                .map(|e| (e.extn_id.to_string(), e.critical))
                .collect();
            (
                exts,
                names(&c.tbs_certificate.subject),
                names(&c.tbs_certificate.issuer),
            )
        })
        .collect();
    let envelope_prefix = doc[..7].to_vec();
    (
        Shape {
            envelope_prefix,
            key_order,
            pcr_count,
            pcr_len,
            cabundle_len,
            certs,
            signature_len,
        },
        value,
    )
}

#[test]
fn shape_matches_a_real_2026_document() {
    let real = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/vectors/nitro/base_hinted_repaired.cbor"),
    )
    .expect("../shared/vectors beside the checkout");
    let nsm = nsm(false);
    let mock = nsm
        .attest(AttestationRequest {
            user_data: Some(b"x"),
            ..Default::default()
        })
        .unwrap();
    let (real_shape, _) = shape(&real);
    let (mock_shape, mock_value) = shape(&mock);
    // Envelope: array(4), bstr(4) a1 01 38 22, then the empty unprotected map.
    assert_eq!(
        real_shape.envelope_prefix,
        [0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0]
    );
    assert_eq!(mock_shape, real_shape);
    assert_eq!(
        mock_shape.key_order,
        (0..9).collect::<Vec<_>>(),
        "keys in AWS order"
    );

    // module_id `i-<17 hex>-enc<16 hex>`, null for absent optional fields, ms timestamp.
    let id = nsm.module_id();
    let hex = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    };
    assert!(
        id.len() == 2 + 17 + 4 + 16
            && id.starts_with("i-")
            && &id[19..23] == "-enc"
            && hex(&id[2..19])
            && hex(&id[23..]),
        "{id}"
    );
    let map = match mock_value {
        serde_cbor::Value::Map(m) => m,
        _ => unreachable!(),
    };
    assert_eq!(
        map.get(&serde_cbor::Value::Text("nonce".into())),
        Some(&serde_cbor::Value::Null)
    );
    let ts = match map.get(&serde_cbor::Value::Text("timestamp".into())) {
        Some(serde_cbor::Value::Integer(t)) => *t as u64,
        _ => panic!(),
    };
    let now = UnixTime::now().as_millis();
    assert!(ts <= now && now - ts < 60_000, "millisecond timestamp");

    // The leaf lives 3 hours.
    let leaf = match map.get(&serde_cbor::Value::Text("certificate".into())) {
        Some(serde_cbor::Value::Bytes(b)) => Certificate::from_der(b).unwrap(),
        _ => panic!(),
    };
    let v = &leaf.tbs_certificate.validity;
    assert_eq!(
        v.not_after.to_unix_duration() - v.not_before.to_unix_duration(),
        std::time::Duration::from_secs(3 * 3600)
    );
}

#[test]
fn concurrent_use_is_safe() {
    let nsm = std::sync::Arc::new(nsm(false));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let nsm = nsm.clone();
            std::thread::spawn(move || {
                let nonce = [i as u8; 8];
                let doc = nsm
                    .attest(AttestationRequest {
                        nonce: Some(&nonce),
                        ..Default::default()
                    })
                    .unwrap();
                let mut p = policy(BTreeMap::new());
                p.nonce = Some(nonce.to_vec());
                verify(&doc, &[mock_root()], UnixTime::now(), &p).unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn the_chain_rotates_so_documents_never_carry_an_expired_certificate() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let now = Arc::new(AtomicU64::new(start));
    let clock_now = now.clone();
    let mut config = MockNsmConfig::new(measurement());
    config.clock = Some(Arc::new(move || {
        std::time::Duration::from_secs(clock_now.load(Ordering::SeqCst))
    }));
    let nsm = MockNsm::new(MockCa::load(&ca_dir()).unwrap(), config).unwrap();
    let roots = [mock_root()];
    let mut leaves = std::collections::HashSet::new();
    // Four days in 50-minute steps: the leaf (3 h), instance (1 day) and zonal (5.75 days)
    // levels all come due at some point.
    let steps = 4 * 24 * 60 / 50;
    let mut no_age_limit = policy(BTreeMap::new());
    no_age_limit.max_age = None;
    for step in 0..steps {
        let t = start + step * 50 * 60;
        now.store(t, Ordering::SeqCst);
        let doc = nsm.attest(AttestationRequest::default()).unwrap();
        let v = verify(
            &doc,
            &roots,
            UnixTime::from_millis(t * 1000),
            &policy(BTreeMap::new()),
        )
        .unwrap_or_else(|e| panic!("step {step}: {e}"));
        assert_eq!(v.timestamp().as_millis(), t * 1000);
        leaves.insert(v.certificate().to_vec());
        // A fresh document's chain stays valid for the rotation margin (10 min) at least.
        verify(
            &doc,
            &roots,
            UnixTime::from_millis((t + 9 * 60) * 1000),
            &no_age_limit,
        )
        .unwrap();
    }
    // A leaf serves at most 4 steps (200 min > 3 h), so it was re-issued every 4th step.
    assert!(
        leaves.len() as u64 >= steps / 4,
        "{} leaves in {steps} steps",
        leaves.len()
    );
}

/// The signer handed to QEMU's patched virtio-nsm is the chain this NSM signs with: its key
/// signs what its leaf certificate's key verifies, its bundle starts at the mock root and each
/// certificate issues the next, and the leaf's issuer is the bundle's last certificate.
#[test]
fn the_exported_signer_is_this_nsms_chain() {
    use aws_lc_rs::signature::{
        EcdsaKeyPair, UnparsedPublicKey, ECDSA_P384_SHA384_FIXED, ECDSA_P384_SHA384_FIXED_SIGNING,
    };
    use der::{DecodePem, Encode};
    let nsm = nsm(false);
    let s = nsm.signer().unwrap();
    assert!(
        !format!("{s:?}").contains("PRIVATE"),
        "Debug leaves the key out"
    );

    let (label, pkcs8) = der::pem::decode_vec(s.key_pem.as_bytes()).unwrap();
    assert_eq!(label, "PRIVATE KEY");
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &pkcs8).unwrap();
    let sig = key
        .sign(&aws_lc_rs::rand::SystemRandom::new(), b"Signature1")
        .unwrap();
    let leaf = Certificate::from_pem(s.certificate_pem.as_bytes()).unwrap();
    let spki = leaf
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes()
        .to_vec();
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &spki)
        .verify(b"Signature1", sig.as_ref())
        .unwrap();

    let bundle = Certificate::load_pem_chain(s.cabundle_pem.as_bytes()).unwrap();
    assert_eq!(bundle.len(), 4);
    assert_eq!(
        bundle[0].to_der().unwrap(),
        MockCa::load(&ca_dir()).unwrap().root_der()
    );
    for pair in bundle.windows(2) {
        assert_eq!(
            pair[1].tbs_certificate.issuer,
            pair[0].tbs_certificate.subject
        );
    }
    assert_eq!(
        leaf.tbs_certificate.issuer,
        bundle[3].tbs_certificate.subject
    );
    // A document signed now carries the same leaf.
    let doc = nsm.attest(AttestationRequest::default()).unwrap();
    let leaf_der = leaf.to_der().unwrap();
    assert!(doc
        .windows(leaf_der.len())
        .any(|w| w == leaf_der.as_slice()));
}
