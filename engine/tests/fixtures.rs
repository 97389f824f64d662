//! The engine against llama.cpp on real models: token ids on the fixture texts (special tokens
//! included), and perplexity on a ~1,800-token text, for the default model (SmolLM2, `llama`,
//! the `smollm` pre-tokenizer), Qwen2.5-Coder-0.5B (`qwen2`, its own pre-tokenizer and
//! K-quants) and Gemma 3 270M (`gemma3`, SentencePiece, sliding-window attention). The fixtures were computed with llama.cpp by `tests/fixtures/make_fixtures.py`
//! (llama-cpp-python 0.3.36; `make fixtures`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{TestModel, GEMMA3, QWEN25, SMOLLM2};
use engine::gguf::Gguf;
use engine::kernels::Kernels;
use engine::model::{Chunk, Logits, Model, Scratch};
use engine::tokenizer::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    /// What llama.cpp detokenizes the ids to, control tokens not rendered.
    decoded: String,
}

#[derive(Deserialize)]
struct TokenizerFixture {
    cases: Vec<Case>,
}

fn token_ids(model: &TestModel) -> Vec<Vec<u32>> {
    let bytes = model.bytes();
    let t = Tokenizer::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap();
    let fx: TokenizerFixture = serde_json::from_str(&model.fixture("tokenizer.json")).unwrap();
    assert!(fx.cases.len() >= 10);
    for case in &fx.cases {
        // llama.cpp's ids were taken without BOS; ours carry it when the model asks for it.
        let ours = t.encode(&case.text).unwrap();
        let ours = match t.added_bos() {
            Some(bos) => {
                assert_eq!(ours.first(), Some(&bos));
                ours[1..].to_vec()
            }
            None => ours,
        };
        assert_eq!(ours, case.ids, "{}: text {:?}", model.fixtures, case.text);
        assert_eq!(t.decode(&case.ids), case.decoded, "{}", model.fixtures);
    }
    fx.cases.into_iter().map(|c| c.ids).collect()
}

#[test]
fn token_ids_equal_llama_cpp() {
    let smollm = token_ids(&SMOLLM2);
    assert_eq!(
        &smollm[0][..3],
        &[1, 9690, 198],
        "<|im_start|>system\\n, with no prefix space"
    );
    let qwen = token_ids(&QWEN25);
    // <|im_start|> is 151644 in Qwen's vocabulary, and digits are split one by one.
    assert_eq!(qwen[0][0], 151_644);
    // SentencePiece (Gemma 3's 262,144 pieces, byte fallback, no prefix space).
    let gemma = token_ids(&GEMMA3);
    assert_eq!(gemma[1], [9259, 1902], "Hello world");
}

#[derive(Deserialize)]
struct Perplexity {
    tokens: usize,
    perplexity: f64,
}

fn perplexity(model: &TestModel) {
    let bytes = model.bytes();
    let g = Gguf::parse(&bytes).unwrap();
    let tokenizer = Tokenizer::from_gguf(&g).unwrap();
    let ours = Model::load(
        zeroize::Zeroizing::new(bytes.clone()),
        &g,
        Kernels::detect(),
    )
    .unwrap();
    let reference: Perplexity = serde_json::from_str(&model.fixture("perplexity.json")).unwrap();
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/perplexity.txt"),
    )
    .unwrap();
    let ids = tokenizer.encode(&text).unwrap();
    assert_eq!(ids.len(), reference.tokens, "the same tokens as llama.cpp");

    let vocab = ours.config().n_vocab;
    let mut cache = ours.new_cache(ids.len());
    let mut scratch = Scratch::default();
    let mut nll = 0.0f64;
    for (c, chunk) in ids.chunks(128).enumerate() {
        let logits = ours
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
        "{}: perplexity {ppl:.4} vs llama.cpp {:.4} ({ratio:.4}×)",
        model.fixtures, reference.perplexity
    );
    assert!(
        (0.99..=1.01).contains(&ratio),
        "{}: perplexity {ppl} vs llama.cpp {}",
        model.fixtures,
        reference.perplexity
    );
}

#[test]
fn perplexity_is_within_one_percent_of_llama_cpp() {
    perplexity(&SMOLLM2);
    perplexity(&QWEN25);
    // Gemma 3: sliding-window layers (512 positions) over a text three times as long.
    perplexity(&GEMMA3);
}
