//! RoAd's output transform in one pass: `y' = y ⊙ f + rot(y) ⊙ s`, where inside each group of
//! `g` features element j of the first half pairs with element j + g/2 and
//! `rot(y)_j = -y_(j+g/2)`, `rot(y)_(j+g/2) = y_j`. The composed form (`pair_rotate_reference`)
//! takes a narrow, a negation, a concatenation and four broadcast products per direction, each
//! a full pass over the activations and, for f and s, a single-threaded column reduction in
//! backward; the kernel does one parallel pass forward and one backward.

use crate::cpu::{act_in, act_out, f32s, fast_act_ok};
use crate::Kernels;
use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

struct PairRotate {
    group: usize,
}

impl CustomOp3 for PairRotate {
    fn name(&self) -> &'static str {
        "petal-pair-rotate"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        fs: &CpuStorage,
        fl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // y may be bf16 activations: widened here, the result stored back in y's dtype
        let (y, f, s) = (act_in(ys, yl)?, f32s(fs, fl)?, f32s(ss, sl)?);
        let d = f.len();
        let h = self.group / 2;
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d)
            .zip(y.par_chunks(d))
            .for_each(|(o, y)| {
                for g in (0..d).step_by(self.group) {
                    for j in g..g + h {
                        let (a, b) = (y[j], y[j + h]);
                        o[j] = a * f[j] - b * s[j];
                        o[j + h] = b * f[j + h] + a * s[j + h];
                    }
                }
            });
        Ok((act_out(out, ys.dtype())?, yl.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        f: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = f.dim(0)?;
        let h = self.group / 2;
        let host = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
        let (yv, gv) = (host(y)?, host(grad)?);
        let (fv, sv) = (f.to_vec1::<f32>()?, s.to_vec1::<f32>()?);
        let mut dy = vec![0f32; yv.len()];
        // dy per row, and per-thread partial column sums for df and ds
        let (df, ds) = dy
            .par_chunks_mut(d)
            .zip(yv.par_chunks(d).zip(gv.par_chunks(d)))
            .fold(
                || (vec![0f32; d], vec![0f32; d]),
                |(mut df, mut ds), (dy, (y, g))| {
                    for grp in (0..d).step_by(self.group) {
                        for j in grp..grp + h {
                            let k = j + h;
                            dy[j] = g[j] * fv[j] + g[k] * sv[k];
                            dy[k] = g[k] * fv[k] - g[j] * sv[j];
                            df[j] += g[j] * y[j];
                            df[k] += g[k] * y[k];
                            ds[j] -= g[j] * y[k];
                            ds[k] += g[k] * y[j];
                        }
                    }
                    (df, ds)
                },
            )
            .reduce(
                || (vec![0f32; d], vec![0f32; d]),
                |(mut a, mut b), (c, e)| {
                    a.iter_mut().zip(c).for_each(|(x, v)| *x += v);
                    b.iter_mut().zip(e).for_each(|(x, v)| *x += v);
                    (a, b)
                },
            );
        let dev = y.device();
        Ok((
            Some(crate::cpu::tensor(act_out(dy, y.dtype())?, y.shape())),
            Some(Tensor::from_vec(df, d, dev)?),
            Some(Tensor::from_vec(ds, d, dev)?),
        ))
    }
}

/// rot(y): in each group, (y1, y2) -> (-y2, y1) for the halves y1, y2 of `group / 2` features.
fn rotate_pairs(y: &Tensor, group: usize) -> Result<Tensor> {
    let g = y.reshape((y.elem_count() / group, 2, group / 2))?;
    let (y1, y2) = (g.narrow(1, 0, 1)?, g.narrow(1, 1, 1)?);
    Tensor::cat(&[y2.neg()?, y1], 1)?.reshape(y.shape())
}

/// The composed twin: the same transform from differentiable candle ops.
pub fn pair_rotate_reference(y: &Tensor, f: &Tensor, s: &Tensor, group: usize) -> Result<Tensor> {
    y.broadcast_mul(f)? + rotate_pairs(y, group)?.broadcast_mul(s)?
}

/// The gradients of `y ⊙ f + rot(y) ⊙ s` from candle ops, in f32 inside: rot is a rotation by
/// a quarter turn in each pair, so its transpose is -rot: dy = dy' ⊙ f - rot(dy' ⊙ s),
/// df = sum over rows of dy' ⊙ y, ds = sum over rows of dy' ⊙ rot(y); each where `need` asks.
fn pair_rotate_backward(
    [y, f, s]: [&Tensor; 3],
    group: usize,
    dy: &Tensor,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    let d = y.dim(D::Minus1)?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let (g, yf) = (f32(dy)?.reshape(((), d))?, f32(y)?.reshape(((), d))?);
    let dy = need[0]
        .then(|| -> Result<Tensor> {
            let turned = rotate_pairs(&g.broadcast_mul(&f32(s)?)?, group)?;
            (g.broadcast_mul(&f32(f)?)? - turned)?
                .to_dtype(y.dtype())?
                .reshape(y.shape())
        })
        .transpose()?;
    let df = need[1]
        .then(|| (&g * &yf)?.sum(0)?.to_dtype(f.dtype()))
        .transpose()?;
    let ds = need[2]
        .then(|| {
            (&g * rotate_pairs(&yf, group)?)?
                .sum(0)?
                .to_dtype(s.dtype())
        })
        .transpose()?;
    Ok([dy, df, ds])
}

/// `y (.., d) ⊙ f + rot(y) ⊙ s` with `f`, `s` of length d and pairs (j, j + group/2) inside
/// each group of `group` features, in y's dtype. f32 or bf16 `y` on the CPU takes the fused
/// kernel (f32 arithmetic); elsewhere the composed form, in f32 for a lower-precision `y`.
pub fn pair_rotate(k: Kernels, y: &Tensor, f: &Tensor, s: &Tensor, group: usize) -> Result<Tensor> {
    let d = y.dim(D::Minus1)?;
    if group == 0 || group % 2 != 0 || d % group != 0 || f.dims() != [d] || s.dims() != [d] {
        candle_core::bail!(
            "pair_rotate: group {group} must be even and divide {d}; f, s of length {d}"
        )
    }
    if !(fast_act_ok(k, y) && f.dtype() == DType::F32 && s.dtype() == DType::F32) {
        // one graph node keeping y, f and s only (the rotated copy and the products are not)
        return crate::lean::lean3(
            [y, f, s],
            |[y, f, s]| {
                if y.dtype() == f.dtype() {
                    return pair_rotate_reference(y, f, s, group);
                }
                let yf = y.to_dtype(DType::F32)?;
                let (f, s) = (f.to_dtype(DType::F32)?, s.to_dtype(DType::F32)?);
                pair_rotate_reference(&yf, &f, &s, group)?.to_dtype(y.dtype())
            },
            move |ys, need, _, dy| pair_rotate_backward(ys, group, dy, need),
        );
    }
    let y2 = y.contiguous()?.reshape((y.elem_count() / d, d))?;
    y2.apply_op3(&f.contiguous()?, &s.contiguous()?, PairRotate { group })?
        .reshape(y.shape())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rand, same};

    #[test]
    fn the_fused_pair_rotation_equals_the_composed_ops_in_value_and_gradients() {
        for group in [2, 6, 12] {
            let inputs = [rand(&[3, 5, 12], 1), rand(&[12], 2), rand(&[12], 3)];
            same(
                &inputs,
                |t| pair_rotate(Kernels::FUSED, &t[0], &t[1], &t[2], group).unwrap(),
                |t| pair_rotate_reference(&t[0], &t[1], &t[2], group).unwrap(),
            );
        }
    }
}
