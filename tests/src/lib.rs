//! Whole-stack integration tests in local mode: the mock NSM, `mock-kms` on loopback, the real
//! `aws-sdk-kms`, and the host and enclave talking over Unix sockets with the production
//! framing. The tests live in `tests/`; this library holds the set-up they share.

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestation_verifier::TrustAnchor;
use common::mock_ca::MockCa;
use common::nsm::mock::{ImageMeasurement, MockNsm, MockNsmConfig};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// A fresh directory under the system temp dir.
pub fn tempdir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "it-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The image label of the local mock enclave.
pub const IMAGE: &str = "integration-enclave";

/// A mock CA, and mock NSMs under it.
pub struct Local {
    /// The CA directory.
    pub ca_dir: PathBuf,
}

impl Local {
    /// A new CA.
    pub fn new() -> Self {
        let ca_dir = tempdir("ca").join("ca");
        MockCa::load_or_create(&ca_dir).unwrap();
        Self { ca_dir }
    }

    /// The CA's root, as a trust anchor.
    pub fn root(&self) -> TrustAnchor {
        TrustAnchor::from_der(MockCa::load(&self.ca_dir).unwrap().root_der()).unwrap()
    }

    /// A mock NSM running `image`, configured by `edit`.
    pub fn nsm(&self, image: &str, edit: impl FnOnce(&mut MockNsmConfig)) -> Arc<MockNsm> {
        let mut config = MockNsmConfig::new(ImageMeasurement::from_label(image));
        edit(&mut config);
        Arc::new(MockNsm::new(MockCa::load(&self.ca_dir).unwrap(), config).unwrap())
    }
}

impl Default for Local {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts mock-kms on loopback, trusting `roots` besides AWS's; returns its endpoint URL.
pub async fn start_kms(roots: Vec<TrustAnchor>) -> String {
    let state = tempdir("kms");
    let kms = Arc::new(mock_kms::Kms::open(&state, roots, "us-east-1").unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(mock_kms::serve(listener, kms, std::future::pending()));
    url
}

/// A real `aws-sdk-kms` client for `endpoint`, with static test credentials.
pub async fn kms_client(endpoint: &str) -> aws_sdk_kms::Client {
    host::kms::client(&host::kms::KmsOptions {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint.into()),
        static_credentials: Some(("AKIDLOCALTEST".into(), "local-test-secret".into())),
    })
    .await
}

/// Plays a host that wraps the data key itself instead of asking KMS: it sends the sealed
/// header, encrypts `data_key` to the public key in the enclave's attestation document (CMS
/// is unsigned, so any host can), streams the chunks, and returns the enclave's last word
/// (`Ready` or `Failed`), or `None` if the enclave hung up first. A malicious host in the
/// tests; a KMS-free harness in the benchmarks.
pub async fn host_with_own_key(
    conn: &mut tokio::net::UnixStream,
    sealed: &[u8],
    data_key: &[u8; 32],
) -> Option<common::wire::Message> {
    use common::sealed::{split_chunks, SealedHeader};
    use common::wire::io::{handshake, read_frame, write_frame, write_raw};
    use common::wire::{Message, MessageType, DEFAULT_MAX_PAYLOAD};
    use tokio::io::AsyncWriteExt;

    let (header, header_len) = SealedHeader::decode(sealed).unwrap();
    handshake(conn).await.unwrap();
    write_frame(conn, &Message::SealedHeader(sealed[..header_len].to_vec()))
        .await
        .unwrap();
    let doc = match read_frame(conn, DEFAULT_MAX_PAYLOAD).await.unwrap() {
        Message::KeyReleaseRequest { attestation } => attestation,
        other => return Some(other),
    };
    let public_key = attestation_verifier::UnverifiedDocument::parse(&doc)
        .unwrap()
        .unverified()
        .public_key
        .clone()
        .unwrap();
    let envelope = common::cms::envelope_for_recipient(&public_key, data_key).unwrap();
    write_frame(
        conn,
        &Message::KeyReleaseResponse {
            ciphertext_for_recipient: envelope,
        },
    )
    .await
    .unwrap();
    for chunk in split_chunks(&header, &sealed[header_len..]) {
        if write_raw(conn, MessageType::Chunk, chunk).await.is_err() {
            break; // the enclave stopped reading: it refused
        }
    }
    let _ = conn.flush().await;
    read_frame(conn, DEFAULT_MAX_PAYLOAD).await.ok()
}

/// `plain` sealed under `data_key` (as `host seal` would, without KMS), for tests and benches
/// that play the host with their own key (`host_with_own_key`).
pub fn seal_with_own_key(plain: &[u8], data_key: &[u8; 32]) -> Vec<u8> {
    use common::sealed::{seal, DataKey, SealedHeader, CONTEXT_MODEL_NAME, DEFAULT_CHUNK_SIZE};
    let header = SealedHeader {
        chunk_size: DEFAULT_CHUNK_SIZE,
        plaintext_size: 0,
        plaintext_sha256: [0; 32],
        nonce_prefix: [3; 7],
        key_id: "own-key".into(),
        wrapped_key: vec![0; 184],
        context: [(CONTEXT_MODEL_NAME.to_string(), "smollm2".to_string())].into(),
    };
    seal(
        &DataKey::from_slice(&mut data_key.to_owned()).unwrap(),
        header,
        plain,
    )
    .unwrap()
}
