//! DESIGN.md §4.1–4.2 end to end in local mode: `host seal` with the real `aws-sdk-kms`
//! against mock-kms, a key policy from `host kms-policy`, and provisioning of a mock-NSM
//! enclave over a Unix socket. Release succeeds only for the measured image and model; every
//! other case is `AccessDeniedException` or a refusal by the enclave.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use aws_sdk_kms::primitives::Blob;
use common::nsm::mock::MockNsm;
use common::nsm::Nsm;
use common::sealed::{
    model_pcr16, DataKey, SealedHeader, Sealer, CONTEXT_MODEL_NAME, MIN_CHUNK_SIZE,
};
use enclave::provision::{
    provision as enclave_provision, LoadedModel, ProvisionError as EnclaveError,
};
use host::policy::{generate, PolicyRequest};
use host::provision::{provision as host_provision, ProvisionError as HostError, Provisioned};
use host::seal::{seal_file, SealRequest};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tests::{
    create_key, identity, kms_client_as, put_release_policy, release_policy, start_kms, tempdir,
    Local, IMAGE,
};

const MAX_MODEL: u64 = 1 << 30;

fn model_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + usize::from(seed) * 13) % 251) as u8)
        .collect()
}

struct Setup {
    /// The parent role: what the relay provisions with.
    kms: aws_sdk_kms::Client,
    /// The model owner: creates the key, seals, sets the policy.
    owner: aws_sdk_kms::Client,
    key_id: String,
    sealed: PathBuf,
    model: Vec<u8>,
    sha256: [u8; 32],
}

/// Writes `model` into `dir` and seals it under `key_id` as `kms`'s principal; returns the
/// sealed file and the model's SHA-256.
async fn seal_model(
    kms: &aws_sdk_kms::Client,
    key_id: &str,
    dir: &Path,
    model: &[u8],
) -> (PathBuf, [u8; 32]) {
    let input = dir.join("model.gguf");
    std::fs::write(&input, model).unwrap();
    let sealed = dir.join("model.sealed");
    let summary = seal_file(
        kms,
        &SealRequest {
            key_id: key_id.into(),
            input,
            output: sealed.clone(),
            name: "test-model".into(),
            chunk_size: MIN_CHUNK_SIZE,
        },
    )
    .await
    .unwrap();
    (sealed, summary.header.plaintext_sha256)
}

/// A key with an attested-release policy for `policy_image` and the model, and the model sealed.
async fn setup(endpoint: &str, policy_image: &str, bind_model: Option<[u8; 32]>) -> Setup {
    let owner = kms_client_as(endpoint, identity::OWNER_KEY).await;
    let key_id = create_key(&owner, None, false).await.key_id;
    let dir = tempdir("model");
    // Distinct weights for every setup, so two setups are two models.
    static SEED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
    let seed = SEED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let model = model_bytes(3 * MIN_CHUNK_SIZE as usize + 123, seed);
    let (sealed, sha256) = seal_model(&owner, &key_id, &dir, &model).await;
    put_release_policy(&owner, &key_id, policy_image, &bind_model.unwrap_or(sha256)).await;
    Setup {
        kms: kms_client_as(endpoint, identity::PARENT_KEY).await,
        owner,
        key_id,
        sealed,
        model,
        sha256,
    }
}

/// Host and enclave over a Unix socket pair.
async fn run_pair(
    kms: &aws_sdk_kms::Client,
    sealed: &Path,
    nsm: Arc<MockNsm>,
) -> (
    Result<Provisioned, HostError>,
    Result<LoadedModel, EnclaveError>,
) {
    let (mut h, mut e) = tokio::net::UnixStream::pair().unwrap();
    let key = enclave::provision::recipient_key().await.unwrap();
    let enclave = tokio::spawn(async move { enclave_provision(&mut e, nsm, MAX_MODEL, key).await });
    let host = host_provision(&mut h, kms, sealed).await;
    drop(h);
    (host, enclave.await.unwrap())
}

fn denied(host: &Result<Provisioned, HostError>, enclave: &Result<LoadedModel, EnclaveError>) {
    let err = host.as_ref().unwrap_err();
    assert_eq!(err.kms_code(), Some("AccessDeniedException"), "{err}");
    match enclave {
        Err(EnclaveError::KeyRelease(reason)) => {
            assert!(reason.starts_with("AccessDeniedException"), "{reason}")
        }
        other => panic!("enclave: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_succeeds_with_a_matching_policy() {
    let local = Local::new();
    let endpoint = start_kms(vec![local.root()]).await;
    let s = setup(&endpoint, IMAGE, None).await;
    let nsm = local.nsm(IMAGE, |_| {});
    let (host, enclave) = run_pair(&s.kms, &s.sealed, nsm.clone()).await;
    let loaded = enclave.unwrap();
    assert_eq!(&loaded.weights[..], &s.model[..]);
    assert_eq!(loaded.name, "test-model");
    assert_eq!(
        host.unwrap(),
        Provisioned {
            model_sha256: s.sha256,
            model_name: "test-model".into()
        }
    );
    let pcr16 = nsm.describe_pcr(16).unwrap();
    assert!(pcr16.locked);
    assert_eq!(pcr16.value, model_pcr16(&s.sha256));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_for_another_image_model_debug_mode_or_foreign_root() {
    let local = Local::new();
    let endpoint = start_kms(vec![local.root()]).await;

    // Wrong PCR0: the policy names another image.
    let s = setup(&endpoint, "another-image", None).await;
    let (h, e) = run_pair(&s.kms, &s.sealed, local.nsm(IMAGE, |_| {})).await;
    denied(&h, &e);

    // Wrong PCR16: the policy binds the key to another model.
    let s = setup(&endpoint, IMAGE, Some([9; 32])).await;
    let (h, e) = run_pair(&s.kms, &s.sealed, local.nsm(IMAGE, |_| {})).await;
    denied(&h, &e);

    // A debug-mode enclave of the right image.
    let s = setup(&endpoint, IMAGE, None).await;
    let (h, e) = run_pair(&s.kms, &s.sealed, local.nsm(IMAGE, |c| c.debug = true)).await;
    denied(&h, &e);

    // An expired document: the enclave's clock is 10 minutes behind KMS's.
    let past = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        - std::time::Duration::from_secs(600);
    let (h, e) = run_pair(
        &s.kms,
        &s.sealed,
        local.nsm(IMAGE, |c| c.clock = Some(Arc::new(move || past))),
    )
    .await;
    denied(&h, &e);

    // A KMS that does not trust the mock root (as real KMS would not).
    let strict = start_kms(vec![]).await;
    let s = setup(&strict, IMAGE, None).await;
    let (h, e) = run_pair(&s.kms, &s.sealed, local.nsm(IMAGE, |_| {})).await;
    denied(&h, &e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_without_attestation() {
    let local = Local::new();
    let endpoint = start_kms(vec![local.root()]).await;
    let s = setup(&endpoint, IMAGE, None).await;
    let bytes = std::fs::read(&s.sealed).unwrap();
    let (header, _) = SealedHeader::decode(&bytes).unwrap();
    let err = s
        .kms
        .decrypt()
        .key_id(&header.key_id)
        .ciphertext_blob(Blob::new(header.wrapped_key.clone()))
        .set_encryption_context(Some(header.context.clone().into_iter().collect()))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        host::kms::KmsFailure::from_sdk(&err).code,
        "AccessDeniedException"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_sealed_files_are_refused_by_the_enclave() {
    let local = Local::new();
    let endpoint = start_kms(vec![local.root()]).await;
    let s = setup(&endpoint, IMAGE, None).await;
    let bytes = std::fs::read(&s.sealed).unwrap();
    let (header, header_len) = SealedHeader::decode(&bytes).unwrap();
    let chunk = header.chunk_len(0);
    let dir = tempdir("tamper");
    let write = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };

    // A flipped bit in chunk 2.
    let mut flipped = bytes.clone();
    flipped[header_len + 2 * chunk + 5] ^= 0x10;
    let (h, e) = run_pair(
        &s.kms,
        &write("flipped", &flipped),
        local.nsm(IMAGE, |_| {}),
    )
    .await;
    assert!(
        matches!(
            e,
            Err(EnclaveError::Sealed(
                common::sealed::SealError::ChunkAuthentication { index: 2 }
            ))
        ),
        "{e:?}"
    );
    assert!(
        matches!(&h, Err(HostError::Enclave(r)) if r.contains("chunk 2")),
        "{h:?}"
    );

    // Chunks 1 and 2 swapped.
    let mut swapped = bytes[..header_len + chunk].to_vec();
    swapped.extend_from_slice(&bytes[header_len + 2 * chunk..header_len + 3 * chunk]);
    swapped.extend_from_slice(&bytes[header_len + chunk..header_len + 2 * chunk]);
    swapped.extend_from_slice(&bytes[header_len + 3 * chunk..]);
    let (_, e) = run_pair(
        &s.kms,
        &write("swapped", &swapped),
        local.nsm(IMAGE, |_| {}),
    )
    .await;
    assert!(
        matches!(
            e,
            Err(EnclaveError::Sealed(
                common::sealed::SealError::ChunkAuthentication { index: 1 }
            ))
        ),
        "{e:?}"
    );

    // Another sealed file's header on these chunks: KMS releases that file's key, and the
    // chunks do not authenticate under it.
    let other = setup(&endpoint, IMAGE, None).await;
    let other_bytes = std::fs::read(&other.sealed).unwrap();
    let (_, other_len) = SealedHeader::decode(&other_bytes).unwrap();
    let mut mixed = other_bytes[..other_len].to_vec();
    mixed.extend_from_slice(&bytes[header_len..]);
    let (_, e) = run_pair(
        &other.kms,
        &write("mixed", &mixed),
        local.nsm(IMAGE, |_| {}),
    )
    .await;
    assert!(
        matches!(
            e,
            Err(EnclaveError::Sealed(
                common::sealed::SealError::ChunkAuthentication { index: 0 }
            ))
        ),
        "{e:?}"
    );
}

/// A sealed file of the attacker's `weights` under its own data key, whose header claims the
/// model with `claimed_sha256`.
fn attacker_sealed(claimed_sha256: [u8; 32], weights: &[u8]) -> Vec<u8> {
    let header = SealedHeader {
        chunk_size: MIN_CHUNK_SIZE,
        plaintext_size: weights.len() as u64,
        plaintext_sha256: claimed_sha256,
        nonce_prefix: [1; 7],
        key_id: "attacker".into(),
        wrapped_key: vec![1],
        context: [
            (CONTEXT_MODEL_NAME.to_string(), "test-model".to_string()),
            (
                "model_sha256".to_string(),
                common::sealed::hex_lower(&claimed_sha256),
            ),
        ]
        .into(),
    };
    let key = DataKey::from_slice(&mut [0x42u8; 32]).unwrap();
    let mut sealer = Sealer::new(&key, header).unwrap();
    let mut out = sealer.header_bytes().to_vec();
    for piece in weights.chunks(MIN_CHUNK_SIZE as usize) {
        let mut buf = piece.to_vec();
        sealer.seal_next(&mut buf).unwrap();
        out.extend_from_slice(&buf);
    }
    out
}

/// A malicious host that forges the key release: it encrypts its own data key to the
/// enclave's attested RSA key and streams its own weights.
async fn forged_release(nsm: Arc<MockNsm>, sealed: Vec<u8>) -> Result<LoadedModel, EnclaveError> {
    let (mut h, mut e) = tokio::net::UnixStream::pair().unwrap();
    let key = enclave::provision::recipient_key().await.unwrap();
    let enclave = tokio::spawn(async move { enclave_provision(&mut e, nsm, MAX_MODEL, key).await });
    tests::host_with_own_key(&mut h, &sealed, &[0x42; 32]).await;
    enclave.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_key_release_cannot_pass_as_the_genuine_model() {
    let local = Local::new();
    let genuine = model_bytes(2 * MIN_CHUNK_SIZE as usize, 1);
    let genuine_sha = common::sealed::sha256(&genuine);
    let attacker = model_bytes(2 * MIN_CHUNK_SIZE as usize, 99);
    let attacker_sha = common::sealed::sha256(&attacker);

    // Honest header for its own model: the enclave loads it, but PCR16 names that model, and
    // every client's policy (PCR16 = genuine) rejects this enclave.
    let nsm = local.nsm(IMAGE, |_| {});
    let loaded = forged_release(nsm.clone(), attacker_sealed(attacker_sha, &attacker)).await;
    assert_eq!(loaded.unwrap().sha256, attacker_sha);
    let pcr16 = nsm.describe_pcr(16).unwrap().value;
    assert_eq!(pcr16, model_pcr16(&attacker_sha));
    assert_ne!(pcr16, model_pcr16(&genuine_sha));

    // A header claiming the genuine model over the attacker's weights: PCR16 would say
    // "genuine", so the enclave must refuse the weights, and does (SHA-256 check).
    let nsm = local.nsm(IMAGE, |_| {});
    let loaded = forged_release(nsm.clone(), attacker_sealed(genuine_sha, &attacker)).await;
    assert!(
        matches!(
            loaded,
            Err(EnclaveError::Sealed(
                common::sealed::SealError::DigestMismatch
            ))
        ),
        "{loaded:?}"
    );
    assert_eq!(
        nsm.describe_pcr(16).unwrap().value,
        model_pcr16(&genuine_sha)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_enclave_can_retry_the_same_model_only() {
    let local = Local::new();
    let endpoint = start_kms(vec![local.root()]).await;
    // The policy first names another image: denied, but PCR16 is now locked to the model.
    let s = setup(&endpoint, "another-image", None).await;
    let nsm = local.nsm(IMAGE, |_| {});
    let (h, e) = run_pair(&s.kms, &s.sealed, nsm.clone()).await;
    denied(&h, &e);
    // The owner fixes the policy; the same enclave retries and succeeds.
    let policy = release_policy(IMAGE, &s.sha256);
    s.owner
        .put_key_policy()
        .key_id(&s.key_id)
        .policy_name("default")
        .policy(policy.to_string())
        .send()
        .await
        .unwrap();
    let (h, e) = run_pair(&s.kms, &s.sealed, nsm.clone()).await;
    assert_eq!(&e.unwrap().weights[..], &s.model[..]);
    h.unwrap();
    // Another model cannot follow on the same enclave.
    let other = setup(&endpoint, IMAGE, None).await;
    let (_, e) = run_pair(&other.kms, &other.sealed, nsm).await;
    assert!(
        matches!(e, Err(EnclaveError::ModelAlreadyMeasured)),
        "{e:?}"
    );
}

/// The KMS error code of an SDK result, or "succeeded".
fn outcome<T, E, R>(r: Result<T, aws_sdk_kms::error::SdkError<E, R>>) -> String
where
    E: aws_sdk_kms::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match r {
        Ok(_) => "succeeded".into(),
        Err(e) => host::kms::KmsFailure::from_sdk(&e).code,
    }
}

/// Everything a principal without an enclave could try, with the sealed header at hand, to
/// obtain the model's data key: Decrypt without a Recipient, a grant to itself, a rewritten
/// key policy, and ReEncrypt to a key of its own. Returns each attempt's outcome.
async fn key_theft_attempts(
    kms: &aws_sdk_kms::Client,
    me: &str,
    header: &SealedHeader,
) -> Vec<(&'static str, String)> {
    let context: std::collections::HashMap<_, _> = header.context.clone().into_iter().collect();
    let blob = Blob::new(header.wrapped_key.clone());
    let decrypt = kms
        .decrypt()
        .key_id(&header.key_id)
        .ciphertext_blob(blob.clone())
        .set_encryption_context(Some(context.clone()))
        .send()
        .await;
    let grant = kms
        .create_grant()
        .key_id(&header.key_id)
        .grantee_principal(me)
        .operations(aws_sdk_kms::types::GrantOperation::Decrypt)
        .send()
        .await;
    let anything = serde_json::json!({"Statement": [{"Effect": "Allow",
        "Principal": {"AWS": me}, "Action": "kms:*", "Resource": "*"}]});
    let policy = kms
        .put_key_policy()
        .key_id(&header.key_id)
        .policy_name("default")
        .policy(anything.to_string())
        .send()
        .await;
    // A key of its own (its account's default policy lets it use it), to re-encrypt into.
    let own = create_key(kms, None, false).await.arn.unwrap();
    let re_encrypt = kms
        .re_encrypt()
        .ciphertext_blob(blob)
        .set_source_encryption_context(Some(context))
        .destination_key_id(own)
        .send()
        .await;
    vec![
        ("Decrypt without Recipient", outcome(decrypt)),
        ("CreateGrant", outcome(grant)),
        ("PutKeyPolicy", outcome(policy)),
        ("ReEncrypt", outcome(re_encrypt)),
    ]
}

fn all_denied(who: &str, attempts: &[(&str, String)]) {
    for (what, code) in attempts {
        assert_eq!(code, "AccessDeniedException", "{who}: {what}");
    }
}

/// The key policy `host kms-policy` printed before key ownership was modelled: administration
/// (`kms:Create*`, `kms:Put*`) for the operator's account root, the attested release for the
/// parent role. Kept to show what the mock now catches.
fn former_policy(sha256: &[u8; 32]) -> String {
    let mut p = release_policy(IMAGE, sha256);
    let release = p["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == "DecryptOnlyForTheAttestedEnclave")
        .unwrap()
        .clone();
    p["Statement"] = serde_json::json!([
        { "Sid": "KeyAdministrationAndSealing", "Effect": "Allow",
          "Principal": { "AWS": "arn:aws:iam::222222222222:root" },
          "Action": ["kms:Create*", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*",
                     "kms:Update*", "kms:Revoke*", "kms:Disable*", "kms:Get*", "kms:Delete*",
                     "kms:Encrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext"],
          "Resource": "*" },
        release
    ]);
    p.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_former_policy_the_operator_unseals_the_model_through_a_grant() {
    // What issue 15 §1 found, shown against the mock: the key in the operator's account, the
    // former policy, and the operator's administrator with nothing but its own credentials.
    let local = Local::new();
    let endpoint = start_kms(vec![local.root()]).await;
    let admin = kms_client_as(&endpoint, identity::OPERATOR_ADMIN_KEY).await;
    let model = model_bytes(2 * MIN_CHUNK_SIZE as usize + 7, 200);
    let policy = former_policy(&common::sealed::sha256(&model));
    let key = create_key(&admin, Some(policy), false).await.key_id;
    let (sealed, _) = seal_model(&admin, &key, &tempdir("former"), &model).await;
    let bytes = std::fs::read(&sealed).unwrap();
    let (header, _) = SealedHeader::decode(&bytes).unwrap();
    // Without a grant, Decrypt needs the attestation; the operator grants itself Decrypt.
    let context: std::collections::HashMap<_, _> = header.context.clone().into_iter().collect();
    let unattested = || {
        admin
            .decrypt()
            .ciphertext_blob(Blob::new(header.wrapped_key.clone()))
            .set_encryption_context(Some(context.clone()))
            .send()
    };
    assert_eq!(outcome(unattested().await), "AccessDeniedException");
    admin
        .create_grant()
        .key_id(&header.key_id)
        .grantee_principal(identity::OPERATOR_ADMIN)
        .operations(aws_sdk_kms::types::GrantOperation::Decrypt)
        .send()
        .await
        .expect("kms:Create* includes CreateGrant");
    let mut plain = unattested()
        .await
        .expect("the grant lets the operator decrypt without attestation")
        .plaintext
        .unwrap()
        .into_inner();
    let data_key = DataKey::from_slice(&mut plain).unwrap();
    let weights = common::sealed::unseal(&data_key, &bytes, MAX_MODEL).unwrap();
    assert_eq!(&weights[..], &model[..], "the operator has the weights");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_generated_policy_only_the_attested_enclave_gets_the_data_key() {
    let local = Local::new();
    let endpoint = start_kms(vec![local.root()]).await;
    // The owner creates the key in its own account and seals (`setup`).
    let s = setup(&endpoint, IMAGE, None).await;
    let bytes = std::fs::read(&s.sealed).unwrap();
    let (header, _) = SealedHeader::decode(&bytes).unwrap();
    assert!(
        header.key_id.contains(":111111111111:key/"),
        "{}",
        header.key_id
    );
    // The parent role and another principal of the operator's account.
    all_denied(
        "parent role",
        &key_theft_attempts(&s.kms, identity::PARENT, &header).await,
    );
    let admin = kms_client_as(&endpoint, identity::OPERATOR_ADMIN_KEY).await;
    all_denied(
        "operator admin",
        &key_theft_attempts(&admin, identity::OPERATOR_ADMIN, &header).await,
    );
    // The same attempts through boto3, as an operator's scripts would make them.
    let case = serde_json::json!({
        "key_arn": header.key_id,
        "wrapped_key": base64::engine::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            &header.wrapped_key
        ),
        "context": header.context,
        "principals": {
            identity::PARENT_KEY: identity::PARENT,
            identity::OPERATOR_ADMIN_KEY: identity::OPERATOR_ADMIN,
        },
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/boto3_operator.py");
    let url = endpoint.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .arg(url)
            .arg(case.to_string())
            .output()
    })
    .await
    .unwrap()
    .expect("python3 (make test installs boto3)");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "boto3 operator:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // An access key nobody mapped is not a principal at all.
    let stranger = kms_client_as(&endpoint, "AKIDSTRANGER").await;
    assert_eq!(
        outcome(stranger.describe_key().key_id(&header.key_id).send().await),
        "UnrecognizedClientException"
    );
    // The owner seals but does not decrypt either.
    assert_eq!(
        outcome(
            s.owner
                .decrypt()
                .ciphertext_blob(Blob::new(header.wrapped_key.clone()))
                .set_encryption_context(Some(header.context.clone().into_iter().collect()))
                .send()
                .await
        ),
        "AccessDeniedException"
    );
    // And the attested enclave, through the parent role, still gets its key.
    let (h, e) = run_pair(&s.kms, &s.sealed, local.nsm(IMAGE, |_| {})).await;
    assert_eq!(&e.unwrap().weights[..], &s.model[..]);
    h.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_in_the_operators_account_gets_an_immutable_key() {
    let local = Local::new();
    let endpoint = start_kms(vec![local.root()]).await;
    let admin = kms_client_as(&endpoint, identity::OPERATOR_ADMIN_KEY).await;
    let model = model_bytes(2 * MIN_CHUNK_SIZE as usize + 9, 201);
    let sha256 = common::sealed::sha256(&model);
    let request = |immutable| PolicyRequest {
        measurements: tests::measurements(IMAGE),
        include: vec![],
        model_pcr16: Some(model_pcr16(&sha256)),
        owner_principal: identity::OPERATOR_ADMIN.into(),
        enclave_principal: identity::PARENT.into(),
        immutable,
    };
    assert!(matches!(
        generate(&request(false)),
        Err(host::policy::PolicyError::SharedAccount(_))
    ));
    let policy = generate(&request(true)).unwrap().to_string();
    // KMS's lockout check refuses a policy nobody can change, unless told it is meant.
    assert_eq!(
        outcome(admin.create_key().policy(&policy).send().await),
        "MalformedPolicyDocumentException"
    );
    let key = create_key(&admin, Some(policy), true).await.key_id;
    let (sealed, _) = seal_model(&admin, &key, &tempdir("immutable"), &model).await;
    let (header, _) = SealedHeader::decode(&std::fs::read(&sealed).unwrap()).unwrap();
    all_denied(
        "owner-administrator",
        &key_theft_attempts(&admin, identity::OPERATOR_ADMIN, &header).await,
    );
    let parent = kms_client_as(&endpoint, identity::PARENT_KEY).await;
    all_denied(
        "parent role",
        &key_theft_attempts(&parent, identity::PARENT, &header).await,
    );
    let (h, e) = run_pair(&parent, &sealed, local.nsm(IMAGE, |_| {})).await;
    assert_eq!(&e.unwrap().weights[..], &model[..]);
    h.unwrap();
}
