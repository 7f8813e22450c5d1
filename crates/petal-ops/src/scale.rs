//! `y ⊙ l` for `y (.., d)` and a vector `l (d)`: the scaling of IA3 and VeRA. candle's
//! broadcast product is right forward, but its backward reduces `g ⊙ y` over all rows on one
//! thread; this op does both directions in one parallel pass each.

use crate::cpu::{act_in, act_out, f32s, fast_act_ok, fast_ok};
use crate::Kernels;
use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

struct ScaleLast;

impl CustomOp2 for ScaleLast {
    fn name(&self) -> &'static str {
        "petal-scale-last"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        ls: &CpuStorage,
        ll: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // y may be bf16 activations: widened here, the product stored back in y's dtype
        let (y, l) = (act_in(ys, yl)?, f32s(ls, ll)?);
        let d = l.len();
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d)
            .zip(y.par_chunks(d))
            .for_each(|(o, y)| {
                o.iter_mut()
                    .zip(y)
                    .zip(l)
                    .for_each(|((o, y), l)| *o = y * l)
            });
        Ok((act_out(out, ys.dtype())?, yl.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        l: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = l.dim(0)?;
        let host = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
        let (yv, gv) = (host(y)?, host(grad)?);
        let lv = l.to_vec1::<f32>()?;
        let mut dy = vec![0f32; yv.len()];
        let dl = dy
            .par_chunks_mut(d)
            .zip(yv.par_chunks(d).zip(gv.par_chunks(d)))
            .fold(
                || vec![0f32; d],
                |mut dl, (dy, (y, g))| {
                    for j in 0..d {
                        dy[j] = g[j] * lv[j];
                        dl[j] += g[j] * y[j];
                    }
                    dl
                },
            )
            .reduce(
                || vec![0f32; d],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, v)| *x += v);
                    a
                },
            );
        Ok((
            Some(crate::cpu::tensor(act_out(dy, y.dtype())?, y.shape())),
            Some(Tensor::from_vec(dl, d, l.device())?),
        ))
    }
}

/// `y ⊙ l` with `l` broadcast over all but the last dimension of `y`, in y's dtype: f32 or bf16
/// `y` on the CPU takes the fused kernel (f32 arithmetic); elsewhere candle's broadcast product,
/// in f32 for a lower-precision `y` (l's gradient sums over every row).
pub fn scale_last(k: Kernels, y: &Tensor, l: &Tensor) -> Result<Tensor> {
    let d = y.dim(D::Minus1)?;
    let l = l.flatten_all()?;
    if l.dim(0)? != d {
        candle_core::bail!("scale_last: {} scales for {d} features", l.dim(0)?)
    }
    if !(fast_act_ok(k, y) && l.dtype() == DType::F32) {
        if y.dtype() == l.dtype() {
            return y.broadcast_mul(&l);
        }
        return y
            .to_dtype(DType::F32)?
            .broadcast_mul(&l.to_dtype(DType::F32)?)?
            .to_dtype(y.dtype());
    }
    let y2 = y.contiguous()?.reshape((y.elem_count() / d, d))?;
    y2.apply_op2(&l.contiguous()?, ScaleLast)?
        .reshape(y.shape())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rand, same};

    #[test]
    fn the_fused_scaling_equals_the_broadcast_product_in_value_and_gradients() {
        same(
            &[rand(&[3, 5, 12], 1), rand(&[12], 2)],
            |t| scale_last(Kernels::FUSED, &t[0], &t[1]).unwrap(),
            |t| t[0].broadcast_mul(&t[1]).unwrap(),
        );
    }
}

/// `y ⊙ l + s`: SSF's scale and shift in one pass each way (candle's broadcast product and sum
/// would keep two graph nodes and reduce each gradient over the rows on one thread).
struct ScaleShiftLast;

impl CustomOp3 for ScaleShiftLast {
    fn name(&self) -> &'static str {
        "petal-scale-shift-last"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        ls: &CpuStorage,
        ll: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, l, s) = (act_in(ys, yl)?, f32s(ls, ll)?, f32s(ss, sl)?);
        let d = l.len();
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d)
            .zip(y.par_chunks(d))
            .for_each(|(o, y)| {
                for j in 0..d {
                    o[j] = y[j] * l[j] + s[j];
                }
            });
        Ok((act_out(out, ys.dtype())?, yl.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        l: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = l.dim(0)?;
        let host = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
        let (yv, gv) = (host(y)?, host(grad)?);
        let lv = l.to_vec1::<f32>()?;
        let mut dy = vec![0f32; yv.len()];
        // (dl, ds) side by side: 2d sums per row block
        let sums = dy
            .par_chunks_mut(d)
            .zip(yv.par_chunks(d).zip(gv.par_chunks(d)))
            .fold(
                || vec![0f32; 2 * d],
                |mut acc, (dy, (y, g))| {
                    for j in 0..d {
                        dy[j] = g[j] * lv[j];
                        acc[j] += g[j] * y[j];
                        acc[d + j] += g[j];
                    }
                    acc
                },
            )
            .reduce(
                || vec![0f32; 2 * d],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, v)| *x += v);
                    a
                },
            );
        Ok((
            Some(crate::cpu::tensor(act_out(dy, y.dtype())?, y.shape())),
            Some(Tensor::from_vec(sums[..d].to_vec(), d, l.device())?),
            Some(Tensor::from_vec(sums[d..].to_vec(), d, s.device())?.to_dtype(s.dtype())?),
        ))
    }
}

/// `y ⊙ l + s` with `l` and `s` (d) broadcast over all but the last dimension of `y`, in y's
/// dtype (f32 arithmetic inside): the fused kernel for f32 or bf16 `y` on the CPU with f32 `l`
/// and `s`; elsewhere its readable twin, candle's broadcast product and sum.
pub fn scale_shift_last(k: Kernels, y: &Tensor, l: &Tensor, s: &Tensor) -> Result<Tensor> {
    let d = y.dim(D::Minus1)?;
    let (l, s) = (l.flatten_all()?, s.flatten_all()?);
    if l.dim(0)? != d || s.dim(0)? != d {
        candle_core::bail!(
            "scale_shift_last: {} scales and {} shifts for {d} features",
            l.dim(0)?,
            s.dim(0)?
        )
    }
    if !(fast_act_ok(k, y) && l.dtype() == DType::F32 && s.dtype() == DType::F32) {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        return f(y)?
            .broadcast_mul(&f(&l)?)?
            .broadcast_add(&f(&s)?)?
            .to_dtype(y.dtype());
    }
    let y2 = y.contiguous()?.reshape((y.elem_count() / d, d))?;
    y2.apply_op3(&l.contiguous()?, &s.contiguous()?, ScaleShiftLast)?
        .reshape(y.shape())
}

#[cfg(test)]
mod scale_shift_tests {
    use super::*;
    use crate::testing::{rand, same, same_bf16};

    #[test]
    fn the_fused_scale_and_shift_equals_its_twin_in_value_and_gradients() {
        let inputs = [rand(&[3, 5, 12], 1), rand(&[12], 2), rand(&[12], 3)];
        same(
            &inputs,
            |t| scale_shift_last(Kernels::FUSED, &t[0], &t[1], &t[2]).unwrap(),
            |t| scale_shift_last(Kernels::REFERENCE, &t[0], &t[1], &t[2]).unwrap(),
        );
    }

    #[test]
    fn the_fused_scale_and_shift_on_bf16_activations_follows_f32_arithmetic() {
        same_bf16(
            &[rand(&[4, 16], 4), rand(&[16], 5), rand(&[16], 6)],
            2e-2,
            |t| {
                let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
                scale_shift_last(Kernels::FUSED, &t[0], &f(&t[1]), &f(&t[2])).unwrap()
            },
            |t| {
                t[0].broadcast_mul(&t[1])
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            },
        );
    }
}

struct AddFrozen;

impl CustomOp2 for AddFrozen {
    fn name(&self) -> &'static str {
        "petal-add-frozen"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, c) = (f32s(xs, xl)?, f32s(cs, cl)?);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(4096)
            .zip(x.par_chunks(4096).zip(c.par_chunks(4096)))
            .for_each(|(o, (x, c))| {
                o.iter_mut()
                    .zip(x.iter().zip(c))
                    .for_each(|(o, (x, c))| *o = x + c)
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), None))
    }
}

/// `x + c` with the gradient going to `x` only: `c` is frozen (a base weight), so backward
/// neither computes nor stores a gradient for it, which candle's `add` does for both sides.
pub fn add_frozen(k: Kernels, x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if x.dims() != c.dims() {
        candle_core::bail!("add_frozen: shapes {:?} and {:?}", x.dims(), c.dims())
    }
    if !(fast_ok(k, x) && fast_ok(k, c)) {
        return x + c.detach();
    }
    x.contiguous()?.apply_op2(&c.contiguous()?, AddFrozen)
}

#[cfg(test)]
mod add_frozen_tests {
    use super::*;
    use crate::testing::rand;
    use candle_core::Var;

    #[test]
    fn adding_a_frozen_tensor_passes_the_gradient_to_the_other_side_only() {
        let x = Var::from_tensor(&rand(&[3, 5], 1)).unwrap();
        let c = rand(&[3, 5], 2);
        let y = add_frozen(Kernels::FUSED, x.as_tensor(), &c).unwrap();
        let want = (x.as_tensor() + &c).unwrap();
        assert_eq!(crate::testing::max_rel(&y, &want), 0.0);
        let w = rand(&[3, 5], 3);
        let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            crate::testing::max_rel(g.get(x.as_tensor()).unwrap(), &w),
            0.0
        );
        assert!(
            g.get(&c).is_none(),
            "no gradient stored for the frozen side"
        );
    }
}
