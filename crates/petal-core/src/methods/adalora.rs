//! AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient
//! Fine-Tuning"). Mirrors PEFT `tuners/adalora` (`SVDLinear`, `RankAllocator`,
//! `AdaLoraModel.forward`'s orthogonal regulariser).
//!
//! SVD-form update: `dW = B (A ⊙ E) · s / (ranknum + 1e-5)` with `A (r, in)`, `B (out, r)`,
//! singular values `E (r, 1)`, `s = lora_alpha` (or r when alpha is 0) and `ranknum` the rank the
//! layer was created with (`init_r`). Init: E = 0 (identity), A, B ~ N(0, 0.02^2);
//! `init_lora_weights = false`: all N(0, 1). Saved as `lora_A`, `lora_B`, `lora_E` (no
//! `.weight`). Training (petal-train): the loss gains `orth_reg_weight` times the mean of
//! `||A A^T - I||_F` and `||B^T B - I||_F` over the layers, and after every optimizer step the
//! `RankAllocator` below tracks each triplet's importance (EMAs of `|p · grad|` and of its
//! deviation) and zeroes the least important singular values down to the scheduled budget
//! (cubic from `init_r` to `target_r` per layer between `tinit` and `total_step - tfinal`,
//! every `deltaT` steps). The final masks are written as `rank_pattern` (a list of kept flags
//! per `<module>.lora_E`) and the tensors are saved cut to the kept ranks, as PEFT does; loading
//! rebuilds the cut layers with the original `ranknum`.

use crate::adapter::{AdapterLayer, AdapterMethod, BaseLinear, NamedTensor, WeightUpdate};
use crate::config::{AdapterConfig, RankValue};
use crate::methods::lora::dropout;
use crate::methods::normal;
use crate::Result;
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub struct AdaLora;

#[derive(Debug)]
pub struct AdaLoraLayer {
    pub a: Var, // (r, in)
    pub b: Var, // (out, r)
    pub e: Var, // (r, 1)
    scaling: f64,
    ranknum: f64,
    dropout: f64,
}

impl AdapterMethod for AdaLora {
    fn peft_type(&self) -> &'static str {
        "ADALORA"
    }

    fn config_keys(&self) -> &'static [&'static str] {
        &[
            "r",
            "lora_alpha",
            "lora_dropout",
            "init_lora_weights",
            "bias",
            "fan_in_fan_out",
            "layers_to_transform",
            "layers_pattern",
            "rank_pattern",
            "init_r",
            "target_r",
            "tinit",
            "tfinal",
            "deltaT",
            "beta1",
            "beta2",
            "orth_reg_weight",
            "total_step",
        ]
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let init_r = cfg.init_r.unwrap_or(12);
        // a saved adapter is cut to the ranks its mask keeps; the scale keeps the original rank
        let kept = match cfg.rank_pattern.get(&format!("{path}.lora_E")) {
            Some(RankValue::Mask(m)) => m.iter().filter(|&&k| k).count(),
            _ => init_r,
        };
        let (inp, out) = (base.in_features, base.out_features);
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let nonzero = cfg.init_nonzero();
        let std = if nonzero { 1.0 } else { 0.02 };
        let mat = |rows: usize, cols: usize, g: &mut rand::rngs::StdRng| -> Result<Tensor> {
            if rows * cols == 0 {
                return Ok(Tensor::zeros((rows, cols), DType::F32, dev)?);
            }
            normal((rows, cols), std, g, dev)
        };
        let a = mat(kept, inp, &mut g)?;
        let e = if nonzero {
            mat(kept, 1, &mut g)?
        } else {
            Tensor::zeros((kept, 1), DType::F32, dev)?
        };
        let b = mat(out, kept, &mut g)?;
        let alpha = cfg.lora_alpha;
        Ok(Box::new(AdaLoraLayer {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            e: Var::from_tensor(&e)?,
            scaling: if alpha > 0.0 { alpha } else { init_r as f64 },
            ranknum: init_r as f64,
            dropout: cfg.lora_dropout,
        }))
    }
}

impl AdaLoraLayer {
    fn rank(&self) -> usize {
        self.e.as_tensor().dims()[0]
    }

    fn factor(&self) -> f64 {
        self.scaling / (self.ranknum + 1e-5)
    }

    /// A ⊙ E (r, in).
    fn scaled_a(&self) -> Result<Tensor> {
        Ok(self.a.as_tensor().broadcast_mul(self.e.as_tensor())?)
    }
}

impl AdapterLayer for AdaLoraLayer {
    fn forward(&self, x: &Tensor, y: Tensor, train: bool) -> Result<Tensor> {
        if self.rank() == 0 {
            return Ok(y);
        }
        let mut x2 = crate::methods::oft::flat_input(x)?;
        if train && self.dropout > 0.0 {
            x2 = dropout(&x2, self.dropout)?;
        }
        let h = (x2.matmul(&self.scaled_a()?.t()?)? * self.factor())?;
        let d = h.matmul(&self.b.as_tensor().t()?)?;
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        let out = self.b.as_tensor().dim(0)?;
        let inp = self.a.as_tensor().dim(1)?;
        if self.rank() == 0 {
            return Ok(WeightUpdate::Add(Tensor::zeros(
                (out, inp),
                DType::F32,
                self.a.as_tensor().device(),
            )?));
        }
        Ok(WeightUpdate::Add(
            (self.b.as_tensor().matmul(&self.scaled_a()?)? * self.factor())?,
        ))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "lora_A",
                var: &self.a,
            },
            NamedTensor {
                name: "lora_B",
                var: &self.b,
            },
            NamedTensor {
                name: "lora_E",
                var: &self.e,
            },
        ]
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method(
        "ADALORA",
        3,
        6.0,
        crate::config::Targets::List(vec!["fc1".into(), "fc2".into()]),
    );
    c.total_step = Some(10);
    c
}

#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |inp, out, cfg: &AdapterConfig| cfg.init_r.unwrap() * (inp + out + 1)
);
