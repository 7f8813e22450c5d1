//! Fused CPU kernels with hand-written backward passes: RMSNorm, softmax (plain and scaled
//! causal), SwiGLU and the mixed-dtype residual add (RoPE: `rope.rs`). Each replaces a chain
//! of composed candle ops (one buffer and one pass per op, plus the same again in backward) by
//! one pass per direction. Rows run in parallel (rayon). Inputs are f32 or bf16 activations; the arithmetic is f32 either way and
//! results are stored in the input's dtype.

use crate::cpu::{act_in, act_out, fast_act_ok, last_dim};
use crate::cuda::Family;
use crate::nn;
use crate::Kernels;
use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// y[row] = f(row index, x[row]) over the rows (last dim) of one contiguous input; y in `out`.
pub(crate) fn map_rows(
    s: &CpuStorage,
    l: &Layout,
    out: DType,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) -> Result<(CpuStorage, Shape)> {
    let (x, d) = (act_in(s, l)?, last_dim(l));
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(r, (y, x))| f(r, x, y));
    Ok((act_out(y, out)?, l.shape().clone()))
}

/// y[row] = f(a[row], b[row]) over the rows of two inputs of the same shape.
fn map_rows2(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Result<(CpuStorage, Shape)> {
    let (a, b, d) = (act_in(s1, l1)?, act_in(s2, l2)?, last_dim(l1));
    let mut y = vec![0f32; a.len()];
    y.par_chunks_mut(d)
        .zip(a.par_chunks(d).zip(b.par_chunks(d)))
        .for_each(|(y, (a, b))| f(a, b, y));
    Ok((act_out(y, s1.dtype())?, l1.shape().clone()))
}

// ---------------------------------------------------------------- RMSNorm (frozen weight)

struct RmsNorm {
    w: Vec<f32>,
    eps: f32,
    out: DType,
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + eps).sqrt()
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "petal-rms-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_rows(s, l, self.out, |_, x, y| {
            let r = inv_rms(x, self.eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(&self.w) {
                *y = x * r * w;
            }
        })
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = RmsNormBwd {
            w: self.w.clone(),
            eps: self.eps,
        };
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

/// dx_j = r (w_j g_j) - r^3 x_j mean_i(w_i g_i x_i), r = 1/sqrt(mean(x^2) + eps)
struct RmsNormBwd {
    w: Vec<f32>,
    eps: f32,
}

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "petal-rms-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_rows2(s1, l1, s2, l2, |x, g, dx| {
            let r = inv_rms(x, self.eps);
            let dot: f32 = x
                .iter()
                .zip(g)
                .zip(&self.w)
                .map(|((x, g), w)| x * g * w)
                .sum::<f32>()
                / x.len() as f32;
            for (((o, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(&self.w) {
                *o = r * w * g - r * r * r * x * dot;
            }
        })
    }
}

/// RMSNorm's input gradient for a frozen weight, in f32: with r = 1 / sqrt(mean(x^2) + eps) and
/// n = x r, dx = r (dn - n mean(dn n)) where dn = dy w.
fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f64, dy: &Tensor) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let n = xf.broadcast_mul(&r)?;
    let dn = dy
        .to_dtype(DType::F32)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let m = (&dn * &n)?.mean_keepdim(D::Minus1)?;
    (dn - n.broadcast_mul(&m)?)?
        .broadcast_mul(&r)?
        .to_dtype(x.dtype())
}

/// RMSNorm, returned in the weight's dtype (an f32 residual stream normalised into bf16
/// activations takes one pass): fused on CPU (f32 or bf16) for a frozen weight `w`, composed
/// otherwise (one lean graph node for a frozen weight).
pub fn rms_norm(k: Kernels, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    // A trainable weight (LN tuning) needs its gradient: the composed path computes it.
    if w.track_op() {
        return nn::rms_norm_reference(x, w, eps)?.to_dtype(w.dtype());
    }
    if crate::cuda::usable(k, x, Family::Norm) && crate::cuda::usable(k, w, Family::Norm) {
        return crate::cuda::rms_norm(x, w, eps);
    }
    if !fast_act_ok(k, x) || !fast_act_ok(k, w) {
        let wc = w.clone();
        return crate::lean::lean(
            x,
            |x| nn::rms_norm_reference(x, w, eps)?.to_dtype(w.dtype()),
            move |x, _, dy| rms_norm_backward(x, &wc, eps, dy),
        );
    }
    let op = RmsNorm {
        w: w.to_dtype(DType::F32)?.to_vec1()?,
        eps: eps as f32,
        out: w.dtype(),
    };
    x.contiguous()?.apply_op1(op)
}

// ---------------------------------------------------------------- softmax over the last dim

/// softmax(scale * x) over the last dim; with `causal = Some((t, offset))` the rows are groups
/// of t queries at positions offset.., and keys after each query get probability 0 (no mask
/// tensor, no pass to add it, no gradient computed for it).
struct Softmax {
    scale: f32,
    causal: Option<(usize, usize)>,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "petal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l);
        map_rows(s, l, s.dtype(), |r, x, y| {
            let n = self
                .causal
                .map(|(t, off)| (r % t + off + 1).min(d))
                .unwrap_or(d);
            let m = crate::vmath::max(&x[..n]);
            let z = if m == f32::NEG_INFINITY {
                y[..n].iter_mut().for_each(|v| *v = 0.0);
                0.0
            } else {
                // exp(scale (x - m)) = exp(scale x - scale m)
                for (y, x) in y[..n].iter_mut().zip(x) {
                    *y = x * self.scale;
                }
                crate::vmath::exp_sub_sum(&mut y[..n], m * self.scale)
            };
            let inv = if z > 0.0 { 1.0 / z } else { 0.0 };
            y[..n].iter_mut().for_each(|v| *v *= inv);
        })
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &g.contiguous()?,
            &SoftmaxBwd { scale: self.scale },
        )?))
    }
}

/// dx = scale * y * (g - sum(g * y))
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "petal-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_rows2(s1, l1, s2, l2, |y, g, dx| {
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((o, y), g) in dx.iter_mut().zip(y).zip(g) {
                *o = self.scale * y * (g - dot);
            }
        })
    }
}

pub fn softmax_last_dim(k: Kernels, x: &Tensor) -> Result<Tensor> {
    if crate::cuda::usable(k, x, Family::Softmax) {
        return crate::cuda::softmax(x, 1.0, None);
    }
    if !fast_act_ok(k, x) {
        return crate::lean::lean(x, nn::softmax_last_dim_reference, |_, y, dy| {
            crate::lean::softmax_backward(y, dy)
        });
    }
    x.contiguous()?.apply_op1(Softmax {
        scale: 1.0,
        causal: None,
    })
}

/// Attention probabilities softmax(scale * scores + causal mask) for scores (.., R, T) whose
/// rows are R/t consecutive groups of t queries at positions offset..offset + t.
pub fn causal_softmax(
    k: Kernels,
    scores: &Tensor,
    scale: f64,
    t: usize,
    offset: usize,
) -> Result<Tensor> {
    if crate::cuda::usable(k, scores, Family::Softmax) {
        return crate::cuda::softmax(scores, scale, Some((t, offset)));
    }
    if !fast_act_ok(k, scores) {
        let composed = |scores: &Tensor| {
            let dims = scores.dims().to_vec();
            let (r, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
            let lead: usize = dims[..dims.len() - 2].iter().product();
            let mask = nn::causal_mask(t, offset, scores.dtype(), scores.device())?;
            let grouped = (scores * scale)?
                .reshape((lead * r / t, t, tk))?
                .broadcast_add(&mask)?;
            nn::softmax_last_dim_reference(&grouped.reshape(dims)?)
        };
        // the mask adds constants: only the scale reaches the scores' gradient
        return crate::lean::lean(scores, composed, move |_, y, dy| {
            crate::lean::softmax_backward(y, dy)? * scale
        });
    }
    scores.contiguous()?.apply_op1(Softmax {
        scale: scale as f32,
        causal: Some((t, offset)),
    })
}

// ---------------------------------------------------------------- SwiGLU: silu(g) * u

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "petal-swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_rows2(s1, l1, s2, l2, |g, u, y| {
            crate::vmath::sigmoid(g, y);
            for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                *y *= g * u;
            }
        })
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op2_no_bwd(&u.contiguous()?, &SwiGluBwd(dy.contiguous()?))?; // (2, ..)
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// dg = dy * u * s(g) (1 + g (1 - s(g))), du = dy * g s(g); stacked as (2, ..).
struct SwiGluBwd(Tensor);

impl CustomOp2 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "petal-swiglu-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (act_in(s1, l1)?, act_in(s2, l2)?);
        let (st, dl) = self.0.storage_and_layout();
        let candle_core::Storage::Cpu(st) = &*st else {
            candle_core::bail!("petal-swiglu-bwd: cpu only")
        };
        let dy = act_in(st, dl)?;
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let o = c * 4096;
                let n = dg.len();
                crate::vmath::sigmoid(&g[o..o + n], du); // du holds s(g) first
                for i in 0..n {
                    let (gv, uv, d, s) = (g[o + i], u[o + i], dy[o + i], du[i]);
                    dg[i] = d * uv * s * (1.0 + gv * (1.0 - s));
                    du[i] = d * gv * s;
                }
            });
        let mut dims = vec![2];
        dims.extend(l1.shape().dims());
        Ok((act_out(out, s1.dtype())?, Shape::from(dims)))
    }
}

pub fn swiglu(k: Kernels, g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if crate::cuda::usable(k, g, Family::Swiglu) && g.dims() == u.dims() && g.dtype() == u.dtype() {
        return crate::cuda::swiglu(g, u);
    }
    if g.dims() != u.dims() || g.dtype() != u.dtype() {
        return g.silu()? * u;
    }
    if !fast_act_ok(k, g) {
        // one node that keeps g, u and the output, not silu(g)
        return crate::lean::lean2(
            [g, u],
            |[g, u]| g.silu()? * u,
            |[g, u], need, _, dy| {
                let dy = dy.to_dtype(g.dtype())?;
                let s = (g.neg()?.exp()? + 1.0)?.recip()?; // sigmoid(g)
                let dg = need[0]
                    .then(|| {
                        let ds = ((g * (1.0 - &s)?)? + 1.0)?; // 1 + g (1 - s)
                        (&dy * u)? * (&s * ds)?
                    })
                    .transpose()?;
                let du = need[1].then(|| &dy * (g * &s)?).transpose()?;
                Ok([dg, du])
            },
        );
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

// ---------------------------------------------------------------- residual add

/// `x + a` for an f32 residual stream `x` and a bf16 block output `a`: sum in f32, no f32 copy
/// of `a`; backward hands the gradient to `x` as it is and to `a` rounded to bf16.
struct ResidualAdd;

impl CustomOp2 for ResidualAdd {
    fn name(&self) -> &'static str {
        "petal-residual-add"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a) = (crate::cpu::f32s(s1, l1)?, crate::cpu::bf16s(s2, l2)?);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14).zip(a.par_chunks(1 << 14)))
            .for_each(|(y, (x, a))| {
                for ((y, x), a) in y.iter_mut().zip(x).zip(a) {
                    *y = x + crate::bf16::from_bf16(*a);
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        a: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.clone()), Some(crate::cpu::cast(g, a.dtype())?)))
    }
}

/// The residual `x + a`, in x's dtype; an f32 `x` with a bf16 `a` adds without widening `a`
/// into a tensor of its own.
pub fn residual_add(k: Kernels, x: &Tensor, a: &Tensor) -> Result<Tensor> {
    if x.dtype() == a.dtype() {
        return x + a;
    }
    let mixed = x.dtype() == DType::F32 && a.dtype() == DType::BF16;
    if !(mixed && fast_act_ok(k, x) && fast_act_ok(k, a)) || x.dims() != a.dims() {
        return x + a.to_dtype(x.dtype())?;
    }
    x.contiguous()?.apply_op2(&a.contiguous()?, ResidualAdd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rand, same};

    #[test]
    fn fused_rms_norm_matches_the_composed_reference_in_value_and_gradient() {
        let w = rand(&[16], 5);
        same(
            &[rand(&[3, 4, 16], 1)],
            |t| rms_norm(Kernels::FUSED, &t[0], &w, 1e-5).unwrap(),
            |t| nn::rms_norm_reference(&t[0], &w, 1e-5).unwrap(),
        );
    }

    #[test]
    fn fused_softmax_matches_the_composed_reference_in_value_and_gradient() {
        same(
            &[rand(&[2, 3, 5, 7], 2)],
            |t| softmax_last_dim(Kernels::FUSED, &t[0]).unwrap(),
            |t| nn::softmax_last_dim_reference(&t[0]).unwrap(),
        );
    }

    #[test]
    fn fused_causal_softmax_matches_scale_mask_and_softmax_in_value_and_gradient() {
        // rows are 2 groups of t = 5 queries (grouped-query attention), at two offsets
        for offset in [0, 3] {
            let reference = |t: &[Tensor]| {
                let mask = nn::causal_mask(
                    5,
                    offset,
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap();
                let s = (&t[0] * 0.3)
                    .unwrap()
                    .reshape((2, 3, 2, 5, 5 + offset))
                    .unwrap();
                let p = nn::softmax_last_dim_reference(&s.broadcast_add(&mask).unwrap()).unwrap();
                p.reshape((2, 3, 10, 5 + offset)).unwrap()
            };
            same(
                &[rand(&[2, 3, 10, 5 + offset], 8)],
                |t| causal_softmax(Kernels::FUSED, &t[0], 0.3, 5, offset).unwrap(),
                reference,
            );
        }
    }

    #[test]
    fn fused_softmax_gives_zero_on_fully_masked_rows_instead_of_nan() {
        let x = Tensor::new(
            &[[f32::NEG_INFINITY, f32::NEG_INFINITY], [0.0, 0.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            softmax_last_dim(Kernels::FUSED, &x)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            vec![vec![0.0, 0.0], vec![0.5, 0.5]]
        );
    }

    #[test]
    fn fused_swiglu_matches_silu_times_up_in_value_and_both_gradients() {
        same(
            &[rand(&[3, 5000], 3), rand(&[3, 5000], 4)],
            |t| swiglu(Kernels::FUSED, &t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        );
    }
}
