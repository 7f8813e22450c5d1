//! PaCA's linear (Partial Connection Adaptation, Woo et al., ICLR 2025): the frozen W with r of
//! its input columns replaced by trained values `c` (out, r), in ONE product per direction.
//!
//! `y = x W'^T + b`, `W' = W` with `W'[:, idx] = c`. Backward: `dx = dy W'` (W' rebuilt, never
//! kept between forward and backward) and `dc = dy^T x[:, idx]`; W gets no gradient. The
//! readable twin adds the column difference as a second, narrow product:
//! `x W^T + b + x[:, idx] (c - W[:, idx])^T`.

use crate::Kernels;
use candle_core::{DType, Result, Tensor, D};

/// W with the columns `idx` (r, integer) replaced by `c` (out, r); W stays frozen.
pub fn with_columns(w: &Tensor, c: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let w = w.detach();
    let old = w.index_select(idx, 1)?;
    w.index_add(idx, &(c - old)?, 1)
}

/// `x (.., in) W'^T + b` for W' = W with columns `idx` replaced by `c`; gradients to x and c.
/// f32 x, W and c; one graph node whose backward is hand-written (`Kernels::reference()`: the
/// twin).
pub fn paca_linear(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    c: &Tensor,
    idx: &Tensor,
) -> Result<Tensor> {
    if !k.fused() {
        return paca_linear_reference(x, w, b, c, idx);
    }
    let inp = x.dim(D::Minus1)?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap_or(&mut 0) = w.dim(0)?;
    let x2 = x.reshape((x.elem_count() / inp, inp))?;
    let (w0, idx0) = (w.detach(), idx.clone());
    let y = crate::lean::lean2(
        [&x2, c],
        |[x, c]| x.matmul(&with_columns(&w0, c, &idx0)?.t()?),
        {
            let (w, idx) = (w.detach(), idx.clone());
            move |[x, c], need, _, dy| {
                let dx = need[0]
                    .then(|| dy.matmul(&with_columns(&w, c, &idx)?))
                    .transpose()?;
                let dc = need[1]
                    .then(|| dy.t()?.matmul(&x.index_select(&idx, 1)?))
                    .transpose()?;
                Ok([dx, dc])
            }
        },
    )?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.detach())?,
        None => y,
    };
    y.reshape(dims)
}

/// The readable twin: the frozen product and the column difference as a second, narrow one.
pub fn paca_linear_reference(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    c: &Tensor,
    idx: &Tensor,
) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.detach().t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.detach())?,
        None => y,
    };
    y + paca_delta(
        x,
        &w.detach().to_dtype(DType::F32)?.index_select(idx, 1)?,
        c,
        idx,
    )?
}

/// `x[:, idx] (c - W[:, idx])^T`: what the replaced columns add to the frozen output, in x's
/// dtype (the difference in f32), from W's replaced columns `w_cols = W[:, idx]` (out, r) f32.
pub fn paca_delta(x: &Tensor, w_cols: &Tensor, c: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let diff = (c - w_cols.detach())?;
    let xs = x.index_select(idx, x.rank() - 1)?.to_dtype(DType::F32)?;
    xs.broadcast_matmul(&diff.t()?)?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{central_differences, max_rel, projected_grads, rand};
    use candle_core::{Device, Var};

    fn case() -> (Var, Tensor, Tensor, Var, Tensor) {
        let x = Var::from_tensor(&rand(&[2, 3, 7], 1)).unwrap();
        let w = rand(&[5, 7], 2);
        let b = rand(&[5], 3);
        let c = Var::from_tensor(&rand(&[5, 3], 4)).unwrap();
        let idx = Tensor::new(&[4i64, 0, 6], &Device::Cpu).unwrap();
        (x, w, b, c, idx)
    }

    #[test]
    fn the_single_product_equals_the_twin_in_value_and_gradients() {
        let (x, w, b, c, idx) = case();
        let fused = paca_linear(
            Kernels::FUSED,
            x.as_tensor(),
            &w,
            Some(&b),
            c.as_tensor(),
            &idx,
        )
        .unwrap();
        let twin = paca_linear_reference(x.as_tensor(), &w, Some(&b), c.as_tensor(), &idx).unwrap();
        assert!(max_rel(&fused, &twin) < 1e-6);
        // and both equal the product with W' written out by hand
        let mut wv = w.to_vec2::<f32>().unwrap();
        let cv = c.as_tensor().to_vec2::<f32>().unwrap();
        for (j, col) in [4usize, 0, 6].iter().enumerate() {
            for (o, row) in wv.iter_mut().enumerate() {
                row[*col] = cv[o][j];
            }
        }
        let w2 = Tensor::new(wv, &Device::Cpu).unwrap();
        let want = x
            .as_tensor()
            .broadcast_matmul(&w2.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_rel(&fused, &want) < 1e-6);
        let proj = rand(&[2, 3, 5], 5);
        let (gf, gt) = (
            projected_grads(&fused, &proj),
            projected_grads(&twin, &proj),
        );
        for v in [&x, &c] {
            let e = max_rel(
                gf.get(v.as_tensor()).unwrap(),
                gt.get(v.as_tensor()).unwrap(),
            );
            assert!(e < 1e-5, "{e}");
        }
        assert!(gf.get(&w).is_none(), "W is frozen");
    }

    #[test]
    fn the_column_gradient_matches_finite_differences() {
        let (x, w, b, c, idx) = case();
        let proj = rand(&[2, 3, 5], 5);
        let f = || {
            let y = paca_linear(
                Kernels::FUSED,
                x.as_tensor(),
                &w,
                Some(&b),
                c.as_tensor(),
                &idx,
            )
            .unwrap();
            (y * &proj)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let y = paca_linear(
            Kernels::FUSED,
            x.as_tensor(),
            &w,
            Some(&b),
            c.as_tensor(),
            &idx,
        )
        .unwrap();
        let g = projected_grads(&y, &proj);
        let gc = g
            .get(c.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let fd = central_differences(&c, &[0, 1, 2, 7, 14], 1e-2, f);
        for (i, (a, n)) in [0, 1, 2, 7, 14].iter().zip(&fd).enumerate() {
            assert!(
                (gc[*a] as f64 - n).abs() < 2e-3 * (1.0 + n.abs()),
                "{i}: {} vs {n}",
                gc[*a]
            );
        }
    }
}
