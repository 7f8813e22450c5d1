//! `y = x W^T (+ b)` for a frozen weight `W (out, in)`: a custom op whose backward returns the
//! input gradient only. candle's matmul backward computes the gradient of both operands, so a
//! plain `x.matmul(&w.t())` would spend a full extra matmul (and its memory) on a gradient that
//! nobody reads; this op never computes it.

use crate::bf16;
use crate::cpu::{act_out, act_rows, bf16s, fast_bf16_ok, last_dim, with_last};
use crate::Kernels;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `fused`: few-row products take the `skinny` kernel (else candle's matmul throughout).
struct FrozenLinear {
    fused: bool,
}

fn out_shape(x: &Layout, w: &Layout) -> Result<(Shape, usize, usize, usize)> {
    let (out, inp) = w.shape().dims2()?;
    let xd = x.shape().dims();
    let k = *xd.last().unwrap_or(&0);
    if k != inp {
        candle_core::bail!("frozen_linear: input has {k} features, weight expects {inp}")
    }
    let m = x.shape().elem_count() / inp.max(1);
    Ok((with_last(xd, out), m, out, inp))
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
        let y = crate::cpu::matmul_wt(xs, &as_2d(xl, m, k), ws, wl, (m, n, k), self.fused)?;
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
        let dims = with_last(grad.dims(), w.dim(1)?);
        Ok((Some(g2.matmul(w)?.reshape(dims)?), None))
    }
}

/// `y = x W^T + b` in one op (f32 on the CPU): a bias added after the product would keep the
/// product alive for backward, an (n, out) tensor nobody reads. Backward: x's gradient, and b's
/// (the rows' sum) where b is trained (BitFit); W's never.
struct FrozenLinearBias {
    fused: bool,
}

impl candle_core::CustomOp3 for FrozenLinearBias {
    fn name(&self) -> &'static str {
        "petal-frozen-linear-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (shape, m, n, k) = out_shape(xl, wl)?;
        let b = crate::cpu::f32s(bs, bl)?;
        if b.len() != n {
            candle_core::bail!(
                "frozen_linear: bias has {} values, weight has {n} rows",
                b.len()
            )
        }
        let mut y = crate::cpu::matmul_wt(xs, &as_2d(xl, m, k), ws, wl, (m, n, k), self.fused)?;
        let CpuStorage::F32(v) = &mut y else {
            candle_core::bail!("frozen_linear: the biased op takes f32")
        };
        for row in v.chunks_mut(n) {
            row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        }
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let out = w.dim(0)?;
        let g2 = grad.contiguous()?.reshape((grad.elem_count() / out, out))?;
        let dims = with_last(grad.dims(), w.dim(1)?);
        let db = b.track_op().then(|| g2.sum(0)).transpose()?;
        // x's gradient only where x has a graph (not after a frozen embedding)
        let dx = x
            .track_op()
            .then(|| g2.matmul(w)?.reshape(dims))
            .transpose()?;
        Ok((dx, None, db))
    }
}

/// `x W^T` (`wt`) or `x W` for f32 or bf16 `x` and a bf16 `W (out, in)` through the
/// AVX512-BF16 kernel (f32 accumulation, output in x's dtype); backward gives x's gradient
/// through the other orientation.
pub(crate) struct Bf16Linear {
    pub wt: bool,
}

impl CustomOp2 for Bf16Linear {
    fn name(&self) -> &'static str {
        "petal-bf16-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows_w, cols_w) = wl.shape().dims2()?;
        let (k, n) = if self.wt {
            (cols_w, rows_w)
        } else {
            (rows_w, cols_w)
        };
        let x = act_rows(xs, xl)?;
        if last_dim(xl) != k {
            candle_core::bail!(
                "bf16 linear: input has {} features, weight expects {k}",
                last_dim(xl)
            )
        }
        let y = bf16::linear(x, bf16s(ws, wl)?, rows_w, cols_w, self.wt);
        Ok((act_out(y, xs.dtype())?, with_last(xl.shape().dims(), n)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = grad
            .contiguous()?
            .apply_op2(w, Bf16Linear { wt: !self.wt })?;
        Ok((Some(dx), None))
    }
}

/// `x (.., in) @ W^T (in, out) + b`, with no weight gradient ever computed. An f32 input on a
/// bf16 weight takes the AVX512-BF16 kernel where the CPU has it, else is rounded to bf16 for
/// candle's matmul; the output keeps x's dtype.
pub fn frozen_linear(k: Kernels, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = || FrozenLinear { fused: k.fused() };
    // records a backward only when x tracks one
    let y = if fast_bf16_ok(k, &x, w) {
        x.apply_op2(w, Bf16Linear { wt: true })?
    } else if x.dtype() != w.dtype() {
        x.to_dtype(w.dtype())?
            .apply_op2(w, op())?
            .to_dtype(x.dtype())?
    } else if let Some(b) = b.filter(|b| {
        x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && b.dtype() == x.dtype()
    }) {
        // the bias inside the op: no (n, out) product kept for backward
        return x.apply_op3(w, &b.contiguous()?, FrozenLinearBias { fused: k.fused() });
    } else {
        x.apply_op2(w, op())?
    };
    match b {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
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
        let fast = frozen_linear(Kernels::FUSED, x.as_tensor(), &w, Some(&b)).unwrap();
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
    fn a_trained_bias_inside_the_op_gets_the_reference_gradient_and_w_none() {
        for rows in [3, 40] {
            // few rows (the skinny kernel) and many (gemm)
            let x = Var::from_tensor(&rand(&[2, rows, 5], 1)).unwrap();
            let w = rand(&[4, 5], 2);
            let b = Var::from_tensor(&rand(&[4], 3)).unwrap();
            let fast =
                frozen_linear(Kernels::FUSED, x.as_tensor(), &w, Some(b.as_tensor())).unwrap();
            let slow = frozen_linear_reference(x.as_tensor(), &w, Some(b.as_tensor())).unwrap();
            assert!(crate::testing::max_abs(&fast, &slow) < 1e-5);
            let proj = rand(fast.dims(), 4);
            let grads = |t: &Tensor| (t * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let (g1, g2) = (grads(&fast), grads(&slow));
            for v in [&x, &b] {
                let (a, e) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(crate::testing::max_abs(a, e) < 1e-4, "{rows} rows");
            }
            assert!(g1.get(&w).is_none(), "frozen weight must get no gradient");
        }
    }

    #[test]
    fn frozen_linear_on_a_bf16_weight_equals_the_bf16_rounded_f32_product_and_its_input_gradient() {
        if !crate::bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let round = |t: &Tensor| {
            t.to_dtype(candle_core::DType::BF16)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
        };
        let x = Var::from_tensor(&rand(&[2, 9, 70], 1)).unwrap();
        let w = rand(&[33, 70], 2)
            .to_dtype(candle_core::DType::BF16)
            .unwrap();
        let r = rand(&[2, 9, 33], 3); // loss = sum(y * r): dL/dy = r
        let y = frozen_linear(Kernels::FUSED, x.as_tensor(), &w, None).unwrap();
        assert_eq!(y.dtype(), candle_core::DType::F32);
        let wf = round(&w);
        let want = round(x.as_tensor())
            .broadcast_matmul(&wf.t().unwrap())
            .unwrap();
        assert!(crate::testing::max_rel(&y, &want) < 1e-5);
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let want = round(&r).broadcast_matmul(&wf).unwrap();
        assert!(crate::testing::max_rel(g.get(&x).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn frozen_linear_input_gradient_matches_finite_differences() {
        let x0 = rand(&[3, 4], 7);
        let w = rand(&[2, 4], 8);
        let x = Var::from_tensor(&x0).unwrap();
        let loss = |t: &Tensor| {
            frozen_linear(Kernels::FUSED, t, &w, None)
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
