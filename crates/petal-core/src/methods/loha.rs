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
    /// dW (out, in) in f32.
    fn delta(&self) -> Result<Tensor> {
        let p1 = self.w1a.as_tensor().matmul(self.w1b.as_tensor())?;
        let p2 = self.w2a.as_tensor().matmul(self.w2b.as_tensor())?;
        Ok(((p1 * p2)? * self.scaling)?)
    }
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
