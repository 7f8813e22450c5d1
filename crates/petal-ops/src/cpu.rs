//! Shared plumbing of the CPU kernels: contiguous f32 views, and whether a tensor takes them.

use crate::Kernels;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// The SIMD features of this CPU that petal's kernels (and gemm's) dispatch on.
pub fn features() -> Vec<&'static str> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let all = [
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512vnni", has!("avx512vnni")),
            ("avx512bf16", has!("avx512bf16")),
        ];
        v.extend(all.iter().filter(|f| f.1).map(|f| f.0));
        if crate::amx::Bf16Kernel::chosen() == crate::amx::Bf16Kernel::Amx {
            v.push("amx-bf16"); // the bf16 products take AMX (not with PETAL_BF16_KERNEL=avx512-bf16)
        }
    }
    v
}

/// Whether `t` can take a fused CPU f32 kernel under `k`.
pub fn fast_ok(k: Kernels, t: &Tensor) -> bool {
    k.fused() && t.device().is_cpu() && t.dtype() == DType::F32
}

/// Whether `t` can take a fused CPU kernel that reads activations in f32 or bf16 (a bf16 input
/// is widened to f32 as it is read, the result rounded back to bf16 as it is stored: f32
/// arithmetic, bf16 storage).
pub fn fast_act_ok(k: Kernels, t: &Tensor) -> bool {
    k.fused() && t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::BF16)
}

/// Elements per rayon task in the dtype conversions.
const CONVERT_CHUNK: usize = 1 << 15;

/// A contiguous f32 or bf16 input as f32: borrowed as is, or widened from bf16.
pub(crate) fn act_in<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [f32]>> {
    if let CpuStorage::BF16(_) = s {
        let b = bf16s(s, l)?;
        let mut y = vec![0f32; b.len()];
        y.par_chunks_mut(CONVERT_CHUNK)
            .zip(b.par_chunks(CONVERT_CHUNK))
            .for_each(|(y, b)| crate::bf16::widen(b, y));
        return Ok(Cow::Owned(y));
    }
    Ok(Cow::Borrowed(f32s(s, l)?))
}

/// f32 results stored in `dt`: as they are for f32, rounded to the nearest bf16 for bf16.
pub(crate) fn act_out(y: Vec<f32>, dt: DType) -> Result<CpuStorage> {
    match dt {
        DType::F32 => Ok(CpuStorage::F32(y)),
        DType::BF16 => Ok(CpuStorage::BF16(narrow_par(&y))),
        dt => candle_core::bail!("petal-ops: activations in {dt:?} have no fused kernel"),
    }
}

/// `t` converted between f32 and bf16 on the CPU by the vectorised, parallel conversions,
/// without a graph (for backward passes); other cases go through `to_dtype`.
pub(crate) fn cast(t: &Tensor, dt: DType) -> Result<Tensor> {
    let pair = matches!(
        (t.dtype(), dt),
        (DType::F32, DType::BF16) | (DType::BF16, DType::F32)
    );
    if !t.device().is_cpu() || !pair {
        return t.detach().to_dtype(dt);
    }
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("petal-ops: cast of a tensor that is not on the CPU")
    };
    let st = match s {
        CpuStorage::BF16(_) => CpuStorage::F32(act_in(s, l)?.into_owned()),
        _ => CpuStorage::BF16(narrow_par(f32s(s, l)?)),
    };
    Ok(tensor(st, t.shape()))
}

/// f32 values rounded to bf16, in parallel chunks.
fn narrow_par(x: &[f32]) -> Vec<half::bf16> {
    let mut b = vec![half::bf16::ZERO; x.len()];
    b.par_chunks_mut(CONVERT_CHUNK)
        .zip(x.par_chunks(CONVERT_CHUNK))
        .for_each(|(b, x)| {
            // SAFETY: half::bf16 is a transparent wrapper of u16: same size, alignment and
            // validity.
            let bits =
                unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut u16, b.len()) };
            crate::bf16::narrow(x, bits)
        });
    b
}

/// A contiguous f32 or bf16 input as the bf16 kernel's left operand.
pub(crate) fn act_rows<'a>(s: &'a CpuStorage, l: &Layout) -> Result<crate::bf16::Rows<'a>> {
    Ok(match s {
        CpuStorage::BF16(_) => crate::bf16::Rows::Bf16(bf16s(s, l)?),
        _ => crate::bf16::Rows::F32(f32s(s, l)?),
    })
}

/// A graph-free CPU tensor over `st`, contiguous in `shape`.
pub(crate) fn tensor(st: CpuStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        candle_core::Storage::Cpu(st),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// Whether a linear on input `x` with weight `w` can take a fused CPU f32 kernel.
pub fn fast_linear_ok(k: Kernels, x: &Tensor, w: &Tensor) -> bool {
    fast_ok(k, x) && w.dtype() == DType::F32
}

/// Whether `lora_linear` on input `x` and weight `w` runs fused (f32, or a bf16 weight on the
/// AVX512-BF16 kernel).
pub fn fast_lora_ok(k: Kernels, x: &Tensor, w: &Tensor) -> bool {
    fast_linear_ok(k, x, w) || fast_bf16_ok(k, x, w)
}

/// Whether a linear on input `x` (f32 or bf16) with bf16 weight `w` can take the AVX512-BF16
/// kernel.
pub fn fast_bf16_ok(k: Kernels, x: &Tensor, w: &Tensor) -> bool {
    fast_act_ok(k, x) && w.dtype() == DType::BF16 && crate::bf16::available()
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

/// `(k, n)` of a product's right operand made from `rows` rows of `cols` values: the rows'
/// transpose (`transposed`: the forward `x W^T`) or the rows themselves (the input gradient).
pub(crate) fn k_n(rows: usize, cols: usize, transposed: bool) -> (usize, usize) {
    if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    }
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

/// `x (m, k) W^T` with `W (n, k)`, both f32 and laid out contiguously: few rows (decoding)
/// through `skinny` where `fused` allows, more through `gemm` (via candle's matmul).
pub(crate) fn matmul_wt(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    (m, n, k): (usize, usize, usize),
    fused: bool,
) -> Result<CpuStorage> {
    use candle_core::backend::BackendStorage;
    if let (CpuStorage::F32(_), CpuStorage::F32(_)) = (xs, ws) {
        if fused && crate::skinny::takes(m) {
            if let (Ok(x), Ok(w)) = (f32s(xs, xl), f32s(ws, wl)) {
                return Ok(CpuStorage::F32(crate::skinny::xwt(x, w, m, n, k)));
            }
        }
    }
    xs.matmul(ws, (1, m, n, k), xl, &wl.transpose(0, 1)?)
}

/// `c (m, n) = [c +] alpha x (m, k) W^T` for row-major `x` and `W (n, k)`: few rows through
/// `skinny` (W read in place), more through `gemm` on the thread pool.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm_wt(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    acc: bool,
    alpha: f32,
    x: &[f32],
    w: &[f32],
) {
    if !crate::skinny::takes(m) {
        return mm(m, n, k, c, acc, alpha, rows(x, k), cols(w, k), true);
    }
    let y = crate::skinny::xwt(x, w, m, n, k);
    for (c, y) in c[..m * n].iter_mut().zip(y) {
        *c = if acc { *c + alpha * y } else { alpha * y };
    }
}
