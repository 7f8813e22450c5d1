//! LoRA's tests: its own checks, the conformance suite over its variants (DoRA, trained
//! biases), and the fused DoRA and bias paths against the composed ones.

use super::*;

mod tests {
    use super::*;
    use crate::config::Targets;
    use candle_core::Device;

    /// A of a layer built for a (out, inp) linear.
    fn init_a(out: usize, inp: usize, cfg: &AdapterConfig) -> (Vec<f32>, f32) {
        let w = Tensor::zeros((out, inp), DType::F32, &Device::Cpu).unwrap();
        let l = crate::testing::build_on(&Lora, cfg, &w, "x", 3).unwrap();
        let t = l.tensors();
        let a = t[0]
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = t[1]
            .var
            .as_tensor()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        (a, b)
    }

    #[test]
    fn default_init_draws_a_within_the_kaiming_bound_and_zeroes_b() {
        let (a, b) = init_a(
            6,
            16,
            &AdapterConfig::lora(4, 8.0, Targets::List(vec!["x".into()])),
        );
        let bound = 1.0 / 4.0; // 1/sqrt(16)
        assert!(a.iter().all(|v| v.abs() <= bound));
        let spread = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            spread > 0.8 * bound,
            "A should fill its range, max |a| = {spread}"
        );
        assert_eq!(b, 0.0);
    }

    #[test]
    fn dropout_zeroes_about_p_of_the_entries_and_rescales_the_rest() {
        let ctx = crate::Ctx::train(9);
        let x = Tensor::ones(100_000, DType::F32, &Device::Cpu).unwrap();
        let y = dropout(&x, 0.2, &ctx).unwrap().to_vec1::<f32>().unwrap();
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((zeros - 0.2).abs() < 0.01, "dropped {zeros}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.25).abs() < 1e-6));
        let ctx = crate::Ctx::train(9);
        assert_eq!(
            dropout(&x, 0.2, &ctx).unwrap().to_vec1::<f32>().unwrap(),
            y,
            "same step seed, same mask"
        );
    }

    #[test]
    fn gaussian_init_draws_a_with_standard_deviation_one_over_r() {
        let mut cfg = AdapterConfig::lora(4, 8.0, Targets::List(vec!["x".into()]));
        cfg.set("init_lora_weights", InitWeights::Named("gaussian".into()))
            .unwrap();
        let (a, b) = init_a(4, 4000, &cfg);
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            mean.abs() < 0.01 && (std - 0.25).abs() < 0.01,
            "mean {mean} std {std}"
        );
        assert_eq!(b, 0.0);
    }
}

fn conformance_config() -> AdapterConfig {
    // alpha != r, and a rank_pattern giving fc2 its own rank
    let mut c = AdapterConfig::lora(4, 5.0, crate::testing::toy_targets());
    c.set("rank_pattern", serde_json::json!({"fc2": 3}))
        .unwrap();
    c
}

crate::conformance!(
    conformance,
    conformance_config,
    |inp, out, cfg: &AdapterConfig| {
        let r = if out == 6 {
            cfg.options::<LoraOptions>().unwrap().core.rank_pattern["fc2"].rank()
        } else {
            crate::testing::opt_usize(cfg, "r")
        };
        r * (inp + out)
    }
);

/// DoRA detaches the weight norm in backward (as the paper and PEFT do), so only the
/// magnitude's gradient is the exact derivative; A and B are checked for flow only.
fn dora_config() -> AdapterConfig {
    let mut c = conformance_config();
    c.set("use_dora", true).unwrap();
    c
}

crate::conformance!(
    dora_conformance,
    dora_config,
    |inp, out, cfg: &AdapterConfig| {
        let r = if out == 6 {
            cfg.options::<LoraOptions>().unwrap().core.rank_pattern["fc2"].rank()
        } else {
            crate::testing::opt_usize(cfg, "r")
        };
        r * (inp + out) + out
    },
    Some(&[MAGNITUDE])
);

/// `bias = "lora_only"`: fc1 (with a bias) trains it inside its LoRA layer.
fn bias_lora_only_config() -> AdapterConfig {
    let mut c = conformance_config();
    c.set("bias", "lora_only").unwrap();
    c
}

crate::conformance!(
    bias_lora_only_conformance,
    bias_lora_only_config,
    |inp, out, cfg: &AdapterConfig| {
        if out == 6 {
            cfg.options::<LoraOptions>().unwrap().core.rank_pattern["fc2"].rank() * (inp + out)
        } else {
            crate::testing::opt_usize(cfg, "r") * (inp + out) + out
        }
    }
);

/// `bias = "all"` with LoRA on fc2 only: fc1's bias is trained on its own.
fn bias_all_config() -> AdapterConfig {
    let mut c = conformance_config();
    c.target_modules = Some(crate::config::Targets::List(vec!["fc2".into()]));
    c.set("bias", "all").unwrap();
    c
}

crate::conformance!(
    bias_all_conformance,
    bias_all_config,
    |inp, out, cfg: &AdapterConfig| {
        if out == 6 {
            cfg.options::<LoraOptions>().unwrap().core.rank_pattern["fc2"].rank() * (inp + out)
        } else {
            out
        }
    }
);

/// DoRA with fc1's bias trained (`lora_only`): PEFT adds the trained bias outside the
/// magnitude's scaling; merge rescales W and moves b.
fn dora_bias_config() -> AdapterConfig {
    let mut c = dora_config();
    c.set("bias", "lora_only").unwrap();
    c
}

crate::conformance!(
    dora_bias_conformance,
    dora_bias_config,
    |inp, out, cfg: &AdapterConfig| {
        if out == 6 {
            cfg.options::<LoraOptions>().unwrap().core.rank_pattern["fc2"].rank() * (inp + out)
                + out
        } else {
            crate::testing::opt_usize(cfg, "r") * (inp + out) + 2 * out
        }
    },
    Some(&[MAGNITUDE, "base_layer.bias"])
);

mod dora_fused_tests {
    use super::*;
    use crate::testing::{max_rel, rand_tensor};

    #[test]
    fn fused_dora_equals_the_composed_form_in_value_and_every_gradient() {
        for bias in [false, true] {
            let w = rand_tensor(&[6, 5], 1);
            let b = bias.then(|| rand_tensor(&[6], 2));
            let mut c = conformance_config();
            c.set("use_dora", true).unwrap();
            c.set("init_lora_weights", InitWeights::Flag(false))
                .unwrap();
            let base = BaseLinear {
                weight: &w,
                bias: b.as_ref(),
                in_features: 5,
                out_features: 6,
                shared: &Default::default(),
                embedding: false,
                quant: None,
            };
            let layer = Lora.build(&c, "fc", &base, 7).unwrap();
            let x = Var::from_tensor(&rand_tensor(&[3, 4, 5], 3)).unwrap();
            let y =
                petal_ops::frozen_linear(petal_ops::Kernels::FUSED, x.as_tensor(), &w, b.as_ref())
                    .unwrap();
            let ctx = crate::Ctx::train(0);
            let composed = layer.forward(x.as_tensor(), y, &ctx).unwrap();
            let fused = layer
                .fused_forward(x.as_tensor(), &w, b.as_ref(), &ctx)
                .expect("fused path")
                .unwrap();
            assert!(max_rel(&fused, &composed) < 1e-5);
            let proj = rand_tensor(composed.dims(), 9);
            let grads = |t: &Tensor| (t * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let (gc, gf) = (grads(&composed), grads(&fused));
            let mut vars: Vec<Var> = layer.tensors().iter().map(|t| t.var.clone()).collect();
            vars.push(x.clone());
            for v in &vars {
                let (a, e) = (
                    gc.get(v.as_tensor()).unwrap(),
                    gf.get(v.as_tensor()).unwrap(),
                );
                assert!(max_rel(e, a) < 1e-4, "bias {bias}: {}", max_rel(e, a));
            }
        }
    }
}

/// QDoRA: DoRA over a quantized base's blocks equals DoRA over the same weights dequantized,
/// in value and every gradient, with a magnitude away from the norms (so the base term's
/// scaling, recomputed from the dropped input under dropout, counts), through the fused node
/// (no dropout) and the composed form (dropout).
/// DoRA keeps its norms at inference only while A and B hold: a moved A or B (an optimizer
/// step) gives the norms of the moved adapter, as a training forward computes them.
#[test]
fn dora_inference_keeps_its_norms_only_while_a_and_b_hold() {
    let mut c = dora_config();
    c.set("init_lora_weights", InitWeights::Flag(false))
        .unwrap();
    for key in [LORA_A, LORA_B] {
        crate::testing::check_inference_follows_the_values(&c, key);
    }
}

mod qdora_tests {
    use super::*;
    use crate::testing::{assert_passes_agree, check_over_quantized_blocks, layer_pass};

    fn config(dropout: f64) -> AdapterConfig {
        let mut c = conformance_config();
        c.set("use_dora", true).unwrap();
        c.set("lora_dropout", dropout).unwrap();
        c.set("init_lora_weights", InitWeights::Flag(false))
            .unwrap();
        c
    }

    /// The magnitude away from the norms, so the base term's scaling (recomputed from the
    /// dropped input under dropout) counts.
    fn off_the_norms(layer: &dyn AdapterLayer) {
        let m = &layer.tensors()[2].var;
        m.set(&(m.as_tensor() * 1.3).unwrap()).unwrap();
    }

    #[test]
    fn dora_over_quantized_blocks_equals_dora_over_them_dequantized() {
        for dropout in [0.0, 0.3] {
            check_over_quantized_blocks(&Lora, &config(dropout), (6, 32), &off_the_norms);
        }
    }

    /// Over bf16 weights DoRA reads the model's own W (no f32 copy): within bf16's rounding
    /// of DoRA over the same values in f32.
    #[test]
    fn dora_over_bf16_weights_follows_dora_over_their_values_in_f32() {
        let w = crate::testing::rand_tensor(&[6, 32], 1)
            .to_dtype(DType::BF16)
            .unwrap();
        let w32 = w.to_dtype(DType::F32).unwrap();
        for dropout in [0.0, 0.3] {
            for fused in [false, true] {
                let c = config(dropout);
                let bf16 = layer_pass(&Lora, &c, (&w, None), fused, &off_the_norms);
                let f32 = layer_pass(&Lora, &c, (&w32, None), fused, &off_the_norms);
                let what = format!("dropout {dropout}, fused {fused}");
                assert_passes_agree(&bf16, &f32, 5e-3, &what);
            }
        }
    }
}

mod bias_tests {
    use super::*;
    use crate::testing::{adapted, max_rel, rand_tensor, Toy};
    use crate::Adaptable;

    #[test]
    fn trained_biases_merge_into_b_and_unmerge_restores_it() {
        for cfg in [
            bias_all_config(),
            bias_lora_only_config(),
            dora_bias_config(),
        ] {
            let mut t = adapted(&cfg, true);
            let l = t.fc1.layer("default").unwrap();
            let bias = l
                .tensors()
                .into_iter()
                .find(|n| n.name.ends_with("bias"))
                .unwrap();
            bias.var
                .set(&(bias.var.as_tensor() + rand_tensor(&[12], 8)).unwrap())
                .unwrap();
            let x = Toy::input();
            let unmerged = t.forward(&x);
            let b0 = t.fc1.bias().unwrap().clone();
            for l in t.linears_mut() {
                l.merge("default", true).unwrap();
            }
            assert!(
                max_rel(&t.forward(&x), &unmerged) < 1e-5,
                "{:?}",
                cfg.get("bias")
            );
            assert!(max_rel(t.fc1.bias().unwrap(), &b0) > 1e-2, "the bias moved");
            for l in t.linears_mut() {
                l.unmerge().unwrap();
            }
            assert!(
                max_rel(t.fc1.bias().unwrap(), &b0) < 1e-6,
                "{:?}",
                cfg.get("bias")
            );
        }
    }

    #[test]
    fn dropout_low_rank_equals_dropout_then_matmul_in_value_and_gradients() {
        // the one-node form draws the same mask (same seed) and keeps no mask between passes
        let x = candle_core::Var::from_tensor(&petal_ops::testing::rand(&[37, 24], 1)).unwrap();
        let a = candle_core::Var::from_tensor(&petal_ops::testing::rand(&[4, 24], 2)).unwrap();
        let fast =
            dropout_low_rank(x.as_tensor(), a.as_tensor(), 0.3, &crate::Ctx::train(7)).unwrap();
        let slow = dropout(x.as_tensor(), 0.3, &crate::Ctx::train(7))
            .unwrap()
            .matmul(&a.as_tensor().t().unwrap())
            .unwrap();
        assert!(petal_ops::testing::max_rel(&fast, &slow) < 1e-6);
        let proj = petal_ops::testing::rand(&[37, 4], 3);
        let gf = petal_ops::testing::projected_grads(&fast, &proj);
        let gs = petal_ops::testing::projected_grads(&slow, &proj);
        for v in [&x, &a] {
            let (f, s) = (
                gf.get(v.as_tensor()).unwrap(),
                gs.get(v.as_tensor()).unwrap(),
            );
            assert!(petal_ops::testing::max_rel(f, s) < 1e-5);
        }
    }
}
