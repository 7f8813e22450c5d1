//! LoftQ and MiCA against tools/golden/make_lora_inits.py: bitsandbytes' quantizers and PEFT's
//! SVD in PEFT's LoftQ loop (run on the CPU), and PEFT's own MiCA.

use super::*;
use crate::adapter::AdapterMethod;
use crate::config::{AdapterConfig, Targets};
use crate::methods::lora::Lora;
use candle_core::Device;
use std::collections::HashMap;

fn golden() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/golden/lora_inits.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

const WEIGHTS: [&str; 3] = ["tall", "wide", "odd"];

fn config(init: &str, extra: &[(&str, serde_json::Value)]) -> AdapterConfig {
    let mut c = AdapterConfig::lora(4, 4.0, Targets::List(vec!["x".into()]));
    c.options.insert("init_lora_weights".into(), init.into());
    for (k, v) in extra {
        c.options.insert(k.to_string(), v.clone());
    }
    c
}

fn build(cfg: &AdapterConfig, w: &Tensor) -> Result<Box<dyn crate::AdapterLayer>> {
    Lora.validate(cfg)?;
    crate::testing::build_on(&Lora, cfg, w, "x", 0)
}

#[test]
fn loftq_base_and_low_rank_part_are_those_of_peft_s_loop_over_bitsandbytes() {
    let g = golden();
    for name in WEIGHTS {
        let w = &g[&format!("{name}.weight")];
        let n = w.elem_count();
        for (bits, iters) in [(4, 1), (4, 3), (8, 1), (8, 2)] {
            let key = format!("{name}.loftq{bits}_{iters}");
            let (a, b, q) = loftq_init(w, 4, (bits, iters), "x").unwrap();
            // the base: bitsandbytes' values, bit for bit after the first step; after it W - L R
            // goes through an SVD in f64 here and f32 there: a block's scale may move by an ulp
            // and a value within rounding of a code's boundary may land on the neighbouring code
            let (want, got) = (vec(&g[&format!("{key}.base")]), vec(&q));
            let big = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let ulps = if iters == 1 { 0.0 } else { 1e-6 * big };
            let off = want
                .iter()
                .zip(&got)
                .filter(|(x, y)| (*x - *y).abs() > ulps)
                .count();
            let allowed = if iters == 1 { 0 } else { n / 500 };
            assert!(off <= allowed, "{key}: {off} of {n} base values differ");
            // B A = L R: the product does not depend on the singular vectors' signs
            let ba = vec(&b.matmul(&a).unwrap());
            let lr = vec(&g[&format!("{key}.lora_B")]
                .matmul(&g[&format!("{key}.lora_A")])
                .unwrap());
            let scale = lr.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = ba
                .iter()
                .zip(&lr)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            let tol = if off == 0 { 1e-5 } else { 1e-2 };
            assert!(
                diff <= tol * scale,
                "{key}: B A off by {diff} (max {scale})"
            );
            // and LoftQ's point: Q + B A is nearer W than Q alone
            let wv = vec(w);
            let err =
                |v: &dyn Fn(usize) -> f32| (0..n).map(|i| (wv[i] - v(i)).powi(2)).sum::<f32>();
            assert!(err(&|i| got[i] + ba[i]) < err(&|i| got[i]), "{key}");
        }
    }
}

#[test]
fn a_loftq_layer_starts_at_q_plus_b_a_with_the_base_replaced_by_q() {
    let g = golden();
    let w = &g["tall.weight"];
    let c = config(
        "loftq",
        &[(
            "loftq_config",
            serde_json::json!({"loftq_bits": 4, "loftq_iter": 1}),
        )],
    );
    let l = build(&c, w).unwrap();
    let offset = l.base_offset().expect("LoftQ replaces the base");
    let q = vec(&(w - &offset).unwrap());
    let want = vec(&g["tall.loftq4_1.base"]);
    let off = want
        .iter()
        .zip(&q)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(off < 1e-7, "base off by {off}");
    // A and B as PEFT sets them: not divided by alpha / r (here 4 / 4 = 1)
    let t = l.tensors();
    assert_eq!(
        (t.len(), t[0].name, t[1].name),
        (2, "lora_A.weight", "lora_B.weight")
    );
}

#[test]
fn loftq_settings_are_checked_and_filled_with_peft_s_defaults() {
    let w = Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap();
    let bad = config(
        "loftq",
        &[("loftq_config", serde_json::json!({"loftq_bits": 3}))],
    );
    let e = build(&bad, &w).unwrap_err().to_string();
    assert!(
        e.contains("loftq_config.loftq_bits") && e.contains('3'),
        "{e}"
    );
    let bad = config(
        "loftq",
        &[("loftq_config", serde_json::json!({"loftq_iter": 0}))],
    );
    assert!(build(&bad, &w)
        .unwrap_err()
        .to_string()
        .contains("loftq_iter"));
    let bad = config("loftq", &[("loftq_config", serde_json::json!({"bits": 4}))]);
    assert!(build(&bad, &w)
        .unwrap_err()
        .to_string()
        .contains("\"bits\""));
    let stray = config(
        "pissa",
        &[("loftq_config", serde_json::json!({"loftq_bits": 4}))],
    );
    let e = Lora.validate(&stray).unwrap_err().to_string();
    assert!(
        e.contains("loftq_config") && e.contains("not \"loftq\""),
        "{e}"
    );
    // no loftq_config: PEFT's defaults written into the config, as PEFT's own configs hold them
    let mut c = config("loftq", &[]);
    Lora.prepare(&mut c, &crate::testing::new_adapter(10, &[], &[]))
        .unwrap();
    assert_eq!(
        c.options["loftq_config"],
        serde_json::json!({"loftq_bits": 4, "loftq_iter": 1})
    );
    assert!(Lora.needs_dense_base(&c).unwrap().contains("LoftQ"));
}

#[test]
fn mica_starts_b_at_w_s_smallest_singular_vectors_frozen_and_a_at_zero_as_peft() {
    let g = golden();
    let mut trainable = 0;
    for name in WEIGHTS {
        let w = &g[&format!("{name}.weight")];
        let l = build(&config("mica", &[]), w).unwrap();
        let t = l.tensors();
        assert_eq!(t.len(), 1, "MiCA trains A only");
        assert_eq!(t[0].name, "lora_A.weight");
        let a = vec(t[0].var.as_tensor());
        assert!(a.iter().all(|v| *v == 0.0));
        assert_eq!(a, vec(&g[&format!("{name}.mica.lora_A")]));
        trainable += a.len() as i64;
        let bufs = l.buffers();
        assert_eq!(bufs[0].name, "lora_B.weight");
        let (b, want) = (bufs[0].var.as_tensor(), &g[&format!("{name}.mica.lora_B")]);
        assert_eq!(b.dims(), want.dims());
        let (out, r) = b.dims2().unwrap();
        let (b, want) = (vec(b), vec(want));
        for j in 0..r {
            // a singular vector's sign is free: compare up to it
            let col = |v: &[f32]| (0..out).map(|i| v[i * r + j]).collect::<Vec<_>>();
            let (x, y) = (col(&b), col(&want));
            let sign = if x.iter().zip(&y).map(|(p, q)| p * q).sum::<f32>() < 0.0 {
                -1.0
            } else {
                1.0
            };
            let diff = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (p, q)| m.max((sign * p - q).abs()));
            assert!(diff < 1e-5, "{name}: B column {j} off by {diff}");
        }
    }
    assert_eq!(
        trainable,
        vec(&g["mica.trainable"].to_dtype(DType::F32).unwrap())[0] as i64
    );
    let e = Lora
        .validate(&config("mica", &[("use_dora", true.into())]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("mica") && e.contains("use_dora"), "{e}");
}

#[test]
fn a_loftq_adapter_whose_scaling_is_not_one_is_noted() {
    assert!(
        Lora.notes(&config("loftq", &[])).is_empty(),
        "alpha 4 = r 4"
    );
    let mut c = config("loftq", &[]);
    c.options.insert("lora_alpha".into(), 8.0.into());
    let n = Lora.notes(&c);
    assert!(
        n.len() == 1 && n[0].contains("--alpha") && n[0].contains("Q + 2 B A"),
        "{n:?}"
    );
    c.options.insert("init_lora_weights".into(), "pissa".into());
    assert!(Lora.notes(&c).is_empty());
}

#[test]
fn orthogonal_init_gives_nonzero_a_and_b_whose_product_is_zero_as_peft_s() {
    // PEFT draws A = (X_A Q[0::2])^T / 10, B = X_B^T Q[1::2] / 10 with Q orthogonal: B A = 0,
    // A and B of rank r / 2, entries of variance 1/200
    let w = Tensor::zeros((96, 4096), DType::F32, &Device::Cpu).unwrap();
    let l = build(&config("orthogonal", &[]), &w).unwrap();
    let t = l.tensors();
    let (a, b) = (t[0].var.as_tensor(), t[1].var.as_tensor());
    let ba = vec(&b.matmul(a).unwrap());
    assert!(ba.iter().all(|v| v.abs() < 1e-6), "B A is not 0");
    for (m, n) in [(vec(a), 4 * 4096), (vec(b), 96 * 4)] {
        assert_eq!(m.len(), n);
        let var = m.iter().map(|v| (v * v) as f64).sum::<f64>() / n as f64;
        let tol = if n > 10_000 { 0.05 } else { 0.3 };
        assert!((var * 200.0 - 1.0).abs() < tol, "variance {var}");
    }
    let sv = |t: &Tensor| {
        let (rows, cols) = t.dims2().unwrap();
        let data = vec(t).into_iter().map(f64::from).collect();
        petal_ops::linalg::svd_top(&Mat { rows, cols, data }, 4).1
    };
    for s in [sv(a), sv(b)] {
        assert!(s[1] > 1e-3 && s[2] < 1e-6 * s[0], "rank r/2 = 2: {s:?}");
    }
    let e = Lora
        .validate(&{
            let mut c = config("orthogonal", &[]);
            c.options.insert("r".into(), 5.into());
            c
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("odd") && e.contains("orthogonal"), "{e}");
}
