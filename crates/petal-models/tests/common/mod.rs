//! What the golden-fixture tests share: the fixture folder and its tiny models.

use candle_core::{DType, Device};
use petal_io::load_model;
use petal_models::Llama;
use std::path::PathBuf;

/// tests/fixtures/golden (made by tools/golden/make_fixtures.py).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

/// The tiny golden model `name` (llama, qwen2, mistral) in f32 on the CPU.
pub fn model(name: &str) -> Llama {
    load_model(
        root().join(name).to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .model
}
