//! LoHa: the low-rank Hadamard product of FedPara (Hyeon-Woo et al., 2022, "FedPara:
//! Low-Rank Hadamard Product for Communication-Efficient Federated Learning"), as LyCORIS and
//! PEFT implement it (PEFT `tuners/loha/layer.py`, linear layers).
//!
//! `dW = s * (W1a W1b) ⊙ (W2a W2b)`, `s = alpha / r`, W1a, W2a (out, r), W1b, W2b (r, in):
//! rank up to r^2 from 2r(in + out) parameters. Forward: `y + x dW^T`. PEFT materialises dW
//! (out x in) every forward; petal does so only where that is cheaper: dW is the rank-r^2
//! product `s B12 A12`, `A12 (r^2, in)` with rows `W1b_i ⊙ W2b_j`, `B12 (out, r^2)` with
//! columns `W1a_i ⊙ W2a_j`, and where `r^2 (in + out) < in out` (r 8 on 576 x 576: 74k against
//! 332k values) the forward runs `s (x A12^T) B12^T` as LoRA of rank r^2 (its fused op), so
//! neither dW nor its gradient is ever formed. Init (`init_weights = true`): all kaiming-uniform (a = sqrt(5)) except W2b = 0,
//! so dW = 0; `false`: all four random. Saved as `hada_w1_a`, `hada_w1_b`, `hada_w2_a`,
//! `hada_w2_b` (no `.weight` suffix: they are parameters, not modules), `alpha` in the config.

use crate::adapter::ModuleDims;
use crate::adapter::{AdapterLayer, AdapterMethod, BaseLinear, Flag, NamedTensor, WeightUpdate};
use crate::config::{spec, AdapterConfig, InitWeights, RankValue, Spec};
use crate::methods::{
    add_dense_delta, alpha_for, check_lycoris, dense_linear, init_nonzero, param, rank_for,
    LycorisDropout,
};
use crate::Result;
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use std::collections::BTreeMap;

pub const W1A: &str = "hada_w1_a";
pub const W1B: &str = "hada_w1_b";
pub const W2A: &str = "hada_w2_a";
pub const W2B: &str = "hada_w2_b";

pub struct Loha;

crate::method_options! {
    /// LoHa's options (PEFT `LoHaConfig`).
    pub struct LohaOptions {
        /// Rank of each of the two low-rank factors
        pub r: usize = 8,
        /// Scale numerator: dW is scaled by alpha / r
        pub alpha: f64 = 8.0,
        /// true: W2b starts at zero (dW = 0); false: all four factors random
        pub init_weights: InitWeights = InitWeights::Flag(true),
        /// Drop rows of dW in training with this probability (kept rows rescaled)
        pub rank_dropout: f64 = 0.0,
        /// Skip the adapter for a forward call with this probability
        pub module_dropout: f64 = 0.0,
        /// Ranks per module
        pub rank_pattern: BTreeMap<String, RankValue> = BTreeMap::new(),
        /// Alphas per module
        pub alpha_pattern: BTreeMap<String, f64> = BTreeMap::new(),
    }
}

#[derive(Debug)]
pub struct LohaLayer {
    w1a: Var, // (out, r)
    w1b: Var, // (r, in)
    w2a: Var, // (out, r)
    w2b: Var, // (r, in)
    scaling: f64,
    drop: LycorisDropout,
}

impl AdapterMethod for Loha {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // a term next to the base output
    }

    fn layer_values(&self, cfg: &AdapterConfig, path: &str, dims: &ModuleDims) -> Result<u64> {
        let o: LohaOptions = cfg.options()?;
        // two Hadamard-multiplied low-rank pairs, and what a step builds of them: the rank-r^2
        // factors, or the dense dW
        let r = rank_for(o.r, &o.rank_pattern, path);
        let built = match factored(r, dims.inp, dims.out) {
            true => dims.low_rank(r.saturating_mul(r)),
            false => dims.full(),
        };
        Ok(dims.low_rank(r).saturating_mul(2).saturating_add(built))
    }
    fn peft_type(&self) -> &'static str {
        "LOHA"
    }

    fn options(&self) -> Spec {
        spec::<LohaOptions>()
    }

    fn writes_layer_selection(&self) -> bool {
        true
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: LohaOptions = cfg.options()?;
        check_lycoris(o.r, o.rank_dropout, o.module_dropout, &o.init_weights)
    }

    fn flags(&self) -> Vec<Flag> {
        vec![
            Flag::new("rank-dropout", "rank_dropout"),
            Flag::new("module-dropout", "module_dropout"),
        ]
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: LohaOptions = cfg.options()?;
        let r = rank_for(o.r, &o.rank_pattern, path);
        let (inp, out) = (base.in_features, base.out_features);
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let w2b = param((r, inp), !init_nonzero(&o.init_weights), &mut g, dev)?;
        Ok(Box::new(LohaLayer {
            w1a: param((out, r), false, &mut g, dev)?,
            w1b: param((r, inp), false, &mut g, dev)?,
            w2a: param((out, r), false, &mut g, dev)?,
            w2b,
            scaling: alpha_for(o.alpha, &o.alpha_pattern, path) / r as f64,
            drop: LycorisDropout {
                rank: o.rank_dropout,
                module: o.module_dropout,
                scale: true,
            },
        }))
    }
}

/// Whether `x dW^T` runs through dW's rank-r^2 factors: when they hold fewer values than dW.
fn factored(r: usize, inp: usize, out: usize) -> bool {
    (r as u128).pow(2) * (inp as u128 + out as u128) < inp as u128 * out as u128
}

impl LohaLayer {
    fn is_factored(&self) -> Result<bool> {
        let (out, r) = self.w1a.dims2()?;
        Ok(factored(r, self.w1b.dim(1)?, out))
    }

    /// dW's rank-r^2 factors without s (see the module): A12 (r^2, in), B12 (out, r^2), as
    /// broadcast products (their gradients reach the four factors through candle's graph).
    fn factors(&self) -> Result<(Tensor, Tensor)> {
        let (out, r) = self.w1a.dims2()?;
        let inp = self.w1b.dim(1)?;
        let (w1a, w1b) = (self.w1a.as_tensor(), self.w1b.as_tensor());
        let (w2a, w2b) = (self.w2a.as_tensor(), self.w2b.as_tensor());
        let a = w1b.unsqueeze(1)?.broadcast_mul(&w2b.unsqueeze(0)?)?; // (r, r, in)
        let b = w1a.unsqueeze(2)?.broadcast_mul(&w2a.unsqueeze(1)?)?; // (out, r, r)
        Ok((a.reshape((r * r, inp))?, b.reshape((out, r * r))?))
    }

    /// This call's factors after LyCORIS dropout (`None`: module dropout skips the adapter;
    /// rank dropout drops rows of B12, which are dW's rows), drawn as the dense form draws.
    fn dropped_factors(&self, ctx: &crate::Ctx) -> Result<Option<(Tensor, Tensor)>> {
        if self.drop.skip(ctx) {
            return Ok(None);
        }
        let (a, b) = self.factors()?;
        Ok(Some((a, self.drop.rows(b, ctx)?)))
    }

    /// Where the factors are smaller than dW: `linear` of this call's factors after dropout
    /// (`None`: the adapter skipped), else `None` (the dense form).
    fn factored_forward(
        &self,
        ctx: &crate::Ctx,
        linear: impl FnOnce(Option<(Tensor, Tensor)>) -> candle_core::Result<Tensor>,
    ) -> Option<Result<Tensor>> {
        match self.is_factored() {
            Ok(true) => Some(self.dropped_factors(ctx).and_then(|f| Ok(linear(f)?))),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// dW (out, in) in f32, as one graph node that keeps the four factors only: its backward
    /// forms W1a W1b and W2a W2b again, as PEFT's `HadaWeight` does (composed from candle ops,
    /// the two products and their Hadamard product stayed alive from a step's forward to its
    /// backward: three full-size matrices a module).
    fn delta(&self) -> Result<Tensor> {
        let r = self.w1a.dim(1)?;
        let a = Tensor::cat(&[self.w1a.as_tensor(), self.w2a.as_tensor()], 1)?; // (out, 2r)
        let b = Tensor::cat(&[self.w1b.as_tensor(), self.w2b.as_tensor()], 0)?; // (2r, in)
        let s = self.scaling;
        Ok(petal_ops::lean::lean2(
            [&a, &b],
            |[a, b]| {
                let [a1, b1, a2, b2] = halves(a, b, r)?;
                (a1.matmul(&b1)? * a2.matmul(&b2)?)? * s
            },
            move |[a, b], need, _, g| {
                let [a1, b1, a2, b2] = halves(a, b, r)?;
                let (p1, p2) = (a1.matmul(&b1)?, a2.matmul(&b2)?);
                let g = (g.to_dtype(a.dtype())? * s)?;
                // the gradients of the two products
                let (g1, g2) = ((&g * &p2)?, (&g * &p1)?);
                let da = need[0]
                    .then(|| Tensor::cat(&[g1.matmul(&b1.t()?)?, g2.matmul(&b2.t()?)?], 1))
                    .transpose()?;
                let db = need[1]
                    .then(|| Tensor::cat(&[a1.t()?.matmul(&g1)?, a2.t()?.matmul(&g2)?], 0))
                    .transpose()?;
                Ok([da, db])
            },
        )?)
    }
}

/// `[W1a, W1b, W2a, W2b]` (contiguous) from the factors stacked as `a = [W1a | W2a]` (out, 2r)
/// and `b = [W1b; W2b]` (2r, in).
fn halves(a: &Tensor, b: &Tensor, r: usize) -> candle_core::Result<[Tensor; 4]> {
    let (a, b) = (
        |i| a.narrow(1, i * r, r)?.contiguous(),
        |i| b.narrow(0, i * r, r)?.contiguous(),
    );
    Ok([a(0)?, b(0)?, a(1)?, b(1)?])
}

impl AdapterLayer for LohaLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        if self.is_factored()? {
            let Some((a, b)) = self.dropped_factors(ctx)? else {
                return Ok(y);
            };
            let h = (petal_ops::low_rank(ctx.kernels(), x, &a)? * self.scaling)?; // (n, r^2)
            let d = h.matmul(&b.t()?)?.reshape(y.shape())?.to_dtype(y.dtype())?;
            return Ok((y + d)?);
        }
        match self.drop.apply(ctx, || self.delta())? {
            Some(d) => add_dense_delta(x, y, &d),
            None => Ok(y),
        }
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        let (k, s) = (ctx.kernels(), self.scaling);
        self.factored_forward(ctx, |f| match f {
            Some((la, lb)) => petal_ops::lora(k, x, w, b, &la, &lb, s),
            None => petal_ops::frozen_linear(k, x, w, b),
        })
        .or_else(|| dense_linear(k, x, w, b, || self.drop.apply(ctx, || self.delta())))
    }

    fn fused_forward_quant(
        &self,
        x: &Tensor,
        w: &Tensor,
        fmt: petal_ops::quant::QFormat,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        let (k, s) = (ctx.kernels(), self.scaling);
        self.factored_forward(ctx, |f| match f {
            Some((la, lb)) => petal_ops::quant_lora(k, x, w, fmt, b, &la, &lb, s),
            None => petal_ops::quant::quant_linear(k, x, w, fmt, b),
        })
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Add(self.delta()?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: W1A,
                var: &self.w1a,
            },
            NamedTensor {
                name: W1B,
                var: &self.w1b,
            },
            NamedTensor {
                name: W2A,
                var: &self.w2a,
            },
            NamedTensor {
                name: W2B,
                var: &self.w2b,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use petal_ops::testing::{max_rel, projected_grads, rand};

    /// A layer of random factors for an (out, inp) linear at rank r, s = 1.5, and its factors.
    fn random_layer(out: usize, inp: usize, r: usize, rank_dropout: f64) -> (LohaLayer, Vec<Var>) {
        let vars: Vec<Var> = [(out, r), (r, inp), (out, r), (r, inp)]
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| Var::from_tensor(&rand(&[a, b], i as u64 + 1)).unwrap())
            .collect();
        let layer = LohaLayer {
            w1a: vars[0].clone(),
            w1b: vars[1].clone(),
            w2a: vars[2].clone(),
            w2b: vars[3].clone(),
            scaling: 1.5,
            drop: LycorisDropout {
                rank: rank_dropout,
                module: 0.0,
                scale: true,
            },
        };
        (layer, vars)
    }

    #[test]
    fn the_one_node_update_equals_the_composed_products_in_value_and_every_factor_gradient() {
        let (layer, vars) = random_layer(7, 5, 3, 0.0);
        let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let composed =
            ((t[0].matmul(t[1]).unwrap() * t[2].matmul(t[3]).unwrap()).unwrap() * 1.5).unwrap();
        let lean = layer.delta().unwrap();
        assert!(max_rel(&lean, &composed) < 1e-6);
        let proj = rand(&[7, 5], 9);
        let (gl, gc) = (
            projected_grads(&lean, &proj),
            projected_grads(&composed, &proj),
        );
        for (i, v) in t.iter().enumerate() {
            let (l, c) = (gl.get(v).unwrap(), gc.get(v).unwrap());
            assert!(max_rel(l, c) < 1e-5, "factor {i}: {}", max_rel(l, c));
        }
    }

    /// Where dW's rank-r^2 factors are smaller than dW, the forward (composed and fused) runs
    /// through them: equal to adding the dense dW, with the same rank dropout, in value and
    /// every gradient (the four factors and x).
    #[test]
    fn the_rank_r2_factors_give_the_dense_update_in_value_and_every_gradient() {
        let (out, inp, r) = (40, 64, 3);
        assert!(factored(r, inp, out) && !factored(8, 12, 12));
        let (layer, vars) = random_layer(out, inp, r, 0.3);
        let x = Var::from_tensor(&rand(&[2, 5, inp], 5)).unwrap();
        let (w, bias) = (rand(&[out, inp], 6), rand(&[out], 7));
        let k = petal_ops::Kernels::REFERENCE;
        let base = || petal_ops::frozen_linear(k, x.as_tensor(), &w, Some(&bias)).unwrap();
        let ctx = || crate::Ctx::train(11).with_kernels(k);
        let c = ctx();
        let dense = match layer.drop.apply(&c, || layer.delta()).unwrap() {
            Some(d) => add_dense_delta(x.as_tensor(), base(), &d).unwrap(),
            None => unreachable!("no module dropout"),
        };
        let composed = layer.forward(x.as_tensor(), base(), &ctx()).unwrap();
        let fused = layer
            .fused_forward(x.as_tensor(), &w, Some(&bias), &ctx())
            .unwrap()
            .unwrap();
        let proj = rand(dense.dims(), 9);
        let gd = projected_grads(&dense, &proj);
        // over the same W kept quantized: quant_lora with the factors
        let (q, fmt) = petal_ops::quant::quantize(&w, petal_ops::quant::GgmlDType::Q8_0).unwrap();
        let deq = petal_ops::quant::dequantize(&q, fmt).unwrap();
        let over_q = layer
            .fused_forward_quant(x.as_tensor(), &q, fmt, Some(&bias), &ctx())
            .unwrap()
            .unwrap();
        let over_deq = layer
            .fused_forward(x.as_tensor(), &deq, Some(&bias), &ctx())
            .unwrap()
            .unwrap();
        assert!(
            max_rel(&over_q, &over_deq) < 1e-5,
            "{}",
            max_rel(&over_q, &over_deq)
        );
        for (form, y) in [("composed", composed), ("fused", fused)] {
            assert!(
                max_rel(&y, &dense) < 1e-5,
                "{form}: {}",
                max_rel(&y, &dense)
            );
            let g = projected_grads(&y, &proj);
            for (i, v) in vars.iter().chain([&x]).enumerate() {
                let (a, e) = (
                    g.get(v.as_tensor()).unwrap(),
                    gd.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    max_rel(a, e) < 1e-4,
                    "{form}, tensor {i}: {}",
                    max_rel(a, e)
                );
            }
        }
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("LOHA", 3, 7.0, crate::testing::toy_targets());
    c.set("alpha_pattern", serde_json::json!({"fc2": 2.0}))
        .unwrap();
    c
}

#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |inp, out, cfg: &AdapterConfig| 2 * crate::testing::opt_usize(cfg, "r") * (inp + out)
);
