//! What petal-io's tests share.

#![allow(dead_code)] // each test binary uses some of these

use petal_data::tokenizer::BpeParts;
use std::path::PathBuf;

pub fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

/// A stand-in byte-level tokenizer for fixtures whose own is word-level (no GGUF form).
pub fn plain_bpe(vocab: usize) -> BpeParts {
    BpeParts {
        tokens: (0..vocab).map(|i| format!("w{i}")).collect(),
        merges: vec![],
        token_types: vec![1; vocab],
        bos_id: Some(1),
        eos_id: Some(2),
        add_bos: false,
        pre: "gpt2".into(),
        chat_template: None,
    }
}
