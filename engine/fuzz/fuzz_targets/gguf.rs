//! Fuzzes everything the engine does with a GGUF file before serving it: the bounded pre-pass
//! and candle's parser, the tokenizer built from the metadata (and its encoder, BPE or
//! SentencePiece, on text from the same input), the chat template, and the model's shape and
//! tensor-range checks and in-place repacking. None of it may panic or allocate without bound.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = engine::gguf::Gguf::parse(data) else { return };
    if let Ok(t) = engine::tokenizer::Tokenizer::from_gguf(&g) {
        let tail = data.get(data.len().saturating_sub(256)..).unwrap_or_default();
        let _ = t.encode(&String::from_utf8_lossy(tail));
        let _ = t.encode("a ab\u{2581}b <start_of_turn>A\n<0x41> 日本");
    }
    let _ = engine::template::ChatTemplate::from_gguf(&g);
    let _ = engine::model::Model::load(
        zeroize::Zeroizing::new(data.to_vec()),
        &g,
        engine::kernels::Kernels::detect(),
    );
});
