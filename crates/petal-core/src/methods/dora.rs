//! DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), the `use_dora`
//! option of LoRA. Mirrors PEFT `tuners/lora/dora.py` (`DoraLinearLayer`).
//!
//! The adapted weight is split into a magnitude and a direction:
//! `W' = m ⊙ (W + s B A) / ||W + s B A||` (norms per output row, the norm detached in the
//! gradient as the paper and PEFT do). Forward, from the base output y = x W^T + b:
//! `y + (f - 1) ⊙ (y - b) + f ⊙ s (x A^T) B^T`, `f = m / ||W + s B A||`; with dropout active the
//! base term is recomputed from the dropped x, as in PEFT. Saved as `lora_magnitude_vector`
//! (out,). Initialised to the row norms of W + s B A, so DoRA starts where LoRA does.
//!
//! The norms are taken without forming W + s B A (out x in, what PEFT builds every forward):
//! `||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T`, with
//! `||W_i||^2` kept from the start (W is frozen), so a forward reads W once through the
//! (out, r) product W A^T instead of writing and reading four out x in temporaries, and the
//! norms are kept while A, B and s hold, so unmerged decoding reads W once a token, as LoRA
//! does (`row_norms` is the readable twin the tests hold it to).

use crate::methods::KeptDelta;
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use petal_ops::quant::QFormat;
use petal_ops::Kernels;

pub const MAGNITUDE: &str = "lora_magnitude_vector";

#[derive(Debug)]
pub struct Dora {
    pub m: Var, // (out,)
    /// The frozen W, never copied: the model's own tensor (out, in), f32 or bf16, or a
    /// quantized base's blocks (QDoRA; `quant` their format), read through the quantized
    /// product and never dequantized whole.
    base: Tensor,
    quant: Option<QFormat>,
    base_sq: Tensor,      // ||W_i||^2 (out,), f32
    bias: Option<Tensor>, // frozen b (out,), f32
    /// The norms kept while A, B and s hold (decoding, evaluation, a checkpointed layer's
    /// second forward): a forward compares r (in + out) values instead of reading W.
    kept: KeptDelta,
}

fn row_norms(w: &Tensor) -> Result<Tensor> {
    Ok(w.sqr()?.sum(1)?.sqrt()?)
}

/// `||W_i||^2` of a quantized `w`, a row dequantized at a time.
fn quant_row_sq(w: &Tensor, fmt: QFormat) -> Result<Tensor> {
    let mut sq = Vec::with_capacity(w.dim(0)?);
    petal_ops::quant::for_each_row(w, fmt, |row| {
        sq.push(
            row.iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>() as f32,
        )
    })?;
    Ok(Tensor::from_vec(sq, w.dim(0)?, w.device())?)
}

impl Dora {
    /// DoRA over `w` (out, in), or over the blocks of a quantized base when `quant` is given,
    /// with the adapter's initial `a` (r, in), `b` (out, r) and scaling `s`: m starts as the
    /// row norms of W + s B A.
    pub fn new(
        (w, quant): (&Tensor, Option<QFormat>),
        bias: Option<&Tensor>,
        (a, b, s): (&Tensor, &Tensor, f64),
    ) -> Result<Self> {
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let (base_sq, m) = match quant {
            None => {
                // a bf16 W's f32 copy lives for this call only; m as PEFT takes it: the norms
                // of the sum, bitwise
                let w32 = w.to_dtype(DType::F32)?;
                let m = row_norms(&(&w32 + (b.matmul(a)? * s)?)?)?;
                (w32.sqr()?.sum(1)?, Some(m))
            }
            Some(fmt) => (quant_row_sq(w, fmt)?, None),
        };
        let mut d = Dora {
            m: Var::new(0f32, w.device())?,
            base: w.clone(),
            quant,
            base_sq,
            bias,
            kept: KeptDelta::default(),
        };
        let m = match m {
            Some(m) => m,
            None => d.norms_now(Kernels::REFERENCE, a, b, s)?,
        };
        d.m = Var::from_tensor(&m)?;
        Ok(d)
    }

    /// W A^T (out, r) f32 for a detached `a` (r, in): f32 products over an f32 or quantized W,
    /// bf16 ones (f32 sums) over a bf16 W.
    fn base_times(&self, k: Kernels, a: &Tensor) -> Result<Tensor> {
        let wat = match self.quant {
            None => petal_ops::frozen_linear(k, a, &self.base, None)?.to_dtype(DType::F32)?,
            Some(fmt) => petal_ops::quant::quant_linear_exact(a, &self.base, fmt)?,
        };
        Ok(wat.t()?.contiguous()?)
    }

    /// `||W + s B A||` per row (out,), detached, from `a` (r, in) and `b` (out, r) without the
    /// out x in sum (see the module); the norms kept while A, B and s hold (inference, and a
    /// step's recomputed forward under gradient checkpointing).
    fn norms(&self, ctx: &crate::Ctx, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
        let (a, b) = (a.detach(), b.detach());
        let scale = Tensor::new(&[s as f32], a.device())?;
        let values = Tensor::cat(&[a.flatten_all()?, b.flatten_all()?, scale], 0)?;
        let k = ctx.kernels();
        self.kept
            .get_detached(&values, || self.norms_now(k, &a, &b, s))
    }

    /// `norms`, computed.
    fn norms_now(&self, k: Kernels, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
        let cross = (b * self.base_times(k, a)?)?.sum(1)?; // B_i . (W A^T)_i
        let quad = (b.matmul(&a.matmul(&a.t()?)?)? * b)?.sum(1)?; // B_i (A A^T) B_i^T
        let sq = ((&self.base_sq + (cross * (2.0 * s))?)? + (quad * (s * s))?)?;
        Ok(sq.relu()?.sqrt()?)
    }

    /// The DoRA output with the frozen linear and the LoRA path fused: `lin = x W^T + b + s (x
    /// A^T) B^T` (petal-ops `lora_linear`, or `quant_lora` over a quantized base), then
    /// `f ⊙ (lin - b) + b`, the same as `forward` without dropout, in two passes over the
    /// output with a parallel backward (`scale_last`), where the composed form takes broadcast
    /// products whose gradient for m is a single-threaded column sum.
    /// bf16 activations are scaled in f32 (m's gradient sums over every row) and returned in
    /// bf16.
    pub fn fused_forward(
        &self,
        ctx: &crate::Ctx,
        lin: &Tensor,
        (a, b, s): (&Tensor, &Tensor, f64),
    ) -> Result<Tensor> {
        let k = ctx.kernels();
        let f = self.factor(ctx, a, b, s)?;
        let Some(b) = &self.bias else {
            return Ok(petal_ops::scale_last(k, lin, &f)?); // in lin's dtype, f32 inside
        };
        let dt = lin.dtype();
        let b = b.to_dtype(DType::F32)?;
        let lin = lin.to_dtype(DType::F32)?;
        let out = petal_ops::scale_last(k, &lin.broadcast_sub(&b)?, &f)?.broadcast_add(&b)?;
        Ok(out.to_dtype(dt)?)
    }

    /// f = m / ||W + s B A|| (out,), the norm detached.
    fn factor(&self, ctx: &crate::Ctx, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
        Ok(self.m.as_tensor().div(&self.norms(ctx, a, b, s)?)?)
    }

    /// The DoRA output from the base output `y` (n, out), the (dropped) input `xd` (n, in),
    /// the unscaled LoRA output `lora` = xd A^T B^T (n, out), and the adapter `a`, `b`, `s`.
    pub fn forward(
        &self,
        ctx: &crate::Ctx,
        (y, xd, lora): (&Tensor, &Tensor, &Tensor),
        (a, b, s): (&Tensor, &Tensor, f64),
        dropped: bool,
    ) -> Result<Tensor> {
        let f = self.factor(ctx, a, b, s)?.unsqueeze(0)?; // (1, out)
        let base = match (dropped, &self.bias) {
            (true, _) => crate::linear::frozen_xwt(ctx, xd, &self.base, self.quant)?,
            (false, Some(b)) => y.broadcast_sub(b)?,
            (false, None) => y.clone(),
        };
        let extra = ((f.broadcast_mul(&base)? - &base)? + (f.broadcast_mul(lora)? * s)?)?;
        Ok((y + extra)?)
    }

    /// W' - W = (f - 1) ⊙ W + f ⊙ delta (rows), for merging; `delta` = s B A.
    pub fn update(&self, delta: &Tensor) -> Result<Tensor> {
        if self.quant.is_some() {
            return Err(Error::Unsupported(
                "DoRA over a quantized base merges into its dequantized weights: load the \
                 model with --dtype f32 or bf16 to merge"
                    .into(),
            ));
        }
        let w = &self.base.to_dtype(DType::F32)?;
        let norm = row_norms(&(w + delta.detach())?)?;
        let f = self.m.as_tensor().div(&norm)?.unsqueeze(1)?; // (out, 1)
        Ok(((f.broadcast_mul(w)? - w)? + f.broadcast_mul(delta)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The norms without the out x in sum equal the norms of the sum (`row_norms`), for an
    /// adapter far from its start (B not zero, s B A as large as W's rows), and at the start.
    #[test]
    fn norms_without_the_sum_equal_the_norms_of_the_sum() -> Result<()> {
        let dev = Device::Cpu;
        let (out, inp, r, s) = (24, 40, 3, 2.5);
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
        let a = Tensor::randn(0f32, 0.4, (r, inp), &dev)?;
        for b in [
            Tensor::randn(0f32, 0.4, (out, r), &dev)?,
            Tensor::zeros((out, r), DType::F32, &dev)?,
        ] {
            let delta = (b.matmul(&a)? * s)?;
            let d = Dora::new((&w, None), None, (&a, &b, s))?;
            let want = row_norms(&(&w + &delta)?)?.to_vec1::<f32>()?;
            let got = d
                .norms_now(Kernels::REFERENCE, &a, &b, s)?
                .to_vec1::<f32>()?;
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * w.max(1.0), "{g} vs {w}");
            }
        }
        Ok(())
    }

    /// Over a quantized base (QDoRA), the magnitude starts as, and the norms are, those of the
    /// dequantized W + s B A, from the blocks alone.
    #[test]
    fn over_quantized_blocks_the_norms_are_those_of_the_dequantized_weight() -> Result<()> {
        use petal_ops::quant::{self, GgmlDType};
        let dev = Device::Cpu;
        let (out, inp, r, s) = (20, 64, 2, 1.5);
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
        let a = Tensor::randn(0f32, 0.4, (r, inp), &dev)?;
        let b = Tensor::randn(0f32, 0.4, (out, r), &dev)?;
        for t in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let (q, fmt) = quant::quantize(&w, t)?;
            let deq = quant::dequantize(&q, fmt)?;
            let d = Dora::new((&q, Some(fmt)), None, (&a, &b, s))?;
            let want = row_norms(&(&deq + (b.matmul(&a)? * s)?)?)?.to_vec1::<f32>()?;
            let m = d.m.as_tensor().to_vec1::<f32>()?;
            let b2 = (&b * -0.5)?; // another B: the norms follow it, not the cached ones
            let want2 = row_norms(&(&deq + (b2.matmul(&a)? * s)?)?)?.to_vec1::<f32>()?;
            let got2 = d
                .norms_now(Kernels::REFERENCE, &a, &b2, s)?
                .to_vec1::<f32>()?;
            for (got, want) in [(&m, &want), (&got2, &want2)] {
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!((g - w).abs() <= 1e-5 * w.max(1.0), "{t:?}: {g} vs {w}");
                }
            }
        }
        Ok(())
    }
}
