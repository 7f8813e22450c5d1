//! What the unit tests share: the tiny golden Llama and a plain training config.

use crate::{Schedule, TrainConfig};
use candle_core::{DType, Device};
use petal_models::Llama;

/// The tiny golden Llama of tests/fixtures/golden (made by transformers), in f32.
pub fn golden_llama() -> Llama {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden/llama");
    petal_io::load_model(dir.to_str().unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
        .model
}

/// A constant learning rate with no warm-up, clipping, evaluation, saving or proximal term,
/// adapter `default`, writing to `out_dir`; tests set the fields they vary.
pub fn plain_config(out_dir: std::path::PathBuf) -> TrainConfig {
    TrainConfig {
        optim: Default::default(),
        schedule: Schedule::Constant,
        warmup_steps: 0,
        max_steps: 1,
        batch_size: 1,
        grad_accum: 1,
        max_grad_norm: None,
        seed: 0,
        eval_every: 0,
        save_every: 0,
        out_dir,
        adapter_name: "default".into(),
        pad_id: 0,
        fingerprint: String::new(),
        save_converted: false,
        grad_checkpointing: false,
        balanced_tasks: false,
        group_by_length: false,
        prox_mu: 0.0,
        group: Default::default(),
    }
}
