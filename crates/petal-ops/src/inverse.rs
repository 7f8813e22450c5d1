//! Inverse of a batch of small square matrices `(b, n, n)`, differentiable: the Cayley
//! transform of OFT/BOFT, `(I - S)(I + S)^-1`, needs it, and candle has no linear algebra.
//!
//! Forward: Gauss-Jordan elimination with partial pivoting, in f64, one matrix per thread.
//! Backward: `Y = A^-1`, `dL/dA = -Y^T (dL/dY) Y^T`. Off the CPU the op runs on a host copy
//! (the matrices are small; only their count grows with the model).

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Inverse;

/// Invert one row-major n x n matrix in f64; `None` if it is singular to working precision.
pub fn invert_f64(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let w = 2 * n;
    let mut m = vec![0.0f64; n * w];
    for i in 0..n {
        m[i * w..i * w + n].copy_from_slice(&a[i * n..(i + 1) * n]);
        m[i * w + n + i] = 1.0;
    }
    let scale = a.iter().fold(0.0f64, |s, v| s.max(v.abs())).max(1e-300);
    for c in 0..n {
        let p = (c..n).max_by(|&x, &y| m[x * w + c].abs().total_cmp(&m[y * w + c].abs()))?;
        if m[p * w + c].abs() <= scale * 1e-12 {
            return None;
        }
        if p != c {
            for j in 0..w {
                m.swap(c * w + j, p * w + j);
            }
        }
        let d = 1.0 / m[c * w + c];
        for j in 0..w {
            m[c * w + j] *= d;
        }
        for r in 0..n {
            let f = m[r * w + c];
            if r != c && f != 0.0 {
                for j in 0..w {
                    m[r * w + j] -= f * m[c * w + j];
                }
            }
        }
    }
    Some(
        (0..n)
            .flat_map(|i| m[i * w + n..(i + 1) * w].to_vec())
            .collect(),
    )
}

impl CustomOp1 for Inverse {
    fn name(&self) -> &'static str {
        "petal-inverse"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, n2) = l.shape().dims3()?;
        if n != n2 {
            candle_core::bail!("inverse: matrices must be square, got {n} x {n2}")
        }
        let a = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((o1, o2))) => &v[o1..o2],
            _ => candle_core::bail!("inverse: expects contiguous f32"),
        };
        let blocks: Vec<Option<Vec<f64>>> = (0..b)
            .into_par_iter()
            .map(|i| {
                let m: Vec<f64> = a[i * n * n..(i + 1) * n * n]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                invert_f64(&m, n)
            })
            .collect();
        let mut out = Vec::with_capacity(b * n * n);
        for (i, blk) in blocks.into_iter().enumerate() {
            let Some(blk) = blk else {
                candle_core::bail!("inverse: matrix {i} of the batch is singular")
            };
            out.extend(blk.into_iter().map(|v| v as f32));
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _a: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let yt = y.transpose(1, 2)?;
        Ok(Some(yt.matmul(&grad.contiguous()?)?.matmul(&yt)?.neg()?))
    }
}

/// `A^-1` for `a (b, n, n)` in f32 (other dtypes are computed in f32 and cast back).
pub fn inverse(a: &Tensor) -> Result<Tensor> {
    let (dev, dt) = (a.device().clone(), a.dtype());
    let host = a
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    host.apply_op1(Inverse)?.to_dtype(dt)?.to_device(&dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{central_differences, max_rel, rand};
    use candle_core::Var;

    fn well_conditioned(b: usize, n: usize, seed: u64) -> Tensor {
        let eye = Tensor::eye(n, DType::F32, &Device::Cpu).unwrap();
        let r = (rand(&[b, n, n], seed) * 0.2).unwrap();
        r.broadcast_add(&(eye * 2.0).unwrap()).unwrap()
    }

    #[test]
    fn a_matrix_times_its_inverse_is_the_identity() {
        let a = well_conditioned(3, 7, 1);
        let y = inverse(&a).unwrap();
        let eye = Tensor::eye(7, DType::F32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((3, 1, 1))
            .unwrap();
        assert!(max_rel(&a.matmul(&y).unwrap(), &eye) < 1e-6);
        assert!(max_rel(&y.matmul(&a).unwrap(), &eye) < 1e-6);
    }

    #[test]
    fn a_singular_matrix_is_refused_with_its_index() {
        let mut v = well_conditioned(2, 3, 2)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for j in 0..3 {
            v[9 + 3 + j] = v[9 + j]; // matrix 1: two equal rows
        }
        let a = Tensor::from_vec(v, (2, 3, 3), &Device::Cpu).unwrap();
        let e = inverse(&a).unwrap_err().to_string();
        assert!(e.contains("matrix 1 of the batch is singular"), "{e}");
    }

    #[test]
    fn the_inverse_gradient_matches_finite_differences() {
        let a = Var::from_tensor(&well_conditioned(2, 4, 3)).unwrap();
        let proj = rand(&[2, 4, 4], 4);
        let f = || {
            (inverse(a.as_tensor()).unwrap() * &proj)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let g = f().backward().unwrap();
        let grad = g
            .get(a.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let idx = [0, 5, 17, 31];
        let fd = central_differences(&a, &idx, 1e-3, || {
            f().to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        });
        for (&i, d) in idx.iter().zip(fd) {
            assert!(
                (d as f32 - grad[i]).abs() < 1e-2 * (1.0 + d.abs() as f32),
                "d/dA[{i}]: finite difference {d} vs backprop {}",
                grad[i]
            );
        }
    }
}
