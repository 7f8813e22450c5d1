//! LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), with rsLoRA
//! scaling (Kalajdzievski, 2023). Mirrors PEFT `tuners/lora/layer.py` (`Linear`).
//!
//! `W' = W + s * B A`, `s = alpha / r` (rsLoRA: `alpha / sqrt(r)`), A (r, in), B (out, r).
//! Forward: `y + s * B(A(dropout(x)))`, never materialising dW.
//! Init (PEFT `reset_lora_parameters`): A kaiming-uniform with a = sqrt(5), i.e.
//! U(-1/sqrt(in), 1/sqrt(in)), B = 0; "gaussian": A ~ N(0, 1/r), B = 0; `false`: both
//! kaiming-uniform (nn.Linear's default), so the adapter is non-zero from the start.
//! Saved as `lora_A.weight` (r, in) and `lora_B.weight` (out, r), in f32.

use crate::adapter::{AdapterLayer, AdapterMethod, BaseLinear, Flag, NamedTensor, WeightUpdate};
use crate::config::{
    pissa_niter, probability, spec, unsupported, AdapterConfig, InitWeights, Spec,
};
use crate::methods::dora::{Dora, MAGNITUDE};
use crate::methods::{kaiming_uniform, normal};
use crate::{rng, Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub const LORA_A: &str = "lora_A.weight";
pub const LORA_B: &str = "lora_B.weight";

pub struct Lora;

#[derive(Debug)]
pub struct LoraLayer {
    pub a: Var, // (r, in)
    pub b: Var, // (out, r)
    pub scaling: f64,
    pub dropout: f64,
    /// `use_dora`: the magnitude vector and what it needs of the base.
    pub dora: Option<Dora>,
    /// PiSSA / OLoRA: the part of W the adapter starts with (moved out of the base).
    pub base_offset: Option<Tensor>,
    /// PiSSA / OLoRA: A and B as initialised, for saving as plain LoRA (`as_plain_lora`).
    pub initial: Option<(Tensor, Tensor)>,
    /// `bias = "all" | "lora_only"`: the trained bias and the frozen one it started from.
    pub bias: Option<(Var, Tensor)>,
}

impl AdapterMethod for Lora {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn options(&self) -> Spec {
        spec::<LoraOptions>()
    }

    fn writes_layer_selection(&self) -> bool {
        true
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: LoraOptions = cfg.options()?;
        if o.core.r == 0 {
            return Err(Error::config("adapter config", "r", "must be at least 1"));
        }
        probability("lora_dropout", o.core.dropout)?;
        if o.core.fan_in_fan_out {
            return Err(unsupported("fan_in_fan_out", true));
        }
        if !matches!(o.core.bias.as_str(), "none" | "all" | "lora_only") {
            return Err(unsupported("bias", format!("{:?}", o.core.bias)));
        }
        match &o.core.init {
            InitWeights::Flag(_) => Ok(()),
            InitWeights::Named(n)
                if n == "gaussian" || n == "pissa" || n == "olora" || pissa_niter(n).is_some() =>
            {
                Ok(())
            }
            InitWeights::Named(n) => Err(unsupported("init_lora_weights", format!("{n:?}"))),
        }
    }

    fn flags(&self) -> Vec<Flag> {
        vec![
            Flag::new("rslora", "use_rslora"),
            Flag::new("dora", "use_dora"),
            Flag::new("init", "init_lora_weights"),
            Flag::new("bias", "bias"),
        ]
    }

    fn variants(&self) -> &'static [(&'static str, &'static str, &'static str)] {
        &[("dora", "use_dora", "true")]
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn set_init_nonzero(&self, opts: &mut serde_json::Map<String, serde_json::Value>) {
        opts.insert("init_lora_weights".into(), false.into());
    }

    fn adapts_embeddings(&self) -> bool {
        true
    }

    fn convert_for_save(
        &self,
        model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
        tensors: &mut std::collections::HashMap<String, Tensor>,
    ) -> Result<AdapterConfig> {
        as_plain_lora(model, name, cfg, tensors)
    }

    fn trains_all_biases(&self, cfg: &AdapterConfig) -> bool {
        cfg.get("bias").and_then(|b| b.as_str()) == Some("all")
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: LoraOptions = cfg.options()?;
        let r = o.rank_for(path);
        let (inp, out) = (base.in_features, base.out_features);
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        if base.embedding {
            return LoraEmbedding::build(&o, path, base, &mut g);
        }
        let (a, b) = match &o.core.init {
            InitWeights::Named(n) if n == "gaussian" => (
                normal((r, inp), 1.0 / r as f64, &mut g, dev)?,
                Tensor::zeros((out, r), DType::F32, dev)?,
            ),
            InitWeights::Flag(false) => (
                kaiming_uniform((r, inp), &mut g, dev)?,
                kaiming_uniform((out, r), &mut g, dev)?,
            ),
            _ => (
                kaiming_uniform((r, inp), &mut g, dev)?,
                Tensor::zeros((out, r), DType::F32, dev)?,
            ),
        };
        let scaling = o.scaling_for(path);
        let (a, b, base_offset) = match &o.core.init {
            InitWeights::Named(n) if n == "pissa" || n == "olora" || pissa_niter(n).is_some() => {
                let (a, b) = structured_init(n, base.weight, r, scaling, path)?;
                let offset = (b.matmul(&a)? * scaling)?;
                (a, b, Some(offset))
            }
            _ => (a, b, None),
        };
        let initial = match &base_offset {
            Some(_) => Some((a.copy()?, b.copy()?)),
            None => None,
        };
        let bias = match (o.core.bias.as_str(), base.bias) {
            ("all" | "lora_only", Some(b)) => {
                let b = b.to_dtype(DType::F32)?;
                Some((Var::from_tensor(&b.copy()?)?, b))
            }
            _ => None,
        };
        let dora = if o.dora {
            // PiSSA / OLoRA: the magnitude and the direction's norm are over the residual base
            // plus the adapter (so m starts as ||W||), as PEFT initialises DoRA after them
            let w = match &base_offset {
                Some(o) => (base.weight.to_dtype(DType::F32)? - o)?,
                None => base.weight.clone(),
            };
            Some(Dora::new(&w, base.bias, &(b.matmul(&a)? * scaling)?)?)
        } else {
            None
        };
        Ok(Box::new(LoraLayer {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling,
            dropout: o.core.dropout,
            dora,
            base_offset,
            initial,
            bias,
        }))
    }
}

mod embedding;
mod init;
mod options;
pub use embedding::LoraEmbedding;
pub use init::as_plain_lora;
use init::structured_init;
pub use options::{LoraCore, LoraOptions};

/// Inverted dropout with a mask drawn from petal's per-step generator (see `rng`): one
/// splitmix64 draw per element, compared as an integer against p * 2^64.
pub fn dropout(x: &Tensor, p: f64, ctx: &crate::Ctx) -> Result<Tensor> {
    let mut state = ctx.next_seed();
    let threshold = (p * u64::MAX as f64) as u64;
    let keep = (1.0 / (1.0 - p)) as f32;
    let m: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            if rng::splitmix(state) < threshold {
                0.0
            } else {
                keep
            }
        })
        .collect();
    let mask = Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

impl LoraLayer {
    /// The (dropped) input as (n, in) f32, and whether dropout acted.
    fn input(&self, x: &Tensor, ctx: &crate::Ctx) -> Result<(Tensor, bool)> {
        let xf = x.to_dtype(DType::F32)?;
        let inp = xf.dim(candle_core::D::Minus1)?;
        let x2 = xf.reshape((xf.elem_count() / inp, inp))?; // plain 2-D matmuls
        if ctx.is_train() && self.dropout > 0.0 {
            return Ok((dropout(&x2, self.dropout, ctx)?, true));
        }
        Ok((x2, false))
    }

    /// h = dropout(x) A^T as (n, r), in f32 (without an f32 copy of a bf16 x where no dropout
    /// acts).
    fn low(&self, x: &Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        if !(ctx.is_train() && self.dropout > 0.0) {
            return Ok(petal_ops::low_rank(x, self.a.as_tensor())?);
        }
        Ok(self.input(x, ctx)?.0.matmul(&self.a.as_tensor().t()?)?)
    }

    /// s B A (out, in).
    fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?)
    }
}

impl AdapterLayer for LoraLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        if let Some(dora) = &self.dora {
            let (xd, dropped) = self.input(x, ctx)?;
            let lora = xd
                .matmul(&self.a.as_tensor().t()?)?
                .matmul(&self.b.as_tensor().t()?)?;
            let out = lora.dim(1)?;
            let y2 = y.to_dtype(DType::F32)?.reshape((lora.dim(0)?, out))?;
            let mut z = dora.forward(&y2, &xd, &lora, self.scaling, &self.delta()?, dropped)?;
            if let Some((trained, frozen)) = &self.bias {
                // PEFT trains the base bias in place, outside the magnitude's scaling
                z = z.broadcast_add(&(trained.as_tensor() - frozen)?)?;
            }
            return Ok(z.reshape(y.shape())?.to_dtype(y.dtype())?);
        }
        let h = (self.low(x, ctx)? * self.scaling)?; // (n, r), scaled while small
        let mut d = h.matmul(&self.b.as_tensor().t()?)?; // (n, out)
        if let Some((trained, frozen)) = &self.bias {
            d = d.broadcast_add(&(trained.as_tensor() - frozen)?)?;
        }
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        // DoRA with dropout acting recomputes its base term from the dropped input: composed
        let no_dropout = !(ctx.is_train() && self.dropout > 0.0);
        let fast = petal_ops::cpu::fast_lora_ok(x, w);
        if self.bias.is_some() || (self.dora.is_some() && !no_dropout) || !(fast || no_dropout) {
            return None;
        }
        let run = || -> Result<Tensor> {
            // without dropout, LoRA goes through `petal_ops::lora` on any device: the fused
            // kernel on the CPU, elsewhere one graph node that keeps x, A and B only; DoRA
            // then scales its output
            let (la, lb) = (self.a.as_tensor(), self.b.as_tensor());
            if self.dora.is_none() && no_dropout {
                return Ok(petal_ops::lora(x, w, b, la, lb, self.scaling)?);
            }
            if let (Some(d), false) = (&self.dora, fast) {
                let lin = petal_ops::lora(x, w, b, la, lb, self.scaling)?;
                return d.fused_forward(&lin, &self.delta()?);
            }
            let h = self.low(x, ctx)?;
            let lin = petal_ops::lora_linear(x, w, b, &h, self.b.as_tensor(), self.scaling)?;
            match &self.dora {
                Some(d) => d.fused_forward(&lin, &self.delta()?),
                None => Ok(lin),
            }
        };
        Some(run())
    }

    fn base_offset(&self) -> Option<Tensor> {
        self.base_offset.clone()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        let dw = match &self.dora {
            Some(d) => d.update(&self.delta()?)?,
            None => self.delta()?,
        };
        Ok(match &self.bias {
            Some((trained, frozen)) => WeightUpdate::AddBias {
                dw: Some(dw),
                db: (trained.as_tensor() - frozen)?,
            },
            None => WeightUpdate::Add(dw),
        })
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let mut v = vec![
            NamedTensor {
                name: LORA_A,
                var: &self.a,
            },
            NamedTensor {
                name: LORA_B,
                var: &self.b,
            },
        ];
        if let Some((trained, _)) = &self.bias {
            v.push(NamedTensor {
                name: "base_layer.bias",
                var: trained,
            });
        }
        if let Some(d) = &self.dora {
            v.push(NamedTensor {
                name: MAGNITUDE,
                var: &d.m,
            });
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Targets;
    use candle_core::Device;

    /// A of a layer built for a (out, inp) linear.
    fn init_a(out: usize, inp: usize, cfg: &AdapterConfig) -> (Vec<f32>, f32) {
        let w = Tensor::zeros((out, inp), DType::F32, &Device::Cpu).unwrap();
        let base = BaseLinear {
            weight: &w,
            bias: None,
            in_features: inp,
            out_features: out,
            shared: &Default::default(),
            embedding: false,
        };
        let l = Lora.build(cfg, "x", &base, 3).unwrap();
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

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    // alpha != r, and a rank_pattern giving fc2 its own rank
    let mut c = AdapterConfig::lora(4, 5.0, crate::testing::toy_targets());
    c.set("rank_pattern", serde_json::json!({"fc2": 3}))
        .unwrap();
    c
}

#[cfg(test)]
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
#[cfg(test)]
fn dora_config() -> AdapterConfig {
    let mut c = conformance_config();
    c.set("use_dora", true).unwrap();
    c
}

#[cfg(test)]
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
#[cfg(test)]
fn bias_lora_only_config() -> AdapterConfig {
    let mut c = conformance_config();
    c.set("bias", "lora_only").unwrap();
    c
}

#[cfg(test)]
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
#[cfg(test)]
fn bias_all_config() -> AdapterConfig {
    let mut c = conformance_config();
    c.target_modules = Some(crate::config::Targets::List(vec!["fc2".into()]));
    c.set("bias", "all").unwrap();
    c
}

#[cfg(test)]
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
#[cfg(test)]
fn dora_bias_config() -> AdapterConfig {
    let mut c = dora_config();
    c.set("bias", "lora_only").unwrap();
    c
}

#[cfg(test)]
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

#[cfg(test)]
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
            };
            let layer = Lora.build(&c, "fc", &base, 7).unwrap();
            let x = Var::from_tensor(&rand_tensor(&[3, 4, 5], 3)).unwrap();
            let y = petal_ops::frozen_linear(x.as_tensor(), &w, b.as_ref()).unwrap();
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

#[cfg(test)]
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
}
