//! Shared plumbing of the CPU kernels: contiguous f32 views and a global fast/reference switch.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static FAST: AtomicBool = AtomicBool::new(true);

/// Use the fused kernels (default) or the composed reference ops everywhere.
pub fn set_fast(on: bool) {
    FAST.store(on, Ordering::Relaxed);
}

/// Whether `t` can take a fused CPU f32 kernel.
pub fn fast_ok(t: &Tensor) -> bool {
    FAST.load(Ordering::Relaxed) && t.device().is_cpu() && t.dtype() == DType::F32
}

/// Whether a linear on input `x` with weight `w` can take a fused CPU f32 kernel.
pub fn fast_linear_ok(x: &Tensor, w: &Tensor) -> bool {
    fast_ok(x) && w.dtype() == DType::F32
}

/// Whether `lora_linear` on input `x` and weight `w` runs fused (f32, or a bf16 weight on the
/// AVX512-BF16 kernel).
pub fn fast_lora_ok(x: &Tensor, w: &Tensor) -> bool {
    fast_linear_ok(x, w) || fast_bf16_ok(x, w)
}

/// Whether a linear on f32 input `x` with bf16 weight `w` can take the AVX512-BF16 kernel.
pub fn fast_bf16_ok(x: &Tensor, w: &Tensor) -> bool {
    fast_ok(x) && w.dtype() == DType::BF16 && crate::bf16::available()
}

/// The raw bits of a contiguous bf16 storage.
pub(crate) fn bf16s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u16]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("petal-ops: kernel needs a contiguous weight".into())
    })?;
    let v = &s.as_slice::<half::bf16>()?[a..b];
    // SAFETY: half::bf16 is a transparent wrapper of u16: same size, alignment and validity.
    Ok(unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()) })
}

pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("petal-ops: kernel needs a contiguous input".into())
    })?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// `dims` with the last one replaced by `n` (a linear's output shape).
pub(crate) fn with_last(dims: &[usize], n: usize) -> Shape {
    let mut d = dims.to_vec();
    if let Some(l) = d.last_mut() {
        *l = n;
    }
    Shape::from(d)
}

pub(crate) fn last_dim(l: &Layout) -> usize {
    *l.shape().dims().last().unwrap_or(&1)
}

/// A row-major matrix view: element (i, j) at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub x: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

pub(crate) fn rows(x: &[f32], width: usize) -> View<'_> {
    View {
        x,
        rs: width,
        cs: 1,
    }
}

/// The transpose of row-major `x` with `width` columns.
pub(crate) fn cols(x: &[f32], width: usize) -> View<'_> {
    View {
        x,
        rs: 1,
        cs: width,
    }
}

/// `c (m, n, row-major) = [c +] alpha a (m, k) b (k, n)` through the `gemm` crate (the matrix
/// multiply candle uses), on rayon's threads with `par`, else on this one.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    acc: bool,
    alpha: f32,
    a: View,
    b: View,
    par: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |v: View, r: usize, q: usize| (r - 1) * v.rs + (q - 1) * v.cs;
    assert!(c.len() >= m * n && (k == 0 || last(a, m, k) < a.x.len() && last(b, k, n) < b.x.len()));
    // SAFETY: every index the product touches is within the slices (checked above), and `c`
    // does not alias `a` or `b` (a &mut and two & borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.x.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.x.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            if par {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            } else {
                gemm::Parallelism::None
            },
        )
    }
}
