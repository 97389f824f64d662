//! Fuzzes everything the engine does with a GGUF file before serving it: the bounded pre-pass
//! and candle's parser, the tokenizer built from the metadata, the chat template, and the
//! model's shape and tensor-range checks. None of it may panic or allocate without bound.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = engine::gguf::Gguf::parse(data) else { return };
    let _ = engine::tokenizer::Tokenizer::from_gguf(&g);
    let _ = engine::template::ChatTemplate::from_gguf(&g);
    let _ = engine::model::Model::load(
        zeroize::Zeroizing::new(data.to_vec()),
        &g,
        engine::kernels::Kernels::detect(),
    );
});
