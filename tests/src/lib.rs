//! Whole-stack integration tests in local mode: the mock NSM, `mock-kms` on loopback, the real
//! `aws-sdk-kms`, and the host and enclave talking over Unix sockets with the production
//! framing. The tests live in `tests/`; this library holds the set-up they share.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
