//! Unsealing throughput: AES-256-GCM decryption plus SHA-256 of the plaintext, pipelined on
//! two threads, into the final buffer. Target ≥ 1.2 GB/s on the 2-core development machine.
//! `cargo bench -p common --bench unseal`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use common::sealed::{
    seal, sha256, split_chunks, unseal, unseal_stream, DataKey, SealedHeader, Unsealer,
    CONTEXT_MODEL_NAME, DEFAULT_CHUNK_SIZE,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let size = 256 << 20;
    let model: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let key = || DataKey::from_slice(&mut [3u8; 32]).unwrap();
    let header = SealedHeader {
        chunk_size: DEFAULT_CHUNK_SIZE,
        plaintext_size: 0,
        plaintext_sha256: [0; 32],
        nonce_prefix: [1; 7],
        key_id: "bench".into(),
        wrapped_key: vec![0; 184],
        context: [(CONTEXT_MODEL_NAME.to_string(), "bench".to_string())].into(),
    };
    let sealed = seal(&key(), header, &model).unwrap();
    let k = key();
    let mut group = c.benchmark_group("unseal");
    group.throughput(Throughput::Bytes(size as u64));
    group.sample_size(10);
    group.bench_function("256 MiB, 1 MiB chunks (decrypt + SHA-256)", |b| {
        b.iter(|| unseal(&k, &sealed, u64::MAX).unwrap())
    });
    // The pipeline alone, into a buffer allocated (and paged in) once, as an enclave does.
    let (_, header_len) = SealedHeader::decode(&sealed).unwrap();
    let mut out = vec![0u8; size];
    group.bench_function("pipeline only, preallocated output", |b| {
        b.iter(|| {
            let mut u = Unsealer::new(&k, &sealed[..header_len]).unwrap();
            let chunks = split_chunks(u.header(), &sealed[header_len..]);
            unseal_stream(&mut u, chunks, &mut out).unwrap();
        })
    });
    group.bench_function("SHA-256 alone", |b| b.iter(|| sha256(&model)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
