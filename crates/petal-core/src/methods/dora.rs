//! DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), the `use_dora`
//! option of LoRA. Mirrors PEFT `tuners/lora/dora.py` (`DoraLinearLayer`).
//!
//! The adapted weight is split into a magnitude and a direction:
//! `W' = m ⊙ (W + s B A) / ||W + s B A||` (norms per output row, the norm detached in the
//! gradient as the paper and PEFT do). Forward, from the base output y = x W^T + b:
//! `y + (f - 1) ⊙ (y - b) + f ⊙ s (x A^T) B^T`, `f = m / ||W + s B A||`; with dropout active the
//! base term is recomputed from the dropped x, as in PEFT. Saved as `lora_magnitude_vector`
//! (out,). Initialised to the row norms of W + s B A, so DoRA starts where LoRA does.

use crate::Result;
use candle_core::{DType, Tensor, Var};
use petal_ops::Kernels;

pub const MAGNITUDE: &str = "lora_magnitude_vector";

#[derive(Debug)]
pub struct Dora {
    pub m: Var,           // (out,)
    base: Tensor,         // frozen W (out, in), f32
    bias: Option<Tensor>, // frozen b (out,), f32
}

fn row_norms(w: &Tensor) -> Result<Tensor> {
    Ok(w.sqr()?.sum(1)?.sqrt()?)
}

impl Dora {
    /// `delta` = s B A (out, in) at init.
    pub fn new(w: &Tensor, bias: Option<&Tensor>, delta: &Tensor) -> Result<Self> {
        let base = w.to_dtype(DType::F32)?;
        let m = row_norms(&(&base + delta)?)?;
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        Ok(Dora {
            m: Var::from_tensor(&m)?,
            base,
            bias,
        })
    }

    /// The DoRA output with the frozen linear and the LoRA path fused: `lin = x W^T + b + s (x
    /// A^T) B^T` (petal-ops `lora_linear`), then `f ⊙ (lin - b) + b`, the same as `forward`
    /// without dropout, in two passes over the output with a parallel backward
    /// (`scale_last`), where the composed form takes broadcast products whose gradient for m is
    /// a single-threaded column sum.
    /// bf16 activations are scaled in f32 (m's gradient sums over every row) and returned in
    /// bf16.
    pub fn fused_forward(&self, k: Kernels, lin: &Tensor, delta: &Tensor) -> Result<Tensor> {
        let f = self.factor(delta)?;
        let Some(b) = &self.bias else {
            return Ok(petal_ops::scale_last(k, lin, &f)?); // in lin's dtype, f32 inside
        };
        let dt = lin.dtype();
        let b = b.to_dtype(DType::F32)?;
        let lin = lin.to_dtype(DType::F32)?;
        let out = petal_ops::scale_last(k, &lin.broadcast_sub(&b)?, &f)?.broadcast_add(&b)?;
        Ok(out.to_dtype(dt)?)
    }

    /// f = m / ||W + delta|| (out,), the norm detached.
    fn factor(&self, delta: &Tensor) -> Result<Tensor> {
        let norm = row_norms(&(&self.base + delta.detach())?)?.detach();
        Ok(self.m.as_tensor().div(&norm)?)
    }

    /// The DoRA output from the base output `y` (n, out), the (dropped) input `xd` (n, in),
    /// the unscaled LoRA output `lora` = xd A^T B^T (n, out), and `delta` = s B A.
    pub fn forward(
        &self,
        y: &Tensor,
        xd: &Tensor,
        lora: &Tensor,
        s: f64,
        delta: &Tensor,
        dropped: bool,
    ) -> Result<Tensor> {
        let f = self.factor(delta)?.unsqueeze(0)?; // (1, out)
        let base = if dropped {
            xd.matmul(&self.base.t()?)?
        } else {
            match &self.bias {
                Some(b) => y.broadcast_sub(b)?,
                None => y.clone(),
            }
        };
        let extra = ((f.broadcast_mul(&base)? - &base)? + (f.broadcast_mul(lora)? * s)?)?;
        Ok((y + extra)?)
    }

    /// W' - W = (f - 1) ⊙ W + f ⊙ delta (rows), for merging.
    pub fn update(&self, delta: &Tensor) -> Result<Tensor> {
        let f = self.factor(delta)?.unsqueeze(1)?; // (out, 1)
        Ok(((f.broadcast_mul(&self.base)? - &self.base)? + f.broadcast_mul(delta)?)?)
    }
}
