//! Time from sealed bytes to a ready model, against loading the plaintext file, on the default
//! model (`make model`; `MODEL_PATH` points at the GGUF). Three measurements:
//! - plaintext: read the GGUF into memory (what loading does before parsing);
//! - sealed, in memory: read the sealed file, decrypt and verify it into its final buffer;
//! - sealed, provisioned: the enclave's whole path over a Unix socket with the production
//!   framing: PCR16, RSA-2048 key generation, attestation, the key envelope, streaming,
//!   decryption and SHA-256. KMS's network round trip is left out (a bench harness plays the
//!   host and wraps the data key itself).
//!
//! And the target's definition, a *ready model*: the same two paths ending with the model
//! loaded into the inference engine and serving (the `engine` crate: GGUF parsed, tokenizer and
//! chat template built, weights re-laid out, worker threads up), from the plaintext file on one
//! side and from the enclave's in-memory buffer on the other, as `enclave` does it
//! (`provision_with` and `engine::load`, `Ready` sent once loaded).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use common::nsm::mock::{ImageMeasurement, MockNsm, MockNsmConfig};
use common::sealed::{unseal, DataKey};
use common::wire::Message;
use criterion::{criterion_group, criterion_main, Criterion};
use std::path::PathBuf;
use std::sync::Arc;

const KEY: [u8; 32] = [0x24; 32];

/// Loads a GGUF into the inference engine, as the enclave does.
fn load(weights: zeroize::Zeroizing<Vec<u8>>) -> Result<engine::Engine, engine::Error> {
    engine::load(
        weights,
        engine::EngineConfig {
            threads: 2,
            ..Default::default()
        },
    )
}

fn key() -> DataKey {
    DataKey::from_slice(&mut KEY.clone()).unwrap()
}

async fn provision_once(
    nsm: Arc<MockNsm>,
    key: common::cms::RecipientKey,
    sealed: Arc<Vec<u8>>,
) -> enclave::provision::LoadedModel {
    let (mut h, mut e) = tokio::net::UnixStream::pair().unwrap();
    let enclave =
        tokio::spawn(async move { enclave::provision::provision(&mut e, nsm, 1 << 30, key).await });
    match tests::host_with_own_key(&mut h, &sealed, &KEY).await {
        Some(Message::Ready { .. }) => {}
        other => panic!("{other:?}"),
    }
    enclave.await.unwrap().unwrap()
}

/// Provisioning that ends with the engine loaded, then `Ready`.
async fn provision_ready(
    nsm: Arc<MockNsm>,
    key: common::cms::RecipientKey,
    sealed: Arc<Vec<u8>>,
) -> engine::Engine {
    let (mut h, mut e) = tokio::net::UnixStream::pair().unwrap();
    let enclave = tokio::spawn(async move {
        enclave::provision::provision_with(&mut e, nsm, 1 << 30, key, |m| load(m.weights)).await
    });
    match tests::host_with_own_key(&mut h, &sealed, &KEY).await {
        Some(Message::Ready { .. }) => {}
        other => panic!("{other:?}"),
    }
    enclave.await.unwrap().unwrap()
}

fn bench(c: &mut Criterion) {
    let Ok(path) = std::env::var("MODEL_PATH").map(PathBuf::from) else {
        eprintln!("MODEL_PATH is not set: run `make bench` (it fetches the default model)");
        return;
    };
    let plain = std::fs::read(&path).expect("MODEL_PATH");
    let sealed = tests::seal_with_own_key(&plain, &KEY);
    let dir = std::env::temp_dir().join(format!("ready-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sealed_path = dir.join("model.sealed");
    std::fs::write(&sealed_path, &sealed).unwrap();
    let ca = common::mock_ca::MockCa::load_or_create(&dir.join("ca")).unwrap();
    let _ = ca;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sealed = Arc::new(sealed);

    let mut g = c.benchmark_group(format!("ready ({} MB model)", plain.len() / 1_000_000));
    g.sample_size(10);
    // Each routine returns its buffer so that freeing (and, for the weights, zeroizing) it
    // happens outside the timing: a ready model is kept, not dropped.
    let batched = criterion::BatchSize::PerIteration;
    g.bench_function("plaintext: read the file", |b| {
        b.iter_batched(|| (), |()| std::fs::read(&path).unwrap(), batched)
    });
    g.bench_function("sealed: read + decrypt + SHA-256 in memory", |b| {
        b.iter_batched(
            || (),
            |()| unseal(&key(), &std::fs::read(&sealed_path).unwrap(), u64::MAX).unwrap(),
            batched,
        )
    });
    // The enclave is up: its NSM is open and its recipient key made while it waited for the
    // host. Untimed setup of the provisioning benchmarks.
    let booted_enclave = || {
        let ca = common::mock_ca::MockCa::load(&dir.join("ca")).unwrap();
        let config = MockNsmConfig::new(ImageMeasurement::from_label("bench"));
        let nsm = Arc::new(MockNsm::new(ca, config).unwrap());
        (nsm, common::cms::RecipientKey::generate().unwrap())
    };
    g.bench_function(
        "sealed: full enclave provisioning over a Unix socket",
        |b| {
            b.iter_batched(
                booted_enclave,
                |(nsm, key)| rt.block_on(provision_once(nsm, key, sealed.clone())),
                criterion::BatchSize::PerIteration,
            )
        },
    );
    // Ready models: loaded into the engine.
    g.bench_function("ready model: plaintext file -> engine", |b| {
        b.iter_batched(
            || (),
            |()| load(zeroize::Zeroizing::new(std::fs::read(&path).unwrap())).unwrap(),
            batched,
        )
    });
    g.bench_function("ready model: sealed, provisioned -> engine", |b| {
        b.iter_batched(
            booted_enclave,
            |(nsm, key)| rt.block_on(provision_ready(nsm, key, sealed.clone())),
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
