//! `host serve` in front of the real enclave listener in local mode, on the default model:
//! the relay provisions the enclave through mock-kms at start, serves attestation documents
//! that verify against the mock CA with the client's nonce and the model in PCR16, and
//! re-provisions by itself when the enclave restarts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestation_verifier::{verify, Policy, UnixTime};
use common::transport::Endpoint;
use host::serve::config::ServeConfig;
use std::net::SocketAddr;
use std::time::Duration;
use tests::http::request;
use tests::stack::{enclave_config, RunningEnclave};
use tests::{default_model, seal_for_image, start_kms, tempdir, Local, IMAGE};

async fn wait_ready(addr: SocketAddr, want: bool) {
    tests::http::wait_ready(addr, want, Duration::from_secs(60)).await;
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_provisions_attests_and_reprovisions_the_real_enclave() {
    let local = Local::new();
    let kms_url = start_kms(vec![local.root()]).await;
    let (kms, sealed, sha256) = seal_for_image(&kms_url, IMAGE, &default_model()).await;
    let endpoint = Endpoint::Unix(tempdir("relay-enclave").join("enclave.sock"));
    let enclave = RunningEnclave::start(&local, &endpoint, enclave_config());
    let cfg = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        enclave: endpoint.to_string(),
        sealed: Some(sealed),
        ping_interval_ms: 200,
        max_backoff_ms: 300,
        ..Default::default()
    };
    let relay = host::serve::start(cfg, Some(kms)).await.unwrap();
    let addr = relay.local_addr;
    wait_ready(addr, true).await;

    // A fresh document with the client's nonce, from the measured image with the model in
    // PCR16, chaining to the local mock CA.
    let nonce = [0x5a; 32];
    let doc = request(
        addr,
        "GET",
        &format!("/v1/attestation?nonce={}", hex(&nonce)),
        None,
        b"",
    )
    .await;
    assert_eq!(doc.status, 200, "{}", doc.text());
    let measured = common::nsm::mock::ImageMeasurement::from_label(IMAGE);
    let policy = Policy {
        pcrs: [
            (0, measured.pcr0),
            (1, measured.pcr1),
            (2, measured.pcr2),
            (16, common::sealed::model_pcr16(&sha256)),
        ]
        .into(),
        allow_debug: false,
        max_age: Some(Duration::from_secs(60)),
        max_clock_skew: Duration::from_secs(60),
        nonce: Some(nonce.to_vec()),
        public_key: None,
        user_data: None,
    };
    verify(&doc.body, &[local.root()], UnixTime::now(), &policy).unwrap();

    // The document attests the gateway's key; a body that is not encapsulated to it is
    // refused by the enclave (400), never answered.
    assert!(verify(&doc.body, &[local.root()], UnixTime::now(), &policy)
        .unwrap()
        .public_key()
        .is_some());
    let refused = request(
        addr,
        "POST",
        "/v1/ohttp",
        Some("message/ohttp-chunked-req"),
        b"x",
    )
    .await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(
        refused.text().contains("enclave_refused"),
        "{}",
        refused.text()
    );

    // The enclave restarts (fresh NSM, nothing loaded): the relay notices, says not ready,
    // and provisions it again by itself.
    enclave.stop();
    wait_ready(addr, false).await;
    let enclave = RunningEnclave::start(&local, &endpoint, enclave_config());
    wait_ready(addr, true).await;
    let m = request(relay.admin_addr, "GET", "/metrics", None, b"")
        .await
        .text();
    assert_eq!(
        metric(&m, "relay_provisioning_total{result=\"ok\"}"),
        2,
        "{m}"
    );
    assert!(metric(&m, "relay_enclave_connects_total") >= 2);
    let again = request(addr, "GET", "/v1/attestation?nonce=01", None, b"").await;
    assert_eq!(again.status, 200);
    relay.shutdown().await;
    enclave.stop();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
