//! LoHa: the low-rank Hadamard product of FedPara (Hyeon-Woo et al., 2022, "FedPara:
//! Low-Rank Hadamard Product for Communication-Efficient Federated Learning"), as LyCORIS and
//! PEFT implement it (PEFT `tuners/loha/layer.py`, linear layers).
//!
//! `dW = s * (W1a W1b) ⊙ (W2a W2b)`, `s = alpha / r`, W1a, W2a (out, r), W1b, W2b (r, in):
//! rank up to r^2 from 2r(in + out) parameters. Forward: `y + x dW^T` (dW is materialised, as
//! in PEFT). Init (`init_weights = true`): all kaiming-uniform (a = sqrt(5)) except W2b = 0,
//! so dW = 0; `false`: all four random. Saved as `hada_w1_a`, `hada_w1_b`, `hada_w2_a`,
//! `hada_w2_b` (no `.weight` suffix: they are parameters, not modules), `alpha` in the config.

use crate::adapter::{AdapterLayer, AdapterMethod, BaseLinear, NamedTensor, WeightUpdate};
use crate::config::AdapterConfig;
use crate::methods::{add_dense_delta, dense_linear, param, LycorisDropout};
use crate::Result;
use candle_core::{Tensor, Var};
use rand::SeedableRng;

pub const W1A: &str = "hada_w1_a";
pub const W1B: &str = "hada_w1_b";
pub const W2A: &str = "hada_w2_a";
pub const W2B: &str = "hada_w2_b";

pub struct Loha;

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
    fn peft_type(&self) -> &'static str {
        "LOHA"
    }

    fn config_keys(&self) -> &'static [&'static str] {
        &[
            "r",
            "alpha",
            "init_weights",
            "rank_dropout",
            "module_dropout",
            "layers_to_transform",
            "layers_pattern",
            "rank_pattern",
            "alpha_pattern",
        ]
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let r = cfg.rank_for(path);
        let (inp, out) = (base.in_features, base.out_features);
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let w2b = param((r, inp), !cfg.init_nonzero(), &mut g, dev)?;
        Ok(Box::new(LohaLayer {
            w1a: param((out, r), false, &mut g, dev)?,
            w1b: param((r, inp), false, &mut g, dev)?,
            w2a: param((out, r), false, &mut g, dev)?,
            w2b,
            scaling: cfg.alpha_for(path) / r as f64,
            drop: LycorisDropout {
                rank: cfg.rank_dropout,
                module: cfg.module_dropout,
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
    fn forward(&self, x: &Tensor, y: Tensor, train: bool) -> Result<Tensor> {
        match self.drop.apply(train, || self.delta())? {
            Some(d) => add_dense_delta(x, y, &d),
            None => Ok(y),
        }
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        train: bool,
    ) -> Option<Result<Tensor>> {
        dense_linear(x, w, b, || self.drop.apply(train, || self.delta()))
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
    c.alpha_pattern.insert("fc2".into(), 2.0);
    c
}

#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |inp, out, cfg: &AdapterConfig| 2 * cfg.r * (inp + out)
);
