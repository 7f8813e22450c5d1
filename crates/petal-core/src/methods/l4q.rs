//! L4Q (Jeon et al., ACL 2025, arXiv 2402.04902, "L4Q: Parameter Efficient Quantization-Aware
//! Fine-Tuning on Large Language Models"; no official code): LoRA inside quantization-aware
//! training. The weight the model runs is the quantization of the merged weight,
//! `Ŵ = Q(W + s B A)`, with a learnable step size γ and offset β per group of `group_size`
//! input columns of each row (LSQ+, asymmetric): `Ŵ = γ round(clamp((v - β) / γ, 0, 2^bits - 1))
//! + β`, v = W + s B A. Rounding passes gradients straight through (STE) inside the grid and none
//! outside it; γ and β get LSQ+'s gradients (`q - u` and 0 inside, the clip bound and 1
//! outside). They are learned relative to their min-max init γ0, β0, as `γ = γ0 exp(θ)` and
//! `β = β0 + γ0 φ` with θ = φ = 0 at the start: Adam moves each parameter by about the learning
//! rate a step, which the absolute γ (about 1e-3) could not take, and which this makes a
//! relative change (LSQ's gradient scale does the same for SGD). Ŵ - W is one graph node
//! (the paper's memory-optimised layer) that keeps only A, B and θ, φ: its backward computes
//! v, the grid and the masks again from them and gives A's, B's, θ's and φ's gradients in
//! closed form, so no (out, in) intermediate is held between forward and backward beyond the
//! update itself; a composed twin (`quantized`) is the reference in the tests. After training
//! the adapter is merged and the model is exactly quantized: every group of every adapted row
//! holds at most 2^bits values on its grid, with γ and β kept in f16 (they are rounded to f16
//! in the forward pass too, straight through), so 4-bit groups of 32 are GGUF's Q4_1 blocks
//! (`d = γ`, `m = β`) value for value.
//!
//! Init: B = 0 and γ, β from each group's minimum and maximum, so training starts from the
//! round-to-nearest quantization of W. Decisions the paper leaves open (no code): LSQ+ for the
//! "LoRA-wise LSQ" quantizer, min-max init, the relative parameterisation, the f16 grid. γ0 and
//! β0 are computed again from W when the adapter is loaded (they are not saved). Memory: one
//! (out, in) f32 per adapted module (Ŵ - W, kept for the product's backward) plus the lean
//! node's buffers for one module at a time. petal's own adapter:
//! `peft_type: "L4Q"`, tensors `lora_A.weight`, `lora_B.weight`, `l4q_grid` (θ and φ stacked).

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, QuantGrid, WeightUpdate,
};
use crate::config::{finite, spec, AdapterConfig, Spec};
use crate::methods::{add_dense_delta, dense_linear, param};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

/// θ and φ stacked (2, out, in / group).
pub const GRID: &str = "l4q_grid";

pub struct L4q;

const VARIANTS: [&str; 2] = ["l4q", "lr_qat"];

crate::method_options! {
    /// L4Q's options (petal's own method).
    pub struct L4qOptions {
        /// LoRA rank
        pub r: usize = 8,
        /// LoRA alpha (scale alpha / r)
        pub alpha as "lora_alpha": f64 = 16.0,
        /// Bits of the quantized weight (2 ..= 8)
        pub bits: usize = 4,
        /// Input columns sharing one step size and offset (32: GGUF's Q4_1 blocks at 4 bits)
        pub group_size: usize = 32,
        /// Train the step sizes and offsets (false: the min-max grid stays fixed)
        pub learn_grid: bool = true,
        /// true: B starts at zero (training starts from W rounded to the grid); false: B
        /// random too (a testing switch)
        pub init_weights: bool = true,
        /// l4q: s B A is added to W before quantizing; lr_qat: added in the grid's integer
        /// domain to W's codes, held as 8-bit fixed point (LR-QAT; runs over a quantized base)
        pub variant: String = "l4q".into(),
    }
}

impl AdapterMethod for L4q {
    fn in_peft(&self) -> bool {
        false
    }

    fn peft_type(&self) -> &'static str {
        "L4Q"
    }

    fn options(&self) -> Spec {
        spec::<L4qOptions>()
    }

    fn default_targets(&self) -> Option<&'static str> {
        Some("all-linear") // the whole model is quantized
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: L4qOptions = cfg.options()?;
        finite("lora_alpha", o.alpha, None)?;
        if o.r == 0 {
            return Err(Error::config("adapter config", "r", "must be at least 1"));
        }
        if !(2..=8).contains(&o.bits) {
            return Err(Error::config(
                "adapter config",
                "bits",
                format!("{} is not in 2..=8", o.bits),
            ));
        }
        if !VARIANTS.contains(&o.variant.as_str()) {
            return Err(Error::config(
                "adapter config",
                "variant",
                format!("`{}` is not one of {}", o.variant, VARIANTS.join(", ")),
            ));
        }
        if o.group_size == 0 {
            return Err(Error::config(
                "adapter config",
                "group_size",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn needs_dense_base(&self, cfg: &AdapterConfig) -> Option<&'static str> {
        match cfg.options::<L4qOptions>().map(|o| o.variant) {
            Ok(v) if v == "lr_qat" => None, // W's codes are its own 8-bit copy
            _ => Some("L4Q quantizes W + s B A, which needs W itself (variant lr_qat does not)"),
        }
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        // A, B, the grid, and Ŵ - W, which every layer's product keeps until its backward
        // (LR-QAT: W's 8-bit codes too, a quarter of f32's bytes)
        let o: L4qOptions = cfg.options()?;
        let codes = if o.variant == "lr_qat" {
            dims.full() / 4
        } else {
            0
        };
        Ok(dims.low_rank(o.r) + 2 * (dims.full() / o.group_size as u64) + dims.full() + codes)
    }

    fn shared_values(&self, _cfg: &AdapterConfig, dims: &ModuleDims) -> Result<u64> {
        // the (out, in) buffers the lean node builds for one layer at a time, forward or
        // backward, for the largest layer: a bound
        Ok(6 * dims.full())
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: L4qOptions = cfg.options()?;
        let (out, inp) = (base.out_features, base.in_features);
        if !inp.is_multiple_of(o.group_size) {
            return Err(Error::config(
                path,
                "group_size",
                format!(
                    "{} does not divide the module's {inp} input features",
                    o.group_size
                ),
            ));
        }
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let a = param((o.r, inp), false, &mut g, dev)?;
        let b = param((out, o.r), o.init_weights, &mut g, dev)?;
        let w = match base.quant {
            Some(fmt) => petal_ops::quant::dequantize(base.weight, fmt)?, // for the codes only
            None => base.weight.to_dtype(DType::F32)?,
        };
        let (step0, offset0) = min_max_grid(&w, o.group_size, o.bits)?;
        let levels = ((1usize << o.bits) - 1) as f64;
        let codes = match o.variant.as_str() {
            "lr_qat" => Some(fixed_point_codes(
                &w,
                &step0,
                &offset0,
                o.group_size,
                levels,
                o.bits,
            )?),
            _ => None,
        };
        Ok(Box::new(L4qLayer {
            a,
            b,
            grid: Var::zeros((2, out, inp / o.group_size), DType::F32, dev)?,
            step0,
            offset0,
            w0: base.quant.is_none().then_some(w),
            codes,
            frac: (1usize << (8 - o.bits)) as f64,
            scale: o.alpha / o.r as f64,
            levels,
            group: o.group_size,
            learn_grid: o.learn_grid,
        }))
    }
}

/// LR-QAT's copy of W: its position on the min-max grid, `clamp((W - β0) / γ0, 0, levels)`,
/// as 8-bit fixed point with `8 - bits` fractional bits (u8 codes, `(out, in)`).
fn fixed_point_codes(
    w: &Tensor,
    step0: &Tensor,
    offset0: &Tensor,
    group: usize,
    levels: f64,
    bits: usize,
) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let g = w.reshape((out, inp / group, group))?;
    let c = g
        .broadcast_sub(&offset0.unsqueeze(2)?)?
        .broadcast_div(&step0.unsqueeze(2)?)?
        .clamp(0.0, levels)?;
    let fixed = (c * (1usize << (8 - bits)) as f64)?.round()?;
    Ok(fixed.reshape((out, inp))?.to_dtype(DType::U8)?)
}

/// Each group's round-to-nearest grid: offset = the group's minimum, step = its range over the
/// levels (a tiny step where the group is constant), both (out, in / group) and f16 values.
fn min_max_grid(w: &Tensor, group: usize, bits: usize) -> Result<(Tensor, Tensor)> {
    let (out, inp) = w.dims2()?;
    let g = w.reshape((out, inp / group, group))?;
    let (lo, hi) = (g.min(2)?, g.max(2)?);
    let levels = ((1usize << bits) - 1) as f64;
    let step = ((hi - &lo)? / levels)?.maximum(1e-6)?;
    let f16 = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F16)?.to_dtype(DType::F32)?) };
    Ok((f16(step)?, f16(lo)?))
}

#[derive(Debug)]
struct L4qLayer {
    a: Var,          // (r, in)
    b: Var,          // (out, r)
    grid: Var,       // (2, out, in / group): θ (γ = γ0 exp(θ)), φ (β = β0 + γ0 φ)
    step0: Tensor,   // γ0
    offset0: Tensor, // β0
    /// W (out, in) f32, frozen; none over a quantized base (LR-QAT)
    w0: Option<Tensor>,
    /// LR-QAT: W's codes as 8-bit fixed point (`fixed_point_codes`), `frac` = 2^fraction bits
    codes: Option<Tensor>,
    frac: f64,
    scale: f64,
    levels: f64,
    group: usize,
    learn_grid: bool,
}

/// `t` rounded to f16 values in the forward pass, its gradient passed straight through.
fn f16_ste(t: &Tensor) -> Result<Tensor> {
    let r = t.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
    Ok((t + (r - t)?.detach())?)
}

/// What a layer's quantizer needs, cloned into the lean node's closures.
#[derive(Debug, Clone)]
struct Grid {
    w0: Option<Tensor>,
    codes: Option<Tensor>,
    frac: f64,
    step0: Tensor,
    offset0: Tensor,
    scale: f64,
    levels: f64,
    group: usize,
}

impl Grid {
    /// (γ, β) from θ, φ stacked in `g` (2, out, groups), both f16 values (straight through),
    /// and γ before rounding (for θ's gradient).
    fn params(&self, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let step = (&self.step0 * g.get(0)?.exp()?)?;
        let offset = (&self.offset0 + (&self.step0 * g.get(1)?)?)?;
        Ok((f16_ste(&step)?, f16_ste(&offset)?, step))
    }

    /// (out, groups, group) of a (out, in) tensor.
    fn grouped(&self, t: &Tensor) -> Result<Tensor> {
        let (out, inp) = t.dims2()?;
        Ok(t.reshape((out, inp / self.group, self.group))?)
    }

    /// The position on the grid before clipping, (out, groups, group): `(v - β) / γ` with
    /// v = W + s B A (L4Q), or W's codes plus `s B A` counted in steps (LR-QAT).
    fn position(&self, a: &Tensor, b: &Tensor, step: &Tensor, offset: &Tensor) -> Result<Tensor> {
        let low_rank = (b.matmul(a)? * self.scale)?;
        Ok(match (&self.codes, &self.w0) {
            (Some(c), _) => self.grouped(&((c.to_dtype(DType::F32)? / self.frac)? + low_rank)?)?,
            (None, Some(w0)) => self
                .grouped(&(w0 + low_rank)?)?
                .broadcast_sub(offset)?
                .broadcast_div(step)?,
            (None, None) => return Err(Error::msg("L4Q needs W dense")),
        })
    }

    /// Ŵ - W (or Ŵ where W is not held) (out, in) with no graph, and for backward: the
    /// position u unclipped, the codes q, γ as used (f16 values) and γ unrounded.
    fn delta_parts(&self, a: &Tensor, b: &Tensor, g: &Tensor) -> Result<[Tensor; 5]> {
        let (step, offset, raw) = self.params(g)?;
        let (step, offset) = (step.unsqueeze(2)?, offset.unsqueeze(2)?);
        let u = self.position(a, b, &step, &offset)?;
        let q = u.clamp(0.0, self.levels)?.round()?;
        let w = q
            .broadcast_mul(&step)?
            .broadcast_add(&offset)?
            .flatten_from(1)?;
        let d = match &self.w0 {
            Some(w0) => (w - w0)?,
            None => w,
        };
        Ok([d, u, q, step, raw])
    }

    /// A's, B's and the grid's gradients from the output's gradient `dy` (out, in): STE inside
    /// the grid. L4Q: dŴ/dv = 1, dŴ/dγ = q - u and dŴ/dβ = 0 inside, 0, q and 1 outside
    /// (LSQ+); LR-QAT: dŴ/d(s B A) = γ inside, 0 outside, dŴ/dγ = q and dŴ/dβ = 1 everywhere
    /// (the position does not depend on them); then through the relative parameterisation.
    fn backward(
        &self,
        [a, b, g]: [&Tensor; 3],
        need: [bool; 3],
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let [_, u, q, step, raw] = self.delta_parts(a, b, g)?;
        let g3 = dy.reshape(u.shape())?;
        let inside =
            (u.ge(0.0)?.to_dtype(DType::F32)? * u.le(self.levels)?.to_dtype(DType::F32)?)?;
        let lr_qat = self.codes.is_some();
        let gv = match lr_qat {
            false => (&g3 * &inside)?,
            true => (&g3 * &inside)?.broadcast_mul(&step)?,
        };
        let gv = gv.flatten_from(1)?;
        let da = need[0]
            .then(|| b.t()?.matmul(&gv)? * self.scale)
            .transpose()?;
        let db = need[1]
            .then(|| gv.matmul(&a.t()?)? * self.scale)
            .transpose()?;
        let dg = need[2]
            .then(|| -> Result<Tensor> {
                let (dstep, doff) = match lr_qat {
                    false => ((&g3 * (&q - (&u * &inside)?)?)?, (&g3 * (1.0 - &inside)?)?),
                    true => ((&g3 * &q)?, g3.clone()),
                };
                let dtheta = (dstep.sum(2)? * raw)?;
                let dphi = (doff.sum(2)? * &self.step0)?;
                Ok(Tensor::stack(&[dtheta, dphi], 0)?)
            })
            .transpose()?;
        Ok([da, db, dg])
    }
}

impl L4qLayer {
    fn spec(&self) -> Grid {
        Grid {
            w0: self.w0.clone(),
            codes: self.codes.clone(),
            frac: self.frac,
            step0: self.step0.clone(),
            offset0: self.offset0.clone(),
            scale: self.scale,
            levels: self.levels,
            group: self.group,
        }
    }

    fn grid_var(&self) -> Tensor {
        match self.learn_grid {
            true => self.grid.as_tensor().clone(),
            false => self.grid.as_tensor().detach(),
        }
    }

    /// The readable twin: Ŵ = γ round(clamp((W + s B A - β) / γ, 0, levels)) + β (out, in)
    /// composed of candle's ops, rounding straight through (autograd keeps every
    /// intermediate).
    #[cfg(test)]
    fn quantized(&self) -> Result<Tensor> {
        let spec = self.spec();
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        let (step, offset, _) = spec.params(&self.grid_var())?;
        let (step, offset) = (step.unsqueeze(2)?, offset.unsqueeze(2)?);
        // clipped, then rounded (LSQ): values past the grid pass no gradient on
        let u = spec
            .position(a, b, &step, &offset)?
            .clamp(0.0, self.levels)?;
        let q = (&u + (u.round()? - &u)?.detach())?;
        Ok(q.broadcast_mul(&step)?
            .broadcast_add(&offset)?
            .flatten_from(1)?)
    }

    /// Ŵ - W (out, in) as one graph node keeping A, B and the grid only (Ŵ itself where W is
    /// not held: LR-QAT over a quantized base).
    fn delta(&self) -> Result<Tensor> {
        let (fwd, bwd) = (self.spec(), self.spec());
        let g = self.grid_var();
        Ok(petal_ops::lean::lean3(
            [self.a.as_tensor(), self.b.as_tensor(), &g],
            move |[a, b, g]| {
                let [d, ..] = fwd.delta_parts(a, b, g).map_err(candle_core::Error::msg)?;
                Ok(d)
            },
            move |xs, need, _, dy| bwd.backward(xs, need, dy).map_err(candle_core::Error::msg),
        )?)
    }
}

impl L4qLayer {
    fn refuse_without_w(&self, what: &str) -> Result<()> {
        match self.w0 {
            Some(_) => Ok(()),
            None => Err(Error::Unsupported(format!(
                "LR-QAT over a quantized base {what}: load the model dense (--dtype f32) for it"
            ))),
        }
    }
}

impl AdapterLayer for L4qLayer {
    fn forward(&self, x: &Tensor, y: Tensor, _ctx: &crate::Ctx) -> Result<Tensor> {
        self.refuse_without_w("runs as the module's only adapter")?;
        add_dense_delta(x, y, &self.delta()?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        dense_linear(ctx.kernels(), x, w, b, || Ok(Some(self.delta()?)))
    }

    /// LR-QAT over a quantized base: `x Ŵ^T + b` from W's own 8-bit codes (the base's blocks
    /// are not read).
    fn fused_forward_quant(
        &self,
        x: &Tensor,
        _w: &Tensor,
        _fmt: petal_ops::quant::QFormat,
        b: Option<&Tensor>,
        _ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        let run = || -> Result<Tensor> {
            let what = self.delta()?; // Ŵ: no W is held
            let dt = x.dtype();
            let inp = x.dim(candle_core::D::Minus1)?;
            let x2 = x
                .reshape((x.elem_count() / inp, inp))?
                .to_dtype(DType::F32)?;
            let mut y = x2.matmul(&what.t()?)?;
            if let Some(b) = b {
                y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
            }
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = what.dim(0)?;
            }
            Ok(y.reshape(dims)?.to_dtype(dt)?)
        };
        self.w0.is_none().then(run)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        self.refuse_without_w("is merged into the dense model")?;
        Ok(WeightUpdate::Add(self.delta()?.detach()))
    }

    fn grid(&self) -> Result<Option<QuantGrid>> {
        let g = self.grid.as_tensor().detach();
        let spec = self.spec();
        let [_, _, q, step, _] = spec.delta_parts(self.a.as_tensor(), self.b.as_tensor(), &g)?;
        let (_, offset, _) = spec.params(&g)?;
        Ok(Some(QuantGrid {
            codes: q.flatten_from(1)?,
            step: step.squeeze(2)?,
            offset,
            bits: (self.levels as usize + 1).trailing_zeros() as usize,
        }))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "lora_A.weight",
                var: &self.a,
            },
            NamedTensor {
                name: "lora_B.weight",
                var: &self.b,
            },
            NamedTensor {
                name: GRID,
                var: &self.grid,
            },
        ]
    }
}

#[cfg(test)]
#[path = "l4q_tests.rs"]
mod tests;
