//! The loss sends only scored rows through the output head. Its value and its gradients must
//! equal cross-entropy taken by hand over the model's full logits, where unscored prompt
//! tokens and padding are masked out after the head. Covered: the fused head, the composed
//! head (a LoRA on lm_head), and a batch whose every row is scored.

use candle_core::{DType, Device, Tensor, Var, D};
use petal_core::config::Targets;
use petal_core::{inject_adapter, AdapterConfig, Ctx};
use petal_data::{Batch, IGNORE};
use std::path::PathBuf;

fn model(targets: &[&str]) -> petal_models::Llama {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/llama");
    let mut m = petal_io::load_model(dir.to_str().unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let t = Targets::List(targets.iter().map(|s| s.to_string()).collect());
    let mut c = AdapterConfig::for_method("lora", 2, 4.0, t);
    c.set("init_lora_weights", false).unwrap();
    inject_adapter(&mut m, "default", &c, 7).unwrap();
    m
}

/// Two rows of 9: the first scores its last 4 tokens, the second its last 2 and then 3 pads.
fn batch(all_scored: bool) -> Batch {
    let ids: Vec<u32> = (0..18u32).map(|i| (i * 29 + 3) % 96).collect();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let (r, j) = (i / 9, i % 9);
            let scored = all_scored || (r == 0 && j >= 5) || (r == 1 && (4..6).contains(&j));
            if scored {
                x as i64
            } else {
                IGNORE
            }
        })
        .collect();
    Batch {
        ids,
        labels,
        rows: 2,
        len: 9,
    }
}

/// Summed cross-entropy by hand: log-softmax over every position's logits, then the label's
/// entry kept where the next token is scored; and the number of scored tokens.
fn by_hand(m: &petal_models::Llama, b: &Batch) -> (Tensor, usize) {
    let ids = Tensor::from_vec(b.ids.clone(), (b.rows, b.len), &Device::Cpu).unwrap();
    let logits = m.forward(&ids, None, &Ctx::eval()).unwrap(); // (rows, len, V)
    let v = logits.dim(D::Minus1).unwrap();
    let logp = petal_ops::testing::log_softmax(&logits.narrow(1, 0, b.len - 1).unwrap());
    let mut pick = vec![0f32; b.rows * (b.len - 1) * v];
    let mut count = 0;
    for r in 0..b.rows {
        for i in 0..b.len - 1 {
            let y = b.labels[r * b.len + i + 1];
            if y != IGNORE {
                pick[(r * (b.len - 1) + i) * v + y as usize] = 1.0;
                count += 1;
            }
        }
    }
    let pick = Tensor::from_vec(pick, (b.rows, b.len - 1, v), &Device::Cpu).unwrap();
    let loss = (logp * pick).unwrap().sum_all().unwrap().neg().unwrap();
    (loss, count)
}

fn check(targets: &[&str], all_scored: bool) {
    let m = model(targets);
    let b = batch(all_scored);
    let vars: Vec<Var> = petal_core::inject::adapter_vars(&m, "default");
    assert!(!vars.is_empty());
    let (got, n) = petal_train::batch_loss(&m, &b, &Ctx::eval()).unwrap();
    let (want, count) = by_hand(&m, &b);
    assert_eq!(n, count);
    assert_eq!(count, if all_scored { 16 } else { 6 });
    let (g, w) = (
        got.to_scalar::<f32>().unwrap(),
        want.to_scalar::<f32>().unwrap(),
    );
    assert!((g - w).abs() < 1e-5 * w.abs(), "loss {g} vs {w}");
    let (gg, gw) = (got.backward().unwrap(), want.backward().unwrap());
    // the largest difference of a gradient from the reference's, and the reference's largest
    let off = |a: &Tensor, v: &Var| {
        let e = gw.get(v.as_tensor()).unwrap().flatten_all().unwrap();
        let largest = |t: Tensor| t.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        (
            largest((a.flatten_all().unwrap() - &e).unwrap()),
            largest(e),
        )
    };
    let mut lm_head_seen = false;
    for v in &vars {
        let (diff, scale) = off(gg.get(v.as_tensor()).unwrap(), v);
        assert!(scale > 0.0, "a zero gradient checks nothing");
        assert!(
            diff <= 1e-4 * scale,
            "gradient off by {diff} (largest {scale})"
        );
        lm_head_seen |= v.dims().contains(&96); // the vocabulary: only lm_head's B has it
    }
    assert_eq!(lm_head_seen, targets.contains(&"lm_head"));
    // the same gradients through a training step's path, with and without checkpointing
    for checkpointing in [false, true] {
        let (sum, g) = petal_train::backward_batch(&m, &b, 1.0, checkpointing, 0).unwrap();
        assert!(
            (sum as f32 - w).abs() < 1e-5 * w.abs(),
            "loss, checkpointing {checkpointing}"
        );
        for v in &vars {
            let (diff, scale) = off(g.get(v.as_tensor()).unwrap(), v);
            assert!(
                diff <= 1e-4 * scale,
                "checkpointing {checkpointing}: off by {diff}"
            );
        }
    }
}

#[test]
fn the_fused_head_scores_only_the_scored_rows() {
    check(&["q_proj", "v_proj"], false);
}

#[test]
fn an_adapted_head_scores_only_the_scored_rows() {
    check(&["q_proj", "lm_head"], false);
}

#[test]
fn a_batch_whose_every_token_is_scored() {
    check(&["q_proj", "v_proj"], true);
}
