//! The mock KMS behaves as AWS KMS for this product: operations, encryption context, tamper
//! detection, persistence, and attested key release with key-policy conditions.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestation_verifier::TrustAnchor;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::cms::{Envelope, RecipientKey};
use common::mock_ca::MockCa;
use common::nsm::mock::{ImageMeasurement, MockNsm, MockNsmConfig};
use common::nsm::{AttestationRequest, Nsm};
use mock_kms::{Kms, KmsError};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

fn tempdir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "mock-kms-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

struct Env {
    kms: Kms,
    state: PathBuf,
    ca_dir: PathBuf,
}

fn env() -> Env {
    let ca_dir = tempdir("ca");
    let ca = MockCa::load_or_create(&ca_dir).unwrap();
    let root = TrustAnchor::from_der(ca.root_der()).unwrap();
    let state = tempdir("state");
    let kms = Kms::open(&state, vec![root], "us-east-1").unwrap();
    Env { kms, state, ca_dir }
}

fn call(kms: &Kms, op: &str, body: Value) -> Result<Value, KmsError> {
    kms.handle("AKIDLOCALTEST", op, body.to_string().as_bytes())
}

fn measurement() -> ImageMeasurement {
    ImageMeasurement::from_label("kms-tests")
}

fn nsm(env: &Env, debug: bool) -> MockNsm {
    let mut config = MockNsmConfig::new(measurement());
    config.debug = debug;
    MockNsm::new(MockCa::load(&env.ca_dir).unwrap(), config).unwrap()
}

/// An attestation document for `key`, from an enclave whose PCR16 holds `model`.
fn attestation(nsm: &MockNsm, key: &RecipientKey, model: &[u8]) -> String {
    nsm.extend_pcr(16, model).unwrap();
    nsm.lock_pcr(16).unwrap();
    let doc = nsm
        .attest(AttestationRequest {
            public_key: Some(key.public_key_der()),
            ..Default::default()
        })
        .unwrap();
    B64.encode(doc)
}

fn recipient(doc: &str) -> Value {
    json!({ "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": doc })
}

fn create_key(kms: &Kms) -> String {
    call(kms, "CreateKey", json!({ "Description": "test" })).unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The policy `host kms-policy` will generate: anything for the account except Decrypt,
/// which needs an attested enclave with these PCR0 and PCR16.
fn attested_policy(pcr0: &[u8], pcr16: &[u8]) -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Sid": "admin", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::000000000000:root"},
              "Action": ["kms:Create*", "kms:Describe*", "kms:Put*", "kms:Get*", "kms:Encrypt", "kms:GenerateDataKey*"], "Resource": "*" },
            { "Sid": "enclave", "Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:Decrypt", "Resource": "*",
              "Condition": { "StringEqualsIgnoreCase": {
                  "kms:RecipientAttestation:ImageSha384": hex::encode(pcr0),
                  "kms:RecipientAttestation:PCR16": hex::encode(pcr16) } } }
        ]
    })
    .to_string()
}

fn pcr16_of(model: &[u8]) -> Vec<u8> {
    use aws_lc_rs::digest::{Context, SHA384};
    let mut c = Context::new(&SHA384);
    c.update(&[0; 48]);
    c.update(model);
    c.finish().as_ref().to_vec()
}

fn context() -> Value {
    json!({ "model_name": "smollm2", "model_sha256": "ab".repeat(32) })
}

/// GenerateDataKey (no recipient: the sealing side) → CiphertextBlob.
fn data_key_blob(kms: &Kms, key_id: &str) -> (String, Vec<u8>) {
    let out = call(
        kms,
        "GenerateDataKey",
        json!({ "KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": context() }),
    )
    .unwrap();
    let plain = B64.decode(out["Plaintext"].as_str().unwrap()).unwrap();
    assert_eq!(plain.len(), 32);
    (out["CiphertextBlob"].as_str().unwrap().to_owned(), plain)
}

#[test]
fn encrypt_decrypt_context_and_tampering() {
    let e = env();
    let key = create_key(&e.kms);
    let ct = call(
        &e.kms,
        "Encrypt",
        json!({ "KeyId": key, "Plaintext": B64.encode(b"hello"), "EncryptionContext": {"a": "1"} }),
    )
    .unwrap();
    let blob = ct["CiphertextBlob"].as_str().unwrap();
    let out = call(
        &e.kms,
        "Decrypt",
        json!({ "CiphertextBlob": blob, "EncryptionContext": {"a": "1"} }),
    )
    .unwrap();
    assert_eq!(
        B64.decode(out["Plaintext"].as_str().unwrap()).unwrap(),
        b"hello"
    );
    assert!(out["KeyId"].as_str().unwrap().ends_with(&key));

    let kind = |r: Result<Value, KmsError>| r.unwrap_err().kind;
    assert_eq!(
        kind(call(&e.kms, "Decrypt", json!({ "CiphertextBlob": blob }))),
        "InvalidCiphertextException"
    );
    assert_eq!(
        kind(call(
            &e.kms,
            "Decrypt",
            json!({ "CiphertextBlob": blob, "EncryptionContext": {"a": "2"} })
        )),
        "InvalidCiphertextException"
    );
    let mut raw = B64.decode(blob).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 1;
    assert_eq!(
        kind(call(
            &e.kms,
            "Decrypt",
            json!({ "CiphertextBlob": B64.encode(&raw), "EncryptionContext": {"a": "1"} })
        )),
        "InvalidCiphertextException"
    );
    assert_eq!(
        kind(call(
            &e.kms,
            "Encrypt",
            json!({ "KeyId": "nope", "Plaintext": "aGk=" })
        )),
        "NotFoundException"
    );
    assert_eq!(
        kind(call(
            &e.kms,
            "Encrypt",
            json!({ "KeyId": key, "Plaintext": "!!" })
        )),
        "ValidationException"
    );
    assert_eq!(
        kind(call(&e.kms, "Frobnicate", json!({}))),
        "UnknownOperationException"
    );
    assert_eq!(
        kind(e.kms.handle("AKIDLOCALTEST", "Encrypt", b"{not json")),
        "SerializationException"
    );
}

#[test]
fn aliases_policies_and_restart() {
    let e = env();
    let key = create_key(&e.kms);
    call(
        &e.kms,
        "CreateAlias",
        json!({ "AliasName": "alias/model", "TargetKeyId": key }),
    )
    .unwrap();
    assert_eq!(
        call(
            &e.kms,
            "CreateAlias",
            json!({ "AliasName": "alias/model", "TargetKeyId": key })
        )
        .unwrap_err()
        .kind,
        "AlreadyExistsException"
    );
    assert_eq!(
        call(
            &e.kms,
            "CreateAlias",
            json!({ "AliasName": "model", "TargetKeyId": key })
        )
        .unwrap_err()
        .kind,
        "ValidationException"
    );
    let d = call(&e.kms, "DescribeKey", json!({ "KeyId": "alias/model" })).unwrap();
    assert_eq!(d["KeyMetadata"]["KeyId"], key.as_str());
    let arn = d["KeyMetadata"]["Arn"].as_str().unwrap().to_owned();
    call(&e.kms, "DescribeKey", json!({ "KeyId": arn })).unwrap();
    call(
        &e.kms,
        "DescribeKey",
        json!({ "KeyId": "arn:aws:kms:us-east-1:000000000000:alias/model" }),
    )
    .unwrap();

    let policy = attested_policy(&[1; 48], &[2; 48]);
    call(
        &e.kms,
        "PutKeyPolicy",
        json!({ "KeyId": key, "PolicyName": "default", "Policy": policy }),
    )
    .unwrap();
    assert_eq!(
        call(&e.kms, "GetKeyPolicy", json!({ "KeyId": key })).unwrap()["Policy"],
        policy.as_str()
    );
    assert_eq!(
        call(&e.kms, "PutKeyPolicy", json!({ "KeyId": key, "Policy": "{\"Statement\":[{\"Effect\":\"Allow\",\"NotAction\":\"x\"}]}" })).unwrap_err().kind,
        "MalformedPolicyDocumentException"
    );
    let (blob, _) = data_key_blob(&e.kms, "alias/model");

    // Restart: a new process on the same state finds the key, alias and policy.
    drop(e.kms);
    let kms = Kms::open(&e.state, vec![], "us-east-1").unwrap();
    assert_eq!(
        call(&kms, "GetKeyPolicy", json!({ "KeyId": "alias/model" })).unwrap()["Policy"],
        policy.as_str()
    );
    // Without an attested recipient the policy denies Decrypt.
    let err = call(
        &kms,
        "Decrypt",
        json!({ "CiphertextBlob": blob, "EncryptionContext": context() }),
    )
    .unwrap_err();
    assert_eq!(err.kind, "AccessDeniedException");
}

#[test]
fn attested_release_succeeds_with_a_matching_policy() {
    let e = env();
    let key = create_key(&e.kms);
    let model = b"model-sha256";
    call(
        &e.kms,
        "PutKeyPolicy",
        json!({ "KeyId": key, "Policy": attested_policy(&measurement().pcr0, &pcr16_of(model)) }),
    )
    .unwrap();
    let (blob, plain) = data_key_blob(&e.kms, &key);

    let rk = RecipientKey::generate().unwrap();
    let doc = attestation(&nsm(&e, false), &rk, model);
    let out = call(&e.kms, "Decrypt", json!({ "CiphertextBlob": blob, "EncryptionContext": context(), "Recipient": recipient(&doc) })).unwrap();
    assert!(
        out.get("Plaintext").is_none(),
        "never the plaintext with a Recipient"
    );
    let env = Envelope::parse(
        &B64.decode(out["CiphertextForRecipient"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(&rk.open(&env).unwrap()[..], &plain[..]);

    // GenerateDataKey and GenerateRandom with a Recipient also answer only in CMS.
    let g = call(
        &e.kms,
        "GenerateDataKey",
        json!({ "KeyId": key, "NumberOfBytes": 32, "Recipient": recipient(&doc) }),
    )
    .unwrap();
    assert!(g.get("Plaintext").is_none() && g.get("CiphertextBlob").is_some());
    let r = call(
        &e.kms,
        "GenerateRandom",
        json!({ "NumberOfBytes": 64, "Recipient": recipient(&doc) }),
    )
    .unwrap();
    let env = Envelope::parse(
        &B64.decode(r["CiphertextForRecipient"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(rk.open(&env).unwrap().len(), 64);
}

#[test]
fn attested_release_is_denied_when_anything_differs() {
    let e = env();
    let key = create_key(&e.kms);
    let model = b"genuine-model";
    call(
        &e.kms,
        "PutKeyPolicy",
        json!({ "KeyId": key, "Policy": attested_policy(&measurement().pcr0, &pcr16_of(model)) }),
    )
    .unwrap();
    let (blob, _) = data_key_blob(&e.kms, &key);
    let rk = RecipientKey::generate().unwrap();
    let decrypt = |kms: &Kms, doc: &str| {
        call(kms, "Decrypt", json!({ "CiphertextBlob": blob, "EncryptionContext": context(), "Recipient": recipient(doc) }))
            .map(|_| ())
            .map_err(|e| e.kind)
    };

    // Another model in PCR16.
    assert_eq!(
        decrypt(&e.kms, &attestation(&nsm(&e, false), &rk, b"other-model")),
        Err("AccessDeniedException")
    );
    // A debug-mode enclave (PCR0 zero).
    assert_eq!(
        decrypt(&e.kms, &attestation(&nsm(&e, true), &rk, model)),
        Err("AccessDeniedException")
    );
    // Another image (PCR0).
    let other_image = MockNsm::new(
        MockCa::load(&e.ca_dir).unwrap(),
        MockNsmConfig::new(ImageMeasurement::from_label("other")),
    )
    .unwrap();
    assert_eq!(
        decrypt(&e.kms, &attestation(&other_image, &rk, model)),
        Err("AccessDeniedException")
    );
    // A foreign root: a KMS that does not trust the mock CA.
    let strict = Kms::open(&e.state, vec![], "us-east-1").unwrap();
    assert_eq!(
        decrypt(&strict, &attestation(&nsm(&e, false), &rk, model)),
        Err("AccessDeniedException")
    );
    // An expired document: made 10 minutes ago.
    let mut config = MockNsmConfig::new(measurement());
    let past = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        - std::time::Duration::from_secs(600);
    config.clock = Some(std::sync::Arc::new(move || past));
    let old = MockNsm::new(MockCa::load(&e.ca_dir).unwrap(), config).unwrap();
    assert_eq!(
        decrypt(&e.kms, &attestation(&old, &rk, model)),
        Err("AccessDeniedException")
    );
    // A corrupted document.
    let mut raw = B64
        .decode(attestation(&nsm(&e, false), &rk, model))
        .unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 1;
    assert_eq!(
        decrypt(&e.kms, &B64.encode(raw)),
        Err("AccessDeniedException")
    );
    // A document without a public key.
    let n = nsm(&e, false);
    let no_key = B64.encode(n.attest(AttestationRequest::default()).unwrap());
    assert_eq!(decrypt(&e.kms, &no_key), Err("ValidationException"));
    // And the matching one works, so the denials above are about the differences.
    assert_eq!(
        decrypt(&e.kms, &attestation(&nsm(&e, false), &rk, model)),
        Ok(())
    );
    let _ = std::fs::remove_dir_all(&e.state);
}

#[test]
fn number_of_bytes_and_key_spec_validation() {
    let e = env();
    let key = create_key(&e.kms);
    for bad in [
        json!({ "KeyId": key }),
        json!({ "KeyId": key, "KeySpec": "AES_512" }),
        json!({ "KeyId": key, "NumberOfBytes": 0 }),
        json!({ "KeyId": key, "NumberOfBytes": 1025 }),
        json!({ "KeyId": key, "KeySpec": "AES_256", "NumberOfBytes": 32 }),
    ] {
        assert_eq!(
            call(&e.kms, "GenerateDataKey", bad.clone())
                .unwrap_err()
                .kind,
            "ValidationException",
            "{bad}"
        );
    }
    let out = call(
        &e.kms,
        "GenerateDataKeyWithoutPlaintext",
        json!({ "KeyId": key, "KeySpec": "AES_128" }),
    )
    .unwrap();
    assert!(out.get("Plaintext").is_none());
    assert_eq!(
        call(&e.kms, "GenerateRandom", json!({ "NumberOfBytes": 2000 }))
            .unwrap_err()
            .kind,
        "ValidationException"
    );
    let r = call(&e.kms, "GenerateRandom", json!({ "NumberOfBytes": 10 })).unwrap();
    assert_eq!(
        B64.decode(r["Plaintext"].as_str().unwrap()).unwrap().len(),
        10
    );
}

#[test]
fn wire_protocol() {
    use std::io::{Read, Write};
    let e = env();
    let kms = std::sync::Arc::new(e.kms);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(mock_kms::serve(listener, kms, async {
        let _ = stop_rx.await;
    }));
    let post = |target: &str, auth: bool, body: &str| -> (u16, Value) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let auth = if auth {
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/kms/aws4_request, SignedHeaders=host;x-amz-date;x-amz-target, Signature=00\r\n"
        } else {
            ""
        };
        write!(
            s,
            "POST / HTTP/1.1\r\nHost: {addr}\r\nX-Amz-Target: {target}\r\nContent-Type: application/x-amz-json-1.1\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status: u16 = text[9..12].parse().unwrap();
        assert!(text
            .to_ascii_lowercase()
            .contains("content-type: application/x-amz-json-1.1"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        (status, serde_json::from_str(body).unwrap())
    };
    let (status, v) = post("TrentService.CreateKey", true, "{}");
    assert_eq!(status, 200);
    let key = v["KeyMetadata"]["KeyId"].as_str().unwrap().to_owned();
    let (status, v) = post(
        "TrentService.Decrypt",
        true,
        "{\"CiphertextBlob\":\"AAAA\"}",
    );
    assert_eq!(
        (status, v["__type"].as_str()),
        (400, Some("InvalidCiphertextException"))
    );
    let (status, v) = post(
        "TrentService.DescribeKey",
        false,
        &format!("{{\"KeyId\":\"{key}\"}}"),
    );
    assert_eq!(
        (status, v["__type"].as_str()),
        (400, Some("MissingAuthenticationTokenException"))
    );
    let (status, v) = post("Other.DescribeKey", true, "{}");
    assert_eq!(
        (status, v["__type"].as_str()),
        (400, Some("UnknownOperationException"))
    );
    let _ = stop_tx.send(());
}

#[test]
fn concurrent_requests_are_safe_and_persisted() {
    let e = env();
    let kms = std::sync::Arc::new(e.kms);
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let kms = kms.clone();
            std::thread::spawn(move || {
                let key = create_key(&kms);
                call(&kms, "CreateAlias", json!({ "AliasName": format!("alias/k{i}"), "TargetKeyId": key })).unwrap();
                let blob = call(&kms, "Encrypt", json!({ "KeyId": format!("alias/k{i}"), "Plaintext": B64.encode([i as u8; 8]) })).unwrap();
                let out = call(&kms, "Decrypt", json!({ "CiphertextBlob": blob["CiphertextBlob"] })).unwrap();
                assert_eq!(B64.decode(out["Plaintext"].as_str().unwrap()).unwrap(), [i as u8; 8]);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(kms);
    let reopened = Kms::open(&e.state, vec![], "us-east-1").unwrap();
    for i in 0..8 {
        call(
            &reopened,
            "DescribeKey",
            json!({ "KeyId": format!("alias/k{i}") }),
        )
        .unwrap();
    }
}

const OWNER: &str = "AKIDOWNER";
const OPERATOR: &str = "AKIDOPERATOR";
const PARENT: &str = "AKIDPARENT";

/// A mock with three principals: an owner in one account, an operator and its parent role in
/// another.
fn accounts() -> Env {
    let e = env();
    let mut ids = mock_kms::identity::Identities::anyone_is_default_root();
    ids.add_mapping("AKIDOWNER=arn:aws:iam::111111111111:user/owner")
        .unwrap();
    ids.add_mapping("AKIDOPERATOR=arn:aws:iam::222222222222:user/operator")
        .unwrap();
    ids.add_mapping("AKIDPARENT=arn:aws:sts::222222222222:assumed-role/parent/i-0123")
        .unwrap();
    Env {
        kms: e.kms.with_identities(ids),
        ..e
    }
}

fn call_as(kms: &Kms, who: &str, op: &str, body: Value) -> Result<Value, KmsError> {
    kms.handle(who, op, body.to_string().as_bytes())
}

fn kind(r: Result<Value, KmsError>) -> &'static str {
    r.map(|_| "ok").unwrap_or_else(|e| e.kind)
}

#[test]
fn keys_belong_to_their_creators_account() {
    let e = accounts();
    assert_eq!(
        kind(call_as(&e.kms, "AKIDNOBODY", "CreateKey", json!({}))),
        "UnrecognizedClientException"
    );
    let meta = call_as(&e.kms, OWNER, "CreateKey", json!({})).unwrap()["KeyMetadata"].clone();
    assert_eq!(meta["AWSAccountId"], "111111111111");
    let (id, arn) = (
        meta["KeyId"].as_str().unwrap().to_owned(),
        meta["Arn"].as_str().unwrap().to_owned(),
    );
    assert!(arn.starts_with("arn:aws:kms:us-east-1:111111111111:key/"));
    call_as(
        &e.kms,
        OWNER,
        "CreateAlias",
        json!({"AliasName": "alias/owned", "TargetKeyId": id}),
    )
    .unwrap();
    let describe =
        |who: &str, key: &str| kind(call_as(&e.kms, who, "DescribeKey", json!({ "KeyId": key })));
    // Another account reaches the key only by its ARN, and the default policy (the owner's
    // account) lets it do nothing.
    for by in [id.as_str(), "alias/owned"] {
        assert_eq!(describe(OPERATOR, by), "NotFoundException", "{by}");
    }
    assert_eq!(describe(OPERATOR, &arn), "AccessDeniedException");
    assert_eq!(describe(OWNER, "alias/owned"), "ok");
    // A policy that names the operator still never lets PutKeyPolicy cross accounts.
    let open = json!({"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*"}]})
        .to_string();
    call_as(
        &e.kms,
        OWNER,
        "PutKeyPolicy",
        json!({"KeyId": id, "Policy": open}),
    )
    .unwrap();
    assert_eq!(describe(OPERATOR, &arn), "ok");
    assert_eq!(
        kind(call_as(
            &e.kms,
            OPERATOR,
            "PutKeyPolicy",
            json!({"KeyId": arn, "Policy": open})
        )),
        "AccessDeniedException"
    );
}

#[test]
fn the_lockout_safety_check() {
    let e = accounts();
    let only_parent = json!({"Statement": [{"Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::222222222222:role/parent"}, "Action": "kms:Decrypt"}]})
    .to_string();
    let refused = call_as(&e.kms, OWNER, "CreateKey", json!({"Policy": only_parent})).unwrap_err();
    assert_eq!(refused.kind, "MalformedPolicyDocumentException");
    assert!(
        refused.message.contains("update the key policy"),
        "{}",
        refused.message
    );
    let id = call_as(
        &e.kms,
        OWNER,
        "CreateKey",
        json!({"Policy": only_parent, "BypassPolicyLockoutSafetyCheck": true}),
    )
    .unwrap()["KeyMetadata"]["Arn"]
        .as_str()
        .unwrap()
        .to_owned();
    // Now nobody, not even the creator, can change it.
    assert_eq!(
        kind(call_as(
            &e.kms,
            OWNER,
            "PutKeyPolicy",
            json!({"KeyId": id, "Policy": only_parent, "BypassPolicyLockoutSafetyCheck": true})
        )),
        "AccessDeniedException"
    );
}

#[test]
fn grants_allow_their_operations_under_their_constraints() {
    let e = accounts();
    let key = call_as(&e.kms, OWNER, "CreateKey", json!({})).unwrap()["KeyMetadata"]["Arn"]
        .as_str()
        .unwrap()
        .to_owned();
    let ctx = json!({"model_name": "m"});
    let blob = call_as(
        &e.kms,
        OWNER,
        "Encrypt",
        json!({"KeyId": key, "Plaintext": B64.encode(b"secret"), "EncryptionContext": ctx}),
    )
    .unwrap()["CiphertextBlob"]
        .as_str()
        .unwrap()
        .to_owned();
    let decrypt = |who: &str, context: &Value| {
        call_as(
            &e.kms,
            who,
            "Decrypt",
            json!({"CiphertextBlob": blob, "EncryptionContext": context}),
        )
    };
    assert_eq!(kind(decrypt(PARENT, &ctx)), "AccessDeniedException");
    // The operator cannot grant itself anything on the owner's key.
    assert_eq!(
        kind(call_as(
            &e.kms,
            OPERATOR,
            "CreateGrant",
            json!({"KeyId": key, "GranteePrincipal": "arn:aws:iam::222222222222:user/operator", "Operations": ["Decrypt"]})
        )),
        "AccessDeniedException"
    );
    let grant = call_as(
        &e.kms,
        OWNER,
        "CreateGrant",
        json!({"KeyId": key, "GranteePrincipal": "arn:aws:iam::222222222222:role/parent",
               "Operations": ["Decrypt"], "Constraints": {"EncryptionContextSubset": ctx}}),
    )
    .unwrap()["GrantId"]
        .as_str()
        .unwrap()
        .to_owned();
    // The role's session uses it; the constraint holds it to the context; others get nothing.
    let out = decrypt(PARENT, &ctx).unwrap();
    assert_eq!(
        B64.decode(out["Plaintext"].as_str().unwrap()).unwrap(),
        b"secret"
    );
    assert_eq!(kind(decrypt(OPERATOR, &ctx)), "AccessDeniedException");
    let other_blob = call_as(
        &e.kms,
        OWNER,
        "Encrypt",
        json!({"KeyId": key, "Plaintext": B64.encode(b"x"), "EncryptionContext": {"model_name": "n"}}),
    )
    .unwrap()["CiphertextBlob"]
        .clone();
    assert_eq!(
        kind(call_as(
            &e.kms,
            PARENT,
            "Decrypt",
            json!({"CiphertextBlob": other_blob, "EncryptionContext": {"model_name": "n"}})
        )),
        "AccessDeniedException"
    );
    // A grant's operations are only its own.
    assert_eq!(
        kind(call_as(
            &e.kms,
            PARENT,
            "ReEncrypt",
            json!({"CiphertextBlob": blob, "SourceEncryptionContext": ctx, "DestinationKeyId": key})
        )),
        "AccessDeniedException"
    );
    let list = call_as(&e.kms, OWNER, "ListGrants", json!({"KeyId": key})).unwrap();
    assert_eq!(list["Grants"][0]["GrantId"], grant.as_str());
    assert_eq!(
        list["Grants"][0]["IssuingAccount"],
        "arn:aws:iam::111111111111:root"
    );
    for bad in [
        json!({"KeyId": key, "GranteePrincipal": "*", "Operations": ["Decrypt"]}),
        json!({"KeyId": key, "GranteePrincipal": "arn:aws:iam::222222222222:root", "Operations": []}),
        json!({"KeyId": key, "GranteePrincipal": "arn:aws:iam::222222222222:root", "Operations": ["Frobnicate"]}),
    ] {
        assert_eq!(
            kind(call_as(&e.kms, OWNER, "CreateGrant", bad.clone())),
            "ValidationException",
            "{bad}"
        );
    }
    call_as(
        &e.kms,
        OWNER,
        "RevokeGrant",
        json!({"KeyId": key, "GrantId": grant}),
    )
    .unwrap();
    assert_eq!(kind(decrypt(PARENT, &ctx)), "AccessDeniedException");
    assert_eq!(
        kind(call_as(
            &e.kms,
            OWNER,
            "RevokeGrant",
            json!({"KeyId": key, "GrantId": grant})
        )),
        "NotFoundException"
    );
    // Grants persist with the key.
    call_as(
        &e.kms,
        OWNER,
        "CreateGrant",
        json!({"KeyId": key, "GranteePrincipal": "arn:aws:iam::222222222222:role/parent", "Operations": ["Decrypt"]}),
    )
    .unwrap();
    drop(e.kms);
    let again = Kms::open(&e.state, vec![], "us-east-1").unwrap();
    let key_id = key.rsplit('/').next().unwrap();
    let stored: Value = serde_json::from_str(
        &std::fs::read_to_string(e.state.join("keys").join(format!("{key_id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(stored["grants"].as_array().unwrap().len(), 1);
    drop(again);
}

#[test]
fn re_encrypt_needs_both_keys_and_never_attestation() {
    let e = accounts();
    let mk = |who: &str| {
        call_as(&e.kms, who, "CreateKey", json!({})).unwrap()["KeyMetadata"]["Arn"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (owner_key, operator_key) = (mk(OWNER), mk(OPERATOR));
    let blob = call_as(
        &e.kms,
        OWNER,
        "Encrypt",
        json!({"KeyId": owner_key, "Plaintext": B64.encode(b"data key")}),
    )
    .unwrap()["CiphertextBlob"]
        .clone();
    // The owner may re-encrypt under its own key (its default policy allows kms:*), not
    // into the operator's; the operator not out of the owner's.
    let to = |who: &str, dest: &str| {
        call_as(
            &e.kms,
            who,
            "ReEncrypt",
            json!({"CiphertextBlob": blob, "DestinationKeyId": dest}),
        )
    };
    let same = to(OWNER, &owner_key).unwrap();
    assert_eq!(same["SourceKeyId"], owner_key.as_str());
    assert_eq!(kind(to(OWNER, &operator_key)), "AccessDeniedException");
    assert_eq!(kind(to(OPERATOR, &operator_key)), "AccessDeniedException");
    // With ReEncryptFrom granted to the operator, it moves the plaintext under its own key
    // and decrypts it there: why a release policy must never allow it.
    call_as(
        &e.kms,
        OWNER,
        "CreateGrant",
        json!({"KeyId": owner_key, "GranteePrincipal": "arn:aws:iam::222222222222:root", "Operations": ["ReEncryptFrom"]}),
    )
    .unwrap();
    let moved = to(OPERATOR, &operator_key).unwrap();
    let out = call_as(
        &e.kms,
        OPERATOR,
        "Decrypt",
        json!({"CiphertextBlob": moved["CiphertextBlob"]}),
    )
    .unwrap();
    assert_eq!(
        B64.decode(out["Plaintext"].as_str().unwrap()).unwrap(),
        b"data key"
    );
}
