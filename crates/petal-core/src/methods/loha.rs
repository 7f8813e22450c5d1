//! LoHa: the low-rank Hadamard product of FedPara (Hyeon-Woo et al., 2022, "FedPara:
//! Low-Rank Hadamard Product for Communication-Efficient Federated Learning"), as LyCORIS and
//! PEFT implement it (PEFT `tuners/loha/layer.py`, linear layers).
//!
//! `dW = s * (W1a W1b) ⊙ (W2a W2b)`, `s = alpha / r`, W1a, W2a (out, r), W1b, W2b (r, in):
//! rank up to r^2 from 2r(in + out) parameters. Forward: `y + x dW^T` (dW is materialised, as
//! in PEFT). Init (`init_weights = true`): all kaiming-uniform (a = sqrt(5)) except W2b = 0,
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
        // two Hadamard-multiplied low-rank pairs, and the dense dW a step builds
        let r = rank_for(o.r, &o.rank_pattern, path);
        Ok(dims
            .low_rank(r)
            .saturating_mul(2)
            .saturating_add(dims.full()))
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

impl LohaLayer {
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
        dense_linear(ctx.kernels(), x, w, b, || {
            self.drop.apply(ctx, || self.delta())
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

    #[test]
    fn the_one_node_update_equals_the_composed_products_in_value_and_every_factor_gradient() {
        let vars: Vec<Var> = [(7, 3), (3, 5), (7, 3), (3, 5)]
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
                rank: 0.0,
                module: 0.0,
                scale: true,
            },
        };
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
