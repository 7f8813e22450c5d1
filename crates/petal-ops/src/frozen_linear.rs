//! `y = x W^T (+ b)` for a frozen weight `W (out, in)`: a custom op whose backward returns the
//! input gradient only. candle's matmul backward computes the gradient of both operands, so a
//! plain `x.matmul(&w.t())` would spend a full extra matmul (and its memory) on a gradient that
//! nobody reads; this op never computes it.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct FrozenLinear;

fn out_shape(x: &Layout, w: &Layout) -> Result<(Shape, usize, usize, usize)> {
    let (out, inp) = w.shape().dims2()?;
    let xd = x.shape().dims();
    let k = *xd.last().unwrap_or(&0);
    if k != inp {
        candle_core::bail!("frozen_linear: input has {k} features, weight expects {inp}")
    }
    let m = x.shape().elem_count() / inp.max(1);
    let mut od = xd.to_vec();
    if let Some(last) = od.last_mut() {
        *last = out;
    }
    Ok((Shape::from(od), m, out, inp))
}

/// Layout of x seen as a 2-D (m, k) matrix; x must be contiguous (checked by the caller).
fn as_2d(x: &Layout, m: usize, k: usize) -> Layout {
    Layout::contiguous_with_offset((m, k), x.start_offset())
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "petal-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (shape, m, n, k) = out_shape(xl, wl)?;
        let wt = wl.transpose(0, 1)?; // (in, out) view of W
        let y = xs.matmul(ws, (1, m, n, k), &as_2d(xl, m, k), &wt)?;
        Ok((y, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (shape, m, n, k) = out_shape(xl, wl)?;
        let wt = wl.transpose(0, 1)?;
        let y = xs.matmul(ws, (1, m, n, k), &as_2d(xl, m, k), &wt)?;
        Ok((y, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // dL/dx = dL/dy W ; W is frozen: its gradient is never computed.
        let out = w.dim(0)?;
        let g2 = grad.contiguous()?.reshape((grad.elem_count() / out, out))?;
        let mut dims = grad.dims().to_vec();
        if let Some(l) = dims.last_mut() {
            *l = w.dim(1)?;
        }
        Ok((Some(g2.matmul(w)?.reshape(dims)?), None))
    }
}

/// `x (.., in) @ W^T (in, out) + b`, with no weight gradient ever computed.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = x.apply_op2(w, FrozenLinear)?; // records a backward only when x tracks one
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// The readable twin: candle's matmul (computes W's gradient too).
pub fn frozen_linear_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::rand;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_equals_matmul_reference_in_value_and_input_gradient() {
        let x = Var::from_tensor(&rand(&[2, 3, 5], 1)).unwrap();
        let w = rand(&[4, 5], 2);
        let b = rand(&[4], 3);
        let fast = frozen_linear(x.as_tensor(), &w, Some(&b)).unwrap();
        let slow = frozen_linear_reference(x.as_tensor(), &w, Some(&b)).unwrap();
        let d = (&fast - &slow).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        let g1 = fast.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = slow.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let d = (g1.get(&x).unwrap() - g2.get(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap();
        assert!(d.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-4);
        assert!(g1.get(&w).is_none(), "frozen weight must get no gradient");
    }

    #[test]
    fn frozen_linear_input_gradient_matches_finite_differences() {
        let x0 = rand(&[3, 4], 7);
        let w = rand(&[2, 4], 8);
        let x = Var::from_tensor(&x0).unwrap();
        let loss = |t: &Tensor| {
            frozen_linear(t, &w, None)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let g = loss(x.as_tensor()).backward().unwrap();
        let g = g
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = x0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-2f32;
        for i in 0..base.len() {
            let mut p = base.clone();
            p[i] += eps;
            let mut m = base.clone();
            m[i] -= eps;
            let f = |v: Vec<f32>| {
                let t = Tensor::from_vec(v, (3, 4), &Device::Cpu).unwrap();
                loss(&t).to_scalar::<f32>().unwrap()
            };
            let fd = (f(p) - f(m)) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 1e-2 * (1.0 + fd.abs()),
                "{i}: fd {fd} vs {}",
                g[i]
            );
        }
    }
}
