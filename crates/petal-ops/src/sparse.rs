//! A sparse update's product `x S^T` for S (out, in) with `nnz` entries at flat positions
//! `idx` (row-major, `row * in + col`) holding `values` (RoSA's and FISH's sparse deltas).
//!
//! The fused CPU op never builds S: forward `y[t, r_j] += v_j x[t, c_j]` (SpMM), backward
//! `dx[t, c_j] += dy[t, r_j] v_j` and the sampled-dense gradient of the values
//! `dv_j = Σ_t dy[t, r_j] x[t, c_j]` (SDDMM), each `tokens x nnz` multiply-adds. The readable twin
//! scatters S densely and multiplies (what a GPU runs).

use crate::Kernels;
use candle_core::{DType, Device, Result, Tensor, D};
use rayon::prelude::*;

/// `x (.., in) S^T` -> (.., out); gradients to x and `values`.
pub fn sparse_delta(
    k: Kernels,
    x: &Tensor,
    values: &Tensor,
    idx: &Tensor,
    out: usize,
) -> Result<Tensor> {
    let fused = k.fused()
        && matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && values.dtype() == DType::F32;
    if !fused {
        return sparse_delta_reference(x, values, idx, out);
    }
    let inp = x.dim(D::Minus1)?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap_or(&mut 0) = out;
    let x2 = x.reshape((x.elem_count() / inp, inp))?.contiguous()?;
    let pos: Vec<(usize, usize)> = idx
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|p| (p as usize / inp, p as usize % inp))
        .collect();
    if pos.iter().any(|&(r, _)| r >= out) {
        candle_core::bail!("sparse_delta: an index is past the ({out}, {inp}) matrix")
    }
    let pos = std::sync::Arc::new(pos);
    let p2 = pos.clone();
    let y = crate::lean::lean2(
        [&x2, values],
        |[x, v]| {
            let (xs, vs) = (x.to_vec2::<f32>()?, v.to_vec1::<f32>()?);
            let rows: Vec<f32> = xs
                .par_iter()
                .flat_map_iter(|xr| {
                    let mut yr = vec![0f32; out];
                    for (&(r, c), &v) in pos.iter().zip(&vs) {
                        yr[r] += v * xr[c];
                    }
                    yr
                })
                .collect();
            Tensor::from_vec(rows, (xs.len(), out), &Device::Cpu)
        },
        move |[x, v], need, _, dy| {
            let dy = dy.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let vs = v.to_vec1::<f32>()?;
            let inp = x.dim(1)?;
            let dx = need[0]
                .then(|| {
                    let rows: Vec<f32> = dy
                        .par_iter()
                        .flat_map_iter(|g| {
                            let mut dr = vec![0f32; inp];
                            for (&(r, c), &v) in p2.iter().zip(&vs) {
                                dr[c] += g[r] * v;
                            }
                            dr
                        })
                        .collect();
                    Tensor::from_vec(rows, (dy.len(), inp), &Device::Cpu)
                })
                .transpose()?;
            let dv = need[1]
                .then(|| {
                    let xs = x.to_vec2::<f32>()?;
                    let d: Vec<f32> = p2
                        .par_iter()
                        .map(|&(r, c)| xs.iter().zip(&dy).map(|(xr, g)| g[r] * xr[c]).sum())
                        .collect();
                    Tensor::from_vec(d, vs.len(), &Device::Cpu)
                })
                .transpose()?;
            Ok([dx, dv])
        },
    )?;
    y.reshape(dims)
}

/// The readable twin: S scattered densely (out, in), then `x S^T`.
pub fn sparse_delta_reference(
    x: &Tensor,
    values: &Tensor,
    idx: &Tensor,
    out: usize,
) -> Result<Tensor> {
    let inp = x.dim(D::Minus1)?;
    let s = dense(values, idx, out, inp)?;
    x.broadcast_matmul(&s.t()?.to_dtype(x.dtype())?)
}

/// S as a dense (out, in) matrix: `values` at the flat positions `idx`.
pub fn dense(values: &Tensor, idx: &Tensor, out: usize, inp: usize) -> Result<Tensor> {
    Tensor::zeros(out * inp, values.dtype(), values.device())?
        .index_add(idx, values, 0)?
        .reshape((out, inp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, projected_grads, rand};
    use candle_core::Var;

    #[test]
    fn the_sparse_product_equals_the_dense_twin_in_value_and_gradients() {
        let x = Var::from_tensor(&rand(&[2, 3, 7], 1)).unwrap();
        let v = Var::from_tensor(&rand(&[6], 2)).unwrap();
        // (5, 7): two entries in row 0, none in row 2, the last position
        let idx = Tensor::new(&[0i64, 3, 8, 20, 27, 34], &Device::Cpu).unwrap();
        let fused = sparse_delta(Kernels::FUSED, x.as_tensor(), v.as_tensor(), &idx, 5).unwrap();
        let twin = sparse_delta_reference(x.as_tensor(), v.as_tensor(), &idx, 5).unwrap();
        assert!(max_rel(&fused, &twin) < 1e-6);
        // S written out by hand
        let mut s = vec![vec![0f32; 7]; 5];
        for (p, val) in [0usize, 3, 8, 20, 27, 34]
            .iter()
            .zip(v.as_tensor().to_vec1::<f32>().unwrap())
        {
            s[p / 7][p % 7] = val;
        }
        let s = Tensor::new(s, &Device::Cpu).unwrap();
        let want = x.as_tensor().broadcast_matmul(&s.t().unwrap()).unwrap();
        assert!(max_rel(&fused, &want) < 1e-6);
        let proj = rand(&[2, 3, 5], 3);
        let (gf, gt) = (
            projected_grads(&fused, &proj),
            projected_grads(&twin, &proj),
        );
        for var in [&x, &v] {
            let e = max_rel(
                gf.get(var.as_tensor()).unwrap(),
                gt.get(var.as_tensor()).unwrap(),
            );
            assert!(e < 1e-5, "{e}");
        }
    }

    #[test]
    fn an_index_past_the_matrix_is_an_error_not_a_panic() {
        let x = rand(&[2, 7], 1);
        let v = rand(&[1], 2);
        let idx = Tensor::new(&[35i64], &Device::Cpu).unwrap();
        assert!(sparse_delta(Kernels::FUSED, &x, &v, &idx, 5).is_err());
    }
}
