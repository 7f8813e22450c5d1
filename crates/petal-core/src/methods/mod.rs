//! One file per method; shared building blocks below.

pub mod adalora;
pub mod bias;
pub mod bitfit;
pub mod boft;
pub mod chain_of_lora;
pub mod dora;
pub mod fedins;
pub mod fish;
mod grad_mask;
pub mod ia3;
pub mod intrinsic;
pub mod kradapter;
pub mod ks_lottery;
pub mod kv_prompt;
pub mod l4q;
pub mod ln_tuning;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod mixture;
pub mod modules_to_save;
pub mod molora;
pub mod mos;
pub mod mov;
pub mod oft;
mod orthogonal;
pub mod p_tuning;
pub mod paca;
pub mod palora;
pub mod pasta;
pub mod prefix_tuning;
pub mod prompt_tuning;
pub mod quanta;
pub mod road;
pub mod rosa;
pub mod rps;
pub mod sira;
pub mod ssf;
pub mod trainable_tokens;
pub mod vera;

use crate::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use petal_ops::Kernels;
use rand::Rng;

/// x as (rows, in) f32, and the shape to give the output.
pub(crate) fn flat_input(x: &Tensor) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let inp = xf.dim(D::Minus1)?;
    Ok(xf.reshape((xf.elem_count() / inp, inp))?)
}

/// Replace input-side tensor `name` held in `var` (loading, text init), checking its shape.
pub(crate) fn set_var(var: &Var, name: &str, t: &Tensor) -> Result<()> {
    let want = var.as_tensor().dims();
    if t.dims() != want {
        return Err(crate::Error::Shape {
            tensor: name.into(),
            expected: want.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(var.set(&t.to_dtype(var.as_tensor().dtype())?)?)
}

/// The model sizes an input-side adapter recorded when it was made, as (key, recorded, the
/// model's): a recorded size the model does not have is refused naming its key.
pub(crate) fn check_recorded(sizes: &[(&str, Option<usize>, usize)]) -> Result<()> {
    for &(k, v, want) in sizes {
        if let Some(v) = v.filter(|&v| v != want) {
            return Err(crate::Error::config(
                "adapter config",
                k,
                format!("is {v}, but the model has {want}"),
            ));
        }
    }
    Ok(())
}

/// `scale (x A^T) B^T` for x (rows, in), A (r, in), B (out, r): the composed low-rank term of
/// the LoRA-shaped methods (Chain of LoRA, RoSA, MoS).
pub(crate) fn low_rank(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?)
}

/// Rank for one module: `r`, or the `rank_pattern` entry whose key matches its path as
/// `(.*\.)?(key)$`.
pub(crate) fn rank_for(
    r: usize,
    pattern: &std::collections::BTreeMap<String, crate::config::RankValue>,
    path: &str,
) -> usize {
    crate::target::pattern_value(pattern, path)
        .map(|v| v.rank())
        .unwrap_or(r)
}

/// Alpha for one module, honouring `alpha_pattern`.
pub(crate) fn alpha_for(
    alpha: f64,
    pattern: &std::collections::BTreeMap<String, f64>,
    path: &str,
) -> f64 {
    crate::target::pattern_value(pattern, path).unwrap_or(alpha)
}

/// Whether an init switch asks for the non-zero variant (`false`, PEFT's testing switch).
pub(crate) fn init_nonzero(init: &crate::config::InitWeights) -> bool {
    *init == crate::config::InitWeights::Flag(false)
}

/// The checks the LyCORIS-family options share (LoHa, LoKr).
pub(crate) fn check_lycoris(
    r: usize,
    rank_dropout: f64,
    module_dropout: f64,
    init: &crate::config::InitWeights,
) -> Result<()> {
    if r == 0 {
        return Err(crate::Error::config(
            "adapter config",
            "r",
            "must be at least 1",
        ));
    }
    crate::config::probability("rank_dropout", rank_dropout)?;
    crate::config::probability("module_dropout", module_dropout)?;
    if let crate::config::InitWeights::Named(n) = init {
        return Err(crate::config::unsupported("init_weights", format!("{n:?}")));
    }
    Ok(())
}

/// The checks of methods that leave the bias alone and read W as (out, in) (OFT, BOFT, …).
pub(crate) fn check_plain_base(
    bias: &str,
    fan_in_fan_out: bool,
    init: &crate::config::InitWeights,
) -> Result<()> {
    if bias != "none" {
        return Err(crate::config::unsupported("bias", format!("{bias:?}")));
    }
    if fan_in_fan_out {
        return Err(crate::config::unsupported("fan_in_fan_out", true));
    }
    if let crate::config::InitWeights::Named(n) = init {
        return Err(crate::config::unsupported("init_weights", format!("{n:?}")));
    }
    Ok(())
}

/// torch's `kaiming_uniform_(a = sqrt(5))` on a (rows, cols) matrix: U(±1/sqrt(cols)).
pub(crate) fn kaiming_uniform(
    shape: (usize, usize),
    g: &mut impl Rng,
    dev: &Device,
) -> Result<Tensor> {
    let bound = 1.0 / (shape.1 as f64).sqrt();
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| g.gen_range(-bound..bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// N(0, std^2) samples by Box-Muller (no extra dependency).
pub(crate) fn normal(
    shape: (usize, usize),
    std: f64,
    g: &mut impl Rng,
    dev: &Device,
) -> Result<Tensor> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            let (u1, u2): (f64, f64) = (g.gen::<f64>().max(1e-12), g.gen());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// A trainable matrix: kaiming-uniform, or zeros.
pub(crate) fn param(
    shape: (usize, usize),
    zero: bool,
    g: &mut impl Rng,
    dev: &Device,
) -> Result<Var> {
    let t = if zero {
        Tensor::zeros(shape, DType::F32, dev)?
    } else {
        kaiming_uniform(shape, g, dev)?
    };
    Ok(Var::from_tensor(&t)?)
}

/// A dense update made from a few trained values (intrinsic dimension's θ, RPS's shared
/// array, QuanTA's gates), kept for inference: made anew in training (its graph reaches the
/// values) and then dropped, so it is held only between an evaluation and the next step; at
/// inference, kept while the values stay the same (comparing them costs far less than making
/// out·in values).
#[derive(Debug, Default)]
pub(crate) struct KeptDelta(std::sync::Mutex<Option<(Vec<f32>, Tensor)>>);

impl KeptDelta {
    /// Drop the kept update (a training forward that does not ask for it: the values move).
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether an update is kept.
    #[cfg(test)]
    pub fn holds(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// A value outside the graph (`make`'s result is detached) from the trained `values`,
    /// kept under any `ctx` while they stay the same: DoRA's norms, which a step with gradient
    /// checkpointing asks for twice with the same A and B.
    pub fn get_detached(
        &self,
        values: &Tensor,
        make: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.kept_or(values, || Ok(make()?.detach()))
    }

    /// The update under `ctx`, from the trained `values` by `make`.
    pub fn get(
        &self,
        ctx: &crate::Ctx,
        values: &Tensor,
        make: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        if ctx.is_train() {
            self.clear();
            return make();
        }
        // not detached: a gradient asked of an inference forward still reaches the values
        self.kept_or(values, make)
    }

    /// The kept value while `values` stay the same, else `make`'s, kept.
    fn kept_or(&self, values: &Tensor, make: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now: Vec<f32> = values.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        if let Some((_, d)) = kept.as_ref().filter(|(at, _)| *at == now) {
            return Ok(d.clone());
        }
        let d = make()?;
        *kept = Some((now, d.clone()));
        Ok(d)
    }
}

/// `y + x dW^T` for methods that materialise dW (out, in) in f32, as PEFT's LyCORIS layers do.
/// A bf16 x (bf16 activations, a GPU's bf16 model) goes through one graph node that keeps x
/// itself rather than its f32 copy: dx = dy dW, ddW = dy^T x, dy passes through.
pub(crate) fn add_dense_delta(x: &Tensor, y: Tensor, delta: &Tensor) -> Result<Tensor> {
    let composed = |x: &Tensor, y: &Tensor, delta: &Tensor| -> candle_core::Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let inp = xf.dim(candle_core::D::Minus1)?;
        let x2 = xf.reshape((xf.elem_count() / inp, inp))?;
        let d = x2
            .matmul(&delta.t()?)?
            .reshape(y.shape())?
            .to_dtype(y.dtype())?;
        y + d
    };
    if x.dtype() == DType::F32 {
        return Ok(composed(x, &y, delta)?);
    }
    Ok(petal_ops::lean::lean3(
        [x, delta, &y],
        |[x, delta, y]| composed(x, y, delta),
        move |[x, delta, _], need, _, dy| {
            let (out, inp) = delta.dims2()?;
            let n = x.elem_count() / inp;
            let g = dy.reshape((n, out))?.to_dtype(DType::F32)?;
            let dx = need[0]
                .then(|| g.matmul(delta)?.to_dtype(x.dtype())?.reshape(x.shape()))
                .transpose()?;
            let dd = need[1]
                .then(|| g.t()?.matmul(&x.reshape((n, inp))?.to_dtype(DType::F32)?))
                .transpose()?;
            Ok([dx, dd, need[2].then(|| dy.clone())])
        },
    )?)
}

/// `x (W + dW)^T + b` in one matrix product, for methods whose update is a dense dW (LoHa,
/// LoKr, KRAdapter, QuanTA, …): the sum is built once per call (W frozen, so its gradient goes
/// to dW alone), saving the separate product `x dW^T` forward and its input gradient backward
/// (three large products per step instead of five). One graph node over x and dW that keeps
/// only them: backward rebuilds `W + dW` for `dx = dy (W + dW)` and takes `ddW = dy^T x`, so no
/// (out, in) sum is held from forward to backward, nor anything of size (tokens, out) but the
/// output. On any device for f32 x and W; `None` otherwise (a bf16 model or bf16 activations).
pub(crate) fn dense_linear(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    delta: impl FnOnce() -> Result<Option<Tensor>>,
) -> Option<Result<Tensor>> {
    if !(x.dtype() == DType::F32 && w.dtype() == DType::F32) {
        return None;
    }
    let run = || -> Result<Tensor> {
        let Some(delta) = delta()? else {
            return Ok(petal_ops::frozen_linear(k, x, w, b)?); // module dropout: this call skips
        };
        let inp = x.dim(candle_core::D::Minus1)?;
        let mut dims = x.dims().to_vec();
        let x2 = x.reshape((x.elem_count() / inp, inp))?;
        let w0 = w.detach();
        let mut y = petal_ops::lean::lean2(
            [&x2, &delta],
            |[x2, delta]| x2.matmul(&(&w0 + delta)?.t()?),
            {
                let w0 = w.detach();
                move |[x2, delta], need, _, dy| {
                    let dx = need[0].then(|| dy.matmul(&(&w0 + delta)?)).transpose()?;
                    let dd = need[1].then(|| dy.t()?.matmul(x2)).transpose()?;
                    Ok([dx, dd])
                }
            },
        )?;
        if let Some(b) = b {
            y = y.broadcast_add(b)?;
        }
        *dims.last_mut().unwrap_or(&mut 0) = w.dim(0)?;
        Ok(y.reshape(dims)?)
    };
    Some(run())
}

/// LyCORIS training-time dropout, as PEFT's LoHa and LoKr apply it. `module`: with probability
/// p the adapter is skipped for the whole forward call. `rank`: each output row of dW is zeroed
/// with probability p, and (LoHa always, LoKr with `rank_dropout_scale`) the kept rows are
/// divided by the kept fraction. Draws come from petal's per-step generator (`rng`), so a
/// resumed run repeats them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LycorisDropout {
    pub rank: f64,
    pub module: f64,
    pub scale: bool,
}

impl LycorisDropout {
    /// Whether this call skips the adapter (training only).
    pub fn skip(&self, ctx: &crate::Ctx) -> bool {
        ctx.is_train() && self.module > 0.0 && unit(ctx.next_seed()) <= self.module
    }

    /// This call's dW: `None` when module dropout skips the adapter, else dW with rows dropped
    /// (the draws in this order, so every forward form repeats them).
    pub fn apply(
        &self,
        ctx: &crate::Ctx,
        dw: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Option<Tensor>> {
        if self.skip(ctx) {
            return Ok(None);
        }
        Ok(Some(self.rows(dw()?, ctx)?))
    }

    /// dW with rows dropped (training only).
    pub fn rows(&self, dw: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        if !(ctx.is_train() && self.rank > 0.0) {
            return Ok(dw);
        }
        let out = dw.dim(0)?;
        let mut state = ctx.next_seed();
        let mut keep: Vec<f32> = (0..out)
            .map(|_| {
                state = crate::rng::splitmix(state);
                (unit(state) > self.rank) as u8 as f32
            })
            .collect();
        let kept = keep.iter().sum::<f32>();
        if self.scale && kept > 0.0 {
            let mean = kept / out as f32;
            keep.iter_mut().for_each(|k| *k /= mean);
        }
        let mask = Tensor::from_vec(keep, (out, 1), dw.device())?;
        Ok(dw.broadcast_mul(&mask)?)
    }
}

/// A u64 mapped to [0, 1).
fn unit(v: u64) -> f64 {
    (v >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdapterConfig;

    #[test]
    fn a_dense_delta_on_bf16_activations_matches_the_f32_composition_in_value_and_every_gradient() {
        use petal_ops::testing::{max_rel, projected_grads, rand};
        let bf = DType::BF16;
        let var = |t: Tensor| Var::from_tensor(&t).unwrap();
        let (x, y) = (
            var(rand(&[2, 3, 5], 1).to_dtype(bf).unwrap()),
            var(rand(&[2, 3, 4], 2).to_dtype(bf).unwrap()),
        );
        let d = var(rand(&[4, 5], 3)); // dW stays f32
                                       // the reference: the same rounded activations in f32, f32 arithmetic throughout
        let f32v = |v: &Var| var(v.as_tensor().to_dtype(DType::F32).unwrap());
        let (xr, yr) = (f32v(&x), f32v(&y));
        let out = add_dense_delta(x.as_tensor(), y.as_tensor().clone(), d.as_tensor()).unwrap();
        assert_eq!(out.dtype(), bf);
        let want = (yr.as_tensor()
            + xr.as_tensor()
                .matmul(
                    &d.as_tensor()
                        .t()
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap()
                        .repeat((2, 1, 1))
                        .unwrap(),
                )
                .unwrap())
        .unwrap();
        let out = out.to_dtype(DType::F32).unwrap();
        assert!(
            max_rel(&out, &want) < 8e-3,
            "values: {}",
            max_rel(&out, &want)
        );
        let proj = rand(&[2, 3, 4], 4);
        let (g, gr) = (projected_grads(&out, &proj), projected_grads(&want, &proj));
        for (a, b, what) in [(&x, &xr, "dx"), (&y, &yr, "dy"), (&d, &d, "dW")] {
            let ga = g.get(a.as_tensor()).unwrap();
            assert_eq!(ga.dtype(), a.dtype(), "{what} in its input's dtype");
            let rel = max_rel(
                &ga.to_dtype(DType::F32).unwrap(),
                gr.get(b.as_tensor()).unwrap(),
            );
            assert!(rel < 8e-3, "{what}: {rel}");
        }
    }

    #[test]
    fn fused_loha_and_lokr_draw_the_same_rank_and_module_dropout_as_the_composed_form() {
        for method in ["LOHA", "LOKR"] {
            for (rank, module) in [(0.3, 0.0), (0.3, 0.5), (0.0, 0.9)] {
                let mut c =
                    AdapterConfig::for_method(method, 2, 3.0, crate::testing::toy_targets());
                c.set("rank_dropout", rank).unwrap();
                c.set("module_dropout", module).unwrap();
                crate::testing::check_fused_equals_composed(&c);
            }
        }
    }

    #[test]
    fn module_dropout_skips_about_p_of_training_calls_and_none_in_eval() {
        let ctx = crate::Ctx::train(7);
        let d = LycorisDropout {
            rank: 0.0,
            module: 0.3,
            scale: false,
        };
        let skipped = (0..4000).filter(|_| d.skip(&ctx)).count();
        assert!((skipped as f64 / 4000.0 - 0.3).abs() < 0.03, "{skipped}");
        assert!((0..100).all(|_| !d.skip(&crate::Ctx::eval())));
    }

    #[test]
    fn rank_dropout_zeroes_whole_rows_and_rescales_the_kept_ones_to_the_same_mean() {
        let ctx = crate::Ctx::train(3);
        let dw = Tensor::ones((1000, 3), DType::F32, &Device::Cpu).unwrap();
        let d = LycorisDropout {
            rank: 0.25,
            module: 0.0,
            scale: true,
        };
        let out = d.rows(dw.clone(), &ctx).unwrap().to_vec2::<f32>().unwrap();
        let zero = out.iter().filter(|r| r.iter().all(|&v| v == 0.0)).count();
        assert!((zero as f64 / 1000.0 - 0.25).abs() < 0.04, "{zero}");
        assert!(
            out.iter().all(|r| r[0] == r[1] && r[1] == r[2]),
            "whole rows"
        );
        let mean: f32 = out.iter().map(|r| r[0]).sum::<f32>() / 1000.0;
        assert!((mean - 1.0).abs() < 1e-4, "{mean}");
        let eval = d.rows(dw.clone(), &crate::Ctx::eval()).unwrap();
        assert_eq!(eval.to_vec2::<f32>().unwrap(), dw.to_vec2::<f32>().unwrap());
    }
}
