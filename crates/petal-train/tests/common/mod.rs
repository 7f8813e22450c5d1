//! The short LoRA training run the loss-curve tests share: the tiny golden Llama loaded in
//! `dtype`, rank 4 on all linear layers (with dropout unless asked otherwise), 6 steps; returns
//! the per-step losses.
#![allow(dead_code)] // each test binary uses part of it

use candle_core::{DType, Device};
use petal_core::config::Targets;
use petal_core::{inject_adapter, AdapterConfig};
use petal_data::Example;
use petal_train::optim::AdamWParams;
use petal_train::{train, Schedule, TrainConfig};
use std::path::PathBuf;

pub fn tiny_llama_losses(dtype: DType, out: PathBuf) -> Vec<f64> {
    tiny_llama_losses_with(dtype, 0.1, out)
}

/// The same run with LoRA dropout `dropout` (0 takes the one-node fused LoRA op).
pub fn tiny_llama_losses_with(
    dtype: impl Into<petal_models::Precision>,
    dropout: f64,
    out: PathBuf,
) -> Vec<f64> {
    let m = petal_io::load_model(tiny_llama().to_str().unwrap(), dtype, &Device::Cpu)
        .unwrap()
        .model;
    lora_losses(m, dropout, out)
}

/// The tiny golden Llama's HF folder.
pub fn tiny_llama() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/llama")
}

/// The run on a model already loaded.
pub fn lora_losses(m: petal_models::Llama, dropout: f64, out: PathBuf) -> Vec<f64> {
    losses_with(m, dropout, false, out)
}

/// `lora_losses`, with DoRA when `dora`.
pub fn losses_with(mut m: petal_models::Llama, dropout: f64, dora: bool, out: PathBuf) -> Vec<f64> {
    let mut cfg = AdapterConfig::lora(4, 8.0, Targets::Regex("all-linear".into()));
    cfg.set("lora_dropout", dropout).unwrap();
    cfg.set("use_dora", dora).unwrap();
    inject_adapter(&mut m, "default", &cfg, 3).unwrap();
    let data: Vec<Example> = (0..12u32)
        .map(|i| {
            let ids: Vec<u32> = (0..16).map(|j| (i * 31 + j * 7) % 96).collect();
            Example {
                labels: ids.iter().map(|&x| x as i64).collect(),
                ids,
                task: None,
            }
        })
        .collect();
    let tc = TrainConfig {
        optim: AdamWParams {
            lr: 5e-3,
            ..Default::default()
        },
        schedule: Schedule::Cosine,
        warmup_steps: 1,
        max_steps: 6,
        batch_size: 3,
        grad_accum: 2,
        max_grad_norm: Some(1.0),
        seed: 1,
        eval_every: 0,
        save_every: 0,
        out_dir: out,
        adapter_name: "default".into(),
        pad_id: 0,
        fingerprint: "t".into(),
        save_converted: false,
        grad_checkpointing: false,
        balanced_tasks: false,
        group_by_length: false,
        prox_mu: 0.0,
        group: Default::default(),
    };
    train(&m, &cfg, &data, &[], &tc, None, &mut ())
        .unwrap()
        .losses
}
