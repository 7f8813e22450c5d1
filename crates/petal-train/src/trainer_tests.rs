//! The training loop's own tests: fingerprints, clipping, and whole steps against AdamW
//! written out on the token-weighted gradient of each step's examples.

use super::*;
use crate::eval::batch_loss;
use candle_core::Device;
use petal_core::config::Targets;
use petal_core::{inject_adapter, Ctx};
use petal_data::batches;

#[test]
fn a_fingerprint_mismatch_names_the_settings_that_differ() {
    let a = r#"{"seed": 1, "lr": 0.001, "model": "m"}"#;
    let b = r#"{"seed": 2, "lr": 0.001, "model": "m", "pack": true}"#;
    assert_eq!(fingerprint_diff(a, b), "pack: null -> true; seed: 1 -> 2");
    let (abs, rel) = (
        concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        "Cargo.toml",
    );
    let fp = |p: &str| serde_json::json!({"data": p, "seed": 1}).to_string();
    assert_eq!(
        fingerprint_diff(&fp(abs), &fp(rel)),
        "",
        "one file, two paths"
    );
    assert!(fingerprint_diff(&fp(abs), &fp("src/lib.rs")).starts_with("data: "));
}

#[test]
fn clipping_scales_the_global_norm_down_to_the_limit_and_leaves_small_ones_alone() {
    let g = |v: &[f32]| Some(Tensor::new(v, &Device::Cpu).unwrap());
    let mut grads = vec![g(&[3.0, 0.0]), None, g(&[0.0, 4.0])];
    let norm = clip(&mut grads, Some(1.0)).unwrap();
    assert!((norm - 5.0).abs() < 1e-9);
    let after: f64 = grads
        .iter()
        .flatten()
        .map(|t| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .sum::<f64>()
        .sqrt();
    assert!((after - 5.0 / (5.0 + 1e-6)).abs() < 1e-6);
    let mut small = vec![g(&[0.3, 0.4])];
    assert!((clip(&mut small, Some(1.0)).unwrap() - 0.5).abs() < 1e-7);
    assert_eq!(
        small[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.3, 0.4]
    );
}

/// Three steps of `train` (two micro-batches a step, examples of different lengths with
/// unscored prompt tokens, clipping on, weight decay, a proximal term) equal torch's AdamW
/// written out in f64 on the gradient of each step's examples in one batch (their summed loss
/// over their scored tokens) plus μ (w - w0), clipped by the global norm: the token weighting
/// across micro-batches, the proximal pull, the clip and the update, in that order.
#[test]
fn steps_equal_adamw_written_out_on_the_clipped_token_weighted_gradient_of_each_step() {
    let mut m = crate::test_support::golden_llama();
    let targets = Targets::List(vec!["q_proj".into(), "v_proj".into()]);
    let mut c = AdapterConfig::for_method("lora", 2, 4.0, targets);
    c.set("init_lora_weights", false).unwrap();
    inject_adapter(&mut m, "default", &c, 5).unwrap();
    // 9 examples of 6 to 19 tokens, the first third of each unscored (a prompt)
    let data: Vec<Example> = (0..9u32)
        .map(|i| {
            let n = 6 + (i * 5) % 14;
            let ids: Vec<u32> = (0..n).map(|j| (i * 37 + j * 11) % 96).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(j, &x)| {
                    if 3 * j < n as usize {
                        petal_data::IGNORE
                    } else {
                        x as i64
                    }
                })
                .collect();
            Example {
                ids,
                labels,
                task: None,
            }
        })
        .collect();
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        optim: AdamWParams {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        },
        max_steps: 3,
        batch_size: 2,
        grad_accum: 2,
        max_grad_norm: Some(0.05),
        seed: 3,
        prox_mu: 0.5,
        ..crate::test_support::plain_config(out.path().to_path_buf())
    };
    let vars = adapter_vars(&m, "default");
    let start: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let summary = train(&m, &c, &data, &[], &cfg, None, &mut ()).unwrap();
    let trained: Vec<Vec<f32>> = vars.iter().map(|v| flat(v.as_tensor())).collect();

    // the same steps written out
    for (v, s) in vars.iter().zip(&start) {
        v.set(s).unwrap();
    }
    let (b1, b2, eps) = (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps);
    let (lr, wd) = (cfg.optim.lr, cfg.optim.weight_decay);
    let mut p: Vec<Vec<f64>> = start.iter().map(|t| widen(&flat(t))).collect();
    let mut mom: Vec<Vec<f64>> = p.iter().map(|x| vec![0.0; x.len()]).collect();
    let mut vel = mom.clone();
    let mut clipped = 0;
    for step in 0..cfg.max_steps {
        let chosen: Vec<Example> = (0..2)
            .flat_map(|j| micro_examples(&data, &cfg, step * 2 + j))
            .collect();
        let b = batches(&chosen, chosen.len(), 0).remove(0);
        let (sum, n) = batch_loss(&m, &b, &Ctx::train(0)).unwrap();
        let loss = (sum / n as f64).unwrap();
        let want = loss.to_scalar::<f32>().unwrap() as f64;
        let got = summary.losses[step];
        assert!(
            (got - want).abs() < 1e-5 * want,
            "step {step}: loss {got} vs {want}"
        );
        let g = loss.backward().unwrap();
        // FedProx's proximal term μ (w - w0) joins the gradient before the clip
        let grads: Vec<Vec<f64>> = vars
            .iter()
            .zip(p.iter().zip(&start))
            .map(|(v, (w, w0))| {
                let g = widen(&flat(g.get(v.as_tensor()).unwrap()));
                let w0 = widen(&flat(w0));
                g.iter()
                    .zip(w.iter().zip(&w0))
                    .map(|(g, (w, w0))| g + 0.5 * (w - w0))
                    .collect()
            })
            .collect();
        let norm = grads.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
        let coef = (0.05 / (norm + 1e-6)).min(1.0);
        clipped += usize::from(coef < 1.0);
        let t = (step + 1) as i32;
        for (k, g) in grads.iter().enumerate() {
            for (i, &gi) in g.iter().enumerate() {
                let gi = gi * coef;
                p[k][i] -= lr * wd * p[k][i];
                mom[k][i] = b1 * mom[k][i] + (1.0 - b1) * gi;
                vel[k][i] = b2 * vel[k][i] + (1.0 - b2) * gi * gi;
                let denom = (vel[k][i] / (1.0 - b2.powi(t))).sqrt() + eps;
                p[k][i] -= lr / (1.0 - b1.powi(t)) * mom[k][i] / denom;
            }
        }
        for (v, x) in vars.iter().zip(&p) {
            let x: Vec<f32> = x.iter().map(|&x| x as f32).collect();
            v.set(&Tensor::from_vec(x, v.as_tensor().shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    assert!(
        clipped > 0,
        "the clip never acted: raise the gradients or lower max_grad_norm"
    );
    for (k, (got, want)) in trained.iter().zip(&p).enumerate() {
        let s0 = flat(&start[k]);
        let moved = want.iter().zip(&s0).map(|(a, &b)| (a - b as f64).abs());
        let scale = moved.fold(0.0, f64::max);
        let err = got
            .iter()
            .zip(want)
            .map(|(&a, b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err < 1e-3 * scale,
            "tensor {k}: off by {err:e} of a move of {scale:e}"
        );
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&x| x as f64).collect()
}

/// Length grouping equals transformers' `get_length_grouped_indices` on the same permutation
/// (tools/golden/make_length_grouped.py: its `torch.randperm` given the permutation): ties, a
/// short last mega-batch, the longest example in a later mega-batch, a given multiplier.
#[test]
fn length_grouping_is_transformers_own_order() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden/length_grouped.json");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ints = |v: &serde_json::Value| -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    };
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let mut moved = 0;
    for c in cases {
        let (lengths, order) = (ints(&c["lengths"]), ints(&c["permutation"]));
        let bs = c["batch_size"].as_u64().unwrap() as usize;
        let mult = c["mega_batch_mult"].as_u64().map(|m| m as usize);
        let got = crate::trainer::length_grouped(&order, &lengths, bs, mult);
        assert_eq!(
            got,
            ints(&c["grouped"]),
            "{} examples, batch {bs}",
            lengths.len()
        );
        moved += usize::from(got[0] != order[0]);
    }
    assert!(moved > 0, "no case moved an example");
}

/// With `group_by_length` an epoch's micro-batches still hold every example once, and they are
/// padded to fewer tokens in all than the plain shuffle's.
#[test]
fn grouped_micro_batches_cover_the_epoch_with_less_padding() {
    let data: Vec<Example> = (0..64u32)
        .map(|i| {
            let n = 3 + (i * 37) % 60;
            Example {
                ids: vec![1; n as usize],
                labels: vec![1; n as usize],
                task: None,
            }
        })
        .collect();
    let out = tempfile::tempdir().unwrap();
    let cfg = |group| TrainConfig {
        batch_size: 4,
        group_by_length: group,
        ..crate::test_support::plain_config(out.path().to_path_buf())
    };
    let padded = |cfg: &TrainConfig| -> (usize, Vec<usize>) {
        let mut lens = Vec::new();
        let mut total = 0;
        for k in 0..16 {
            let b = micro_examples(&data, cfg, k);
            total += b.len() * b.iter().map(|e| e.ids.len()).max().unwrap();
            lens.extend(b.iter().map(|e| e.ids.len()));
        }
        lens.sort();
        (total, lens)
    };
    let (plain, mut all) = padded(&cfg(false));
    let (grouped, got) = padded(&cfg(true));
    all.sort();
    assert_eq!(got, all, "the grouped epoch holds every example once");
    assert!(grouped < plain, "padding {grouped} not below {plain}");
}
