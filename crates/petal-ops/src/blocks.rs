//! `x R` for a block-diagonal R given as its blocks (k, b, b): OFT's and BOFT's rotation of the
//! input, `y[.., j b..(j + 1) b] = x[.., j b..(j + 1) b] R_j`. The composed form
//! (`rotate_blocks_reference`) transposes x to (k, n, b), runs a batched matmul and transposes
//! back: three copies of the activations, each a graph node. The op reads x in place (one
//! strided product per block), writes y in x's dtype (f32 or bf16 activations; f32 arithmetic),
//! and its backward gives dx = dy R^T blockwise and dR_j = x_j^T dy_j.

use crate::cpu::{act_in, act_out, f32s, fast_act_ok, mm, View};
use crate::Kernels;
use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct RotateBlocks;

/// Block j of the rows of `x` (n, k b): an (n, b) view with row stride k b.
fn block(x: &[f32], j: usize, b: usize, width: usize) -> View<'_> {
    View {
        x: &x[j * b..],
        rs: width,
        cs: 1,
    }
}

/// `c[.., j b..] = a_j m_j` for every block j, on rayon's threads over blocks: a_j the
/// (n, b) blocks of `a`, m_j (b, b) given as views by `mat`.
fn per_block<'a>(
    a: &[f32],
    n: usize,
    k: usize,
    b: usize,
    mat: impl Fn(usize) -> View<'a> + Sync,
) -> Vec<f32> {
    let width = k * b;
    let parts: Vec<Vec<f32>> = (0..k)
        .into_par_iter()
        .map(|j| {
            let mut c = vec![0f32; n * b];
            mm(
                n,
                b,
                b,
                &mut c,
                false,
                1.0,
                block(a, j, b, width),
                mat(j),
                false,
            );
            c
        })
        .collect();
    let mut out = vec![0f32; n * width];
    out.par_chunks_mut(width).enumerate().for_each(|(i, row)| {
        for (j, c) in parts.iter().enumerate() {
            row[j * b..(j + 1) * b].copy_from_slice(&c[i * b..(i + 1) * b]);
        }
    });
    out
}

impl CustomOp2 for RotateBlocks {
    fn name(&self) -> &'static str {
        "petal-rotate-blocks"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, width) = xl.shape().dims2()?;
        let (k, b, _) = rl.shape().dims3()?;
        let (x, r) = (act_in(xs, xl)?, f32s(rs, rl)?);
        let y = per_block(&x, n, k, b, |j| View {
            x: &r[j * b * b..(j + 1) * b * b],
            rs: b,
            cs: 1,
        });
        debug_assert_eq!(y.len(), n * width);
        Ok((act_out(y, xs.dtype())?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, width) = x.dims2()?;
        let (k, b, _) = r.dims3()?;
        let host = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
        let (xv, rv, gv) = (host(x)?, host(r)?, host(g)?);
        // dx_j = dy_j R_j^T
        let dx = per_block(&gv, n, k, b, |j| View {
            x: &rv[j * b * b..(j + 1) * b * b],
            rs: 1,
            cs: b,
        });
        // dR_j = x_j^T dy_j (b, b)
        let dr: Vec<f32> = (0..k)
            .into_par_iter()
            .flat_map_iter(|j| {
                let mut c = vec![0f32; b * b];
                let xt = View {
                    x: &xv[j * b..],
                    rs: 1,
                    cs: width,
                };
                mm(
                    b,
                    b,
                    n,
                    &mut c,
                    false,
                    1.0,
                    xt,
                    block(&gv, j, b, width),
                    false,
                );
                c
            })
            .collect();
        Ok((
            Some(crate::cpu::tensor(act_out(dx, x.dtype())?, x.shape())),
            Some(Tensor::from_vec(dr, (k, b, b), r.device())?),
        ))
    }
}

/// The composed twin: x (n, k b) as (k, n, b), a batched product with r (k, b, b), back.
pub fn rotate_blocks_reference(x: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (n, inp) = x.dims2()?;
    let (k, b, _) = r.dims3()?;
    let xb = x.reshape((n, k, b))?.transpose(0, 1)?.contiguous()?; // (k, n, b)
    xb.matmul(r)?.transpose(0, 1)?.reshape((n, inp))
}

/// `x R` for x (n, k b) and a block-diagonal R given as r (k, b, b), in x's dtype: f32 or bf16
/// `x` on the CPU takes the op (f32 arithmetic, r's gradient in f32); elsewhere the composed
/// form, in f32 for a lower-precision `x`.
pub fn rotate_blocks(kern: Kernels, x: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (_, inp) = x.dims2()?;
    let (k, b, b2) = r.dims3()?;
    if k * b != inp || b != b2 {
        candle_core::bail!("rotate_blocks: {k} blocks of {b} x {b2} for {inp} features")
    }
    if !(fast_act_ok(kern, x) && r.dtype() == DType::F32) {
        // one graph node keeping x and r only (not the blocks turned to the front)
        return crate::lean::lean2(
            [x, r],
            |[x, r]| {
                if x.dtype() == r.dtype() {
                    return rotate_blocks_reference(x, r);
                }
                let xf = x.to_dtype(DType::F32)?;
                rotate_blocks_reference(&xf, &r.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
            },
            move |[x, r], need, _, dy| {
                // per block j: dx_j = dy_j R_j^T, dR_j = x_j^T dy_j (sums over the rows), in f32
                let (n, inp) = x.dims2()?;
                let blocks = |t: &Tensor| -> Result<Tensor> {
                    t.to_dtype(DType::F32)?
                        .reshape((n, k, b))?
                        .transpose(0, 1)?
                        .contiguous() // (k, n, b)
                };
                let (xb, gb, rf) = (blocks(x)?, blocks(dy)?, r.to_dtype(DType::F32)?);
                let dx = need[0]
                    .then(|| -> Result<Tensor> {
                        let d = gb.matmul(&rf.transpose(1, 2)?)?.transpose(0, 1)?;
                        d.reshape((n, inp))?.to_dtype(x.dtype())
                    })
                    .transpose()?;
                let dr = need[1]
                    .then(|| xb.transpose(1, 2)?.matmul(&gb)?.to_dtype(r.dtype()))
                    .transpose()?;
                Ok([dx, dr])
            },
        );
    }
    x.contiguous()?.apply_op2(&r.contiguous()?, RotateBlocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rand, same};

    #[test]
    fn blockwise_rotation_equals_the_batched_product_in_value_and_both_gradients() {
        for (n, k, b) in [(5, 3, 4), (1, 1, 6), (33, 4, 8)] {
            same(
                &[rand(&[n, k * b], 1), rand(&[k, b, b], 2)],
                |t| rotate_blocks(Kernels::FUSED, &t[0], &t[1]).unwrap(),
                |t| rotate_blocks_reference(&t[0], &t[1]).unwrap(),
            );
        }
    }
}
