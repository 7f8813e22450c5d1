//! The products of a quantized frozen weight: forward `x W^T` and input gradient `g W` by
//! tiles of W decoded into f32 (or bf16) buffers, few-row decoding by 8-bit block dot products,
//! and LoRA over a quantized linear as one node.

use super::tiles::{forward_into, input_grad};
use super::{dequantize, QFormat};
use crate::cpu::{f32s, with_last};
use crate::Kernels;
use candle_core::backend::BackendStorage;
use candle_core::quantized::k_quants::{self as kq, GgmlType};
use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `y (m, n) = x (m, k) W^T` for a few rows, as llama.cpp decodes: each row of x quantized to
/// `T`'s companion 8-bit blocks, then candle's block dot products (AVX2 where candle has them),
/// W read in place. Not exact (x is rounded to 8 bits per block): inference only.
fn few_rows_as<T: GgmlType>(x: &[f32], m: usize, k: usize, w: &[u8], n: usize) -> Vec<f32> {
    type Q<T> = <T as GgmlType>::VecDotType;
    let xq: Vec<Vec<Q<T>>> = x
        .chunks_exact(k)
        .map(|r| {
            let mut b = vec![Q::<T>::zeros(); k / Q::<T>::BLCK_SIZE];
            Q::<T>::from_float(r, &mut b);
            b
        })
        .collect();
    let size = std::mem::size_of::<T>();
    let rb = k / T::BLCK_SIZE * size;
    by_rows_of_w(
        w,
        rb,
        m,
        n,
        || (),
        |_, row, out| {
            let blocks = super::as_blocks::<T>(row);
            out.extend(xq.iter().map(|xr| T::vec_dot(k, &blocks, xr)));
        },
    )
}

/// `y (m, n)` made a row of W at a time (rows of `rb` bytes, a few per task on rayon's
/// threads): `dots(scratch, row, out)` pushes that row's m products, one per row of x, with a
/// scratch buffer per task from `init`; the products come out by rows of W and are transposed.
pub(super) fn by_rows_of_w<S>(
    w: &[u8],
    rb: usize,
    m: usize,
    n: usize,
    init: impl Fn() -> S + Sync,
    dots: impl Fn(&mut S, &[u8], &mut Vec<f32>) + Sync,
) -> Vec<f32> {
    let per = 16;
    let yt: Vec<f32> = w
        .par_chunks(per * rb)
        .flat_map_iter(|chunk| {
            let (mut scratch, mut out) = (init(), Vec::with_capacity(per * m));
            for row in chunk.chunks_exact(rb) {
                dots(&mut scratch, row, &mut out);
            }
            out
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (o, col) in yt.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            y[i * n + o] = *v;
        }
    }
    y
}

/// The few-row product of a GGML type where candle has one: its dot products need an even
/// number of 32-value blocks per row for the legacy types.
pub(super) fn ggml_few_rows(
    t: GgmlDType,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
) -> Option<Vec<f32>> {
    if t == GgmlDType::Q4_1 {
        return super::q4_1_rows::few_rows_on(super::simd::Simd::best()?, x, m, k, w, n);
        // x stays f32
    }
    let even = (k / 32).is_multiple_of(2);
    Some(match t {
        GgmlDType::Q4_0 if even => few_rows_as::<kq::BlockQ4_0>(x, m, k, w, n),
        GgmlDType::Q8_0 if even => few_rows_as::<kq::BlockQ8_0>(x, m, k, w, n),
        GgmlDType::Q2K => few_rows_as::<kq::BlockQ2K>(x, m, k, w, n),
        GgmlDType::Q3K => few_rows_as::<kq::BlockQ3K>(x, m, k, w, n),
        GgmlDType::Q4K => few_rows_as::<kq::BlockQ4K>(x, m, k, w, n),
        GgmlDType::Q5K => few_rows_as::<kq::BlockQ5K>(x, m, k, w, n),
        GgmlDType::Q6K => few_rows_as::<kq::BlockQ6K>(x, m, k, w, n),
        _ => return None,
    })
}

/// `y (m, n) = x (m, k) W^T`, W given as `n` quantized rows, tile products in `mode`; `exact`
/// keeps x in f32 for any number of rows (a pass that will take a gradient).
pub(crate) fn forward_rows(
    x: &[f32],
    m: usize,
    fmt: QFormat,
    w: &[u8],
    n: usize,
    mode: Mode,
    exact: bool,
) -> Vec<f32> {
    if !exact && crate::skinny::takes(m) {
        if let Some(y) = fmt.q.few_rows(x, m, fmt.cols, w, n) {
            return y;
        }
    }
    let mut y = vec![0f32; m * n];
    forward_into(x, m, fmt, w, n, &mut y, mode);
    y
}

/// The arithmetic of the tile products (`Kernels::frozen`, resolved for this CPU).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mode {
    F32,
    /// tiles rounded to bf16 for the AVX512-BF16 kernel (x rounded too, as autocast does)
    Bf16,
    /// tiles and x in 8-bit codes (`crate::int8`)
    Int8,
    /// f32 tiles, but the forward products over 4-bit weights take their own codes times x's
    /// 8-bit ones, and every input gradient W's columns coded again in 4 bits times g's 8-bit
    /// codes (`int8::nibbles`, AVX2)
    Nibbles,
}

impl Mode {
    /// Whether the products that take no codes decode tiles to f32.
    pub(crate) fn f32_tiles(self) -> bool {
        matches!(self, Mode::F32 | Mode::Nibbles)
    }

    /// The nibble kernel the forward `x W^T` over `fmt` takes, if it runs on W's 4-bit codes:
    /// in nibbles mode, and in 8-bit mode on the 256-bit kernels (which round W to 8 bits
    /// again), where the format has them.
    pub(crate) fn nibbles(self, fmt: QFormat) -> Option<crate::int8::Kind> {
        use crate::int8::Kind;
        let int8 = matches!(Kind::chosen(), Kind::Avx2 | Kind::AvxVnni);
        let asks = self == Mode::Nibbles || (self == Mode::Int8 && int8);
        (asks && fmt.q.has_nibbles()).then(Kind::nibbles).flatten()
    }
}

/// The tile arithmetic `k` asks for on this CPU: the reference kernels f32; `auto` bf16 with
/// AVX512-BF16, else 8-bit codes with AVX-512 VNNI or AVX-VNNI, else nibbles with AVX2 but no
/// AVX-512, else f32.
pub(crate) fn mode(k: Kernels) -> Mode {
    use crate::Frozen;
    let bf16 = crate::bf16::available();
    match k.frozen() {
        _ if !k.fused() => Mode::F32,
        Frozen::F32 => Mode::F32,
        Frozen::Bf16 | Frozen::Auto if bf16 => Mode::Bf16,
        Frozen::Auto if crate::int8::faster_than_f32() => Mode::Int8,
        Frozen::Auto if crate::int8::nibbles_by_default() => Mode::Nibbles,
        Frozen::Nibbles if crate::int8::Kind::nibbles().is_some() => Mode::Nibbles,
        Frozen::Int8 => Mode::Int8,
        _ => Mode::F32,
    }
}

/// The arithmetic of the frozen quantized products under `k` on this CPU, in words: `f32`,
/// `bf16 (amx-bf16)`, `bf16 (avx512-bf16)`, `int8 (avx512-vnni)`, `int8 (avx2)` ...
pub fn arithmetic(k: Kernels) -> String {
    match mode(k) {
        Mode::F32 => "f32".into(),
        Mode::Bf16 => format!("bf16 ({})", crate::amx::Bf16Kernel::chosen().name()),
        Mode::Int8 => format!("int8 ({})", crate::int8::Kind::chosen().name()),
        Mode::Nibbles => format!(
            "f32, except 4-bit weights' forward on their codes and every input gradient on W's columns coded in 4 bits ({})",
            crate::int8::Kind::nibbles().map_or("none", |k| k.name())
        ),
    }
}

/// The op: `x W^T` (`QLinear`) or `x W` (`QLinearT`, the input gradient's product).
struct QLinear {
    fmt: QFormat,
    transposed: bool,
    /// x stays f32 for any number of rows (else few rows take 8-bit dot products)
    exact: bool,
    /// the tile products' arithmetic
    mode: Mode,
}

impl CustomOp2 for QLinear {
    fn name(&self) -> &'static str {
        "petal-quant-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, rb) = wl.shape().dims2()?;
        if rb != self.fmt.row_bytes() {
            candle_core::bail!(
                "quantized linear: rows of {rb} bytes, {} expects {}",
                self.fmt.name(),
                self.fmt.row_bytes()
            )
        }
        let (k_in, k_out) = match self.transposed {
            false => (self.fmt.cols, n),
            true => (n, self.fmt.cols),
        };
        let last = *xl.dims().last().unwrap_or(&0);
        if last != k_in {
            candle_core::bail!("quantized linear: input has {last} features, weight expects {k_in}")
        }
        let x = f32s(xs, xl)?;
        let CpuStorage::U8(w) = ws else {
            candle_core::bail!(
                "quantized linear: the weight must be u8 blocks, not {:?}",
                ws.dtype()
            )
        };
        let (o1, o2) = wl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::msg("quantized linear: weight not contiguous"))?;
        let w = &w[o1..o2];
        let m = x.len() / k_in.max(1);
        let y = match self.transposed {
            false => forward_rows(x, m, self.fmt, w, n, self.mode, self.exact),
            true => input_grad(x, m, self.fmt, w, n, self.mode),
        };
        Ok((CpuStorage::F32(y), with_last(xl.dims(), k_out)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = QLinear {
            fmt: self.fmt,
            transposed: !self.transposed,
            exact: true,
            mode: self.mode,
        };
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(w, &op)?), None))
    }
}

/// `x W^T (+ b)` for f32 `x (.., cols)` and a quantized `w (rows, row_bytes)` in `fmt`; the
/// backward gives x's gradient only. x in another dtype is computed in f32 and cast back.
/// Without a gradient to take, a few rows (decoding) go through 8-bit dot products
/// (`few_rows`); everything else dequantizes tiles of W into f32 products.
/// With fused kernels on a CPU with AVX512-BF16, the products run in bf16 (tiles rounded to
/// bf16, f32 accumulation), as petal's bf16 path; `Kernels::REFERENCE`: f32 throughout.
pub fn quant_linear(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    fmt: QFormat,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    quant_linear_with(k, x, w, fmt, b, x.track_op())
}

/// `x W^T` in f32 products for any number of rows (no 8-bit few-row path, no bf16 or 8-bit
/// tiles): where a few rows must be exact, such as DoRA's `W A^T` for its norms.
pub fn quant_linear_exact(x: &Tensor, w: &Tensor, fmt: QFormat) -> Result<Tensor> {
    quant_linear_with(Kernels::REFERENCE, x, w, fmt, None, true)
}

/// `quant_linear`, exact (f32 x) for any number of rows when `exact`.
fn quant_linear_with(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    fmt: QFormat,
    b: Option<&Tensor>,
    exact: bool,
) -> Result<Tensor> {
    if !w.device().is_cpu() {
        candle_core::bail!("quantized linears run on the CPU only (for now)")
    }
    let dt = x.dtype();
    let op = QLinear {
        fmt,
        transposed: false,
        exact: exact || !k.fused(), // the reference kernels: f32 products throughout
        mode: mode(k),
    };
    let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op2(w, op)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    };
    y.to_dtype(dt)
}

/// `dx = g W` for the output gradient `g (.., rows)` of a quantized `w`: no graph node.
pub fn quant_input_grad(k: Kernels, g: &Tensor, w: &Tensor, fmt: QFormat) -> Result<Tensor> {
    input_grad_tensor(g, w, fmt, mode(k))
}

/// `quant_input_grad` in the given arithmetic (a fused op that resolved it at its forward).
pub(crate) fn input_grad_tensor(
    g: &Tensor,
    w: &Tensor,
    fmt: QFormat,
    mode: Mode,
) -> Result<Tensor> {
    let op = QLinear {
        fmt,
        transposed: true,
        exact: true,
        mode,
    };
    g.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op2_no_bwd(w, &op)
}

/// LoRA over a quantized base as one graph node: `x W^T + b + s h B^T`, with `h = dropout(x)
/// A^T (n, r)` formed by the caller (as `lora_linear`). The node keeps x, h and B only: not the
/// base output, the update or their sum (a composed `quant_linear` + update would keep two
/// (n, out) buffers per linear until backward). Backward: dx = g W (tiles decoded again),
/// dh = s g B, dB = s g^T h.
#[allow(clippy::too_many_arguments)]
pub fn quant_lora_linear(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    fmt: QFormat,
    bias: Option<&Tensor>,
    h: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (wc, bias) = (w.clone(), bias.cloned());
    let dt = x.dtype();
    let exact = x.track_op() || h.track_op() || b.track_op();
    crate::lean::lean3(
        [x, h, b],
        move |[x, h, b]| {
            let y = quant_linear_with(k, x, &wc, fmt, bias.as_ref(), exact)?;
            let y = y.to_dtype(DType::F32)?;
            let r = b.dim(1)?;
            let h2 = h.reshape((h.elem_count() / r, r))?.to_dtype(DType::F32)?;
            let up = (h2.matmul(&b.to_dtype(DType::F32)?.t()?)? * scale)?;
            let up = up.reshape(y.shape())?;
            (y + up)?.to_dtype(dt)
        },
        {
            let w = w.clone();
            move |[x, h, b], need, _, dy| {
                let (out, r) = b.dims2()?;
                let g = dy
                    .reshape((dy.elem_count() / out, out))?
                    .to_dtype(DType::F32)?;
                let dx = need[0]
                    .then(|| {
                        quant_input_grad(k, &g, &w, fmt)?
                            .to_dtype(x.dtype())?
                            .reshape(x.shape())
                    })
                    .transpose()?;
                let bf = b.to_dtype(DType::F32)?;
                let dh = need[1]
                    .then(|| {
                        (g.matmul(&bf)? * scale)?
                            .to_dtype(h.dtype())?
                            .reshape(h.shape())
                    })
                    .transpose()?;
                let db = need[2]
                    .then(|| {
                        let h2 = h.reshape((h.elem_count() / r, r))?.to_dtype(DType::F32)?;
                        (g.t()?.matmul(&h2)? * scale)?.to_dtype(b.dtype())
                    })
                    .transpose()?;
                Ok([dx, dh, db])
            }
        },
    )
}

/// The readable twin: all of W dequantized, then candle's matmul.
pub fn quant_linear_reference(
    x: &Tensor,
    w: &Tensor,
    fmt: QFormat,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    crate::frozen_linear::frozen_linear_reference(x, &dequantize(w, fmt)?, b)
}
