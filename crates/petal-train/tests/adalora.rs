//! AdaLoRA through the training loop on the tiny golden Llama: the rank allocator reaches the
//! target budget, the saved adapter is cut to the kept ranks and reloads to the trained model's
//! logits, and a resumed run replays the losses (allocator state included).

use candle_core::{DType, Device, Tensor};
use petal_core::config::{RankValue, Targets};
use petal_core::methods::adalora::{AdaLoraOptions, RankAllocator};
use petal_core::{inject_adapter, AdapterConfig};
use petal_data::Example;
use petal_models::Llama;
use petal_train::optim::AdamWParams;
use petal_train::{train, Schedule, TrainConfig};
use std::path::{Path, PathBuf};

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/llama")
}

fn model() -> Llama {
    petal_io::load_model(golden().to_str().unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
        .model
}

fn cfg() -> AdapterConfig {
    let mut c = AdapterConfig::for_method(
        "ADALORA",
        4,
        8.0,
        Targets::List(vec!["q_proj".into(), "v_proj".into(), "up_proj".into()]),
    );
    for (k, v) in [
        ("target_r", 2),
        ("tinit", 1),
        ("tfinal", 2),
        ("deltaT", 1),
        ("total_step", 8),
    ] {
        c.set(k, v).unwrap();
    }
    c
}

fn data() -> Vec<Example> {
    (0..12u32)
        .map(|i| {
            let ids: Vec<u32> = (0..16).map(|j| (i * 31 + j * 7) % 96).collect();
            Example {
                labels: ids.iter().map(|&x| x as i64).collect(),
                ids,
                task: None,
            }
        })
        .collect()
}

fn config(out: &Path, save_every: usize) -> TrainConfig {
    TrainConfig {
        optim: AdamWParams {
            lr: 2e-2,
            ..Default::default()
        },
        schedule: Schedule::Constant,
        warmup_steps: 0,
        max_steps: 8,
        batch_size: 3,
        grad_accum: 1,
        max_grad_norm: Some(1.0),
        seed: 1,
        eval_every: 0,
        save_every,
        out_dir: out.to_path_buf(),
        adapter_name: "default".into(),
        pad_id: 0,
        fingerprint: "adalora".into(),
        save_converted: false,
        grad_checkpointing: false,
        balanced_tasks: false,
        group_by_length: false,
        prox_mu: 0.0,
        group: Default::default(),
    }
}

fn ids() -> Tensor {
    Tensor::new(&[[1u32, 5, 9, 14, 20, 33, 2, 71]], &Device::Cpu).unwrap()
}

#[test]
fn the_budget_schedule_follows_peft_cubic_decay_between_tinit_and_tfinal() {
    let mut m = model();
    inject_adapter(&mut m, "default", &cfg(), 3).unwrap();
    let a = RankAllocator::new(&m, "default", &cfg()).unwrap().unwrap();
    // 6 layers x init_r 4 = 24 down to 6 x target_r 2 = 12; cubic over steps 1..6
    let want = |step: usize| -> usize {
        let mul = 1.0 - (step as f64 - 1.0) / (8.0 - 2.0 - 1.0);
        ((24.0 - 12.0) * mul.powi(3) + 12.0) as usize
    };
    assert_eq!(a.budget(0), (24, false));
    assert_eq!(a.budget(1), (24, false));
    for step in 2..=6 {
        assert_eq!(a.budget(step), (want(step), true), "step {step}");
    }
    assert_eq!(a.budget(7), (12, true));
}

#[test]
fn adalora_training_reaches_the_target_budget_and_saves_cut_to_the_kept_ranks() {
    let d = tempfile::tempdir().unwrap();
    let mut m = model();
    inject_adapter(&mut m, "default", &cfg(), 3).unwrap();
    let before = petal_train::evaluate(&m, &data(), 3, 0).unwrap().loss;
    let s = train(
        &m,
        &cfg(),
        &data(),
        &[],
        &config(d.path(), 0),
        None,
        &mut (),
    )
    .unwrap();
    let after = petal_train::evaluate(&m, &data(), 3, 0).unwrap().loss;
    assert!(after < before, "the run must learn: {before} -> {after}");
    let (saved, tensors) = petal_io::load_adapter(&s.adapter_dir, &Device::Cpu).unwrap();
    let pattern = saved.options::<AdaLoraOptions>().unwrap().core.rank_pattern;
    let kept: usize = pattern.values().map(RankValue::rank).sum();
    assert_eq!(pattern.len(), 6);
    assert_eq!(kept, 12, "the final budget is target_r per layer");
    let e_rows: usize = tensors
        .iter()
        .filter(|(k, _)| k.ends_with("lora_E"))
        .map(|(_, t)| t.dim(0).unwrap())
        .sum();
    assert_eq!(e_rows, 12, "tensors are cut to the kept ranks");
    // the cut adapter, reloaded (ranknum kept at init_r), gives the trained model's logits
    let mut fresh = model();
    petal_io::attach_adapter(&mut fresh, &s.adapter_dir, "default").unwrap();
    let (a, b) = (
        m.forward(&ids(), None, &petal_core::Ctx::eval()).unwrap(),
        fresh
            .forward(&ids(), None, &petal_core::Ctx::eval())
            .unwrap(),
    );
    let e = petal_ops::testing::max_rel(&b, &a);
    assert!(e < 1e-5, "reloaded logits differ by {e}");
}

#[test]
fn a_resumed_adalora_run_replays_the_losses_with_the_allocator_state() {
    let d = tempfile::tempdir().unwrap();
    let mut m = model();
    inject_adapter(&mut m, "default", &cfg(), 3).unwrap();
    let full = train(
        &m,
        &cfg(),
        &data(),
        &[],
        &config(&d.path().join("a"), 4),
        None,
        &mut (),
    )
    .unwrap()
    .losses;
    let mut m2 = model();
    inject_adapter(&mut m2, "default", &cfg(), 3).unwrap();
    let ck = d.path().join("a/checkpoints/step-000004");
    let out_b = d.path().join("b");
    std::fs::create_dir_all(&out_b).unwrap();
    let resumed = train(
        &m2,
        &cfg(),
        &data(),
        &[],
        &config(&out_b, 4),
        Some(&ck),
        &mut (),
    )
    .unwrap()
    .losses;
    for (i, (a, b)) in full[4..].iter().zip(&resumed).enumerate() {
        assert!((a - b).abs() < 1e-6 * a.abs(), "step {}: {a} vs {b}", i + 5);
    }
}
