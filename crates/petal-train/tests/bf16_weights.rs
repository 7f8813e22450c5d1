//! Training over bf16 base weights (f32 activations, the AVX512-BF16 kernels where the CPU has
//! them, else candle's bf16 matmul) follows the f32 loss curve within bf16 rounding, on the
//! tiny golden Llama. Its own test binary: `petal_ops::set_fast` is process-wide.

use candle_core::{DType, Device};
use petal_core::config::Targets;
use petal_core::{inject_adapter, AdapterConfig};
use petal_data::Example;
use petal_train::optim::AdamWParams;
use petal_train::{train, Schedule, TrainConfig};
use std::path::PathBuf;

fn losses(dtype: DType, out: PathBuf) -> Vec<f64> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/llama");
    let mut m = petal_models::load_model(dir.to_str().unwrap(), dtype, &Device::Cpu)
        .unwrap()
        .model;
    let mut cfg = AdapterConfig::lora(4, 8.0, Targets::Regex("all-linear".into()));
    cfg.lora_dropout = 0.1;
    inject_adapter(&mut m, "default", &cfg, 3).unwrap();
    let data: Vec<Example> = (0..12u32)
        .map(|i| {
            let ids: Vec<u32> = (0..16).map(|j| (i * 31 + j * 7) % 96).collect();
            Example {
                labels: ids.iter().map(|&x| x as i64).collect(),
                ids,
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
        save_as_lora: false,
        grad_checkpointing: false,
    };
    train(&m, &cfg, &data, &[], &tc, None, &mut ())
        .unwrap()
        .losses
}

#[test]
fn training_over_bf16_base_weights_follows_the_f32_loss_curve_within_bf16_rounding() {
    let d = tempfile::tempdir().unwrap();
    let half = losses(DType::BF16, d.path().join("bf16"));
    let full = losses(DType::F32, d.path().join("f32"));
    assert!(half[5] < half[0], "the run must learn: {half:?}");
    for (i, (a, b)) in half.iter().zip(&full).enumerate() {
        // weights and matmul inputs rounded to 8 significant bits (~0.4% per value); the
        // rounding errors average out in the loss (seen: 3e-5 relative)
        assert!(
            (a - b).abs() < 2e-3 * b.abs(),
            "step {}: bf16 {a} vs f32 {b}",
            i + 1
        );
    }
    let moved = (full[0] - full[5]).abs();
    let apart = (half[5] - full[5]).abs();
    assert!(
        apart < 0.2 * moved,
        "bf16 drifts {apart} where training moved {moved}"
    );
}
