//! Frozen linears whose weight stays in a GGUF block format: `y = x W^T` and its input gradient
//! `dx = dy W`, with W dequantized a tile of rows at a time inside the op (never a full f32 copy,
//! never a weight gradient). The weight is held as its raw blocks in a `u8` tensor of shape
//! `(rows, row_bytes)`; a [`QFormat`] says how to read them. Blocks are decoded by candle's own
//! `GgmlType::to_float` (the code its `QTensor::dequantize` runs), products go through `gemm`
//! (dispatched at run time on AVX-512 / AVX2+FMA).
//!
//! The readable twin, [`quant_linear_reference`], dequantizes all of W and multiplies by
//! candle's matmul; the tests hold the op to it for every block type.

use crate::cpu::{f32s, mm, rows, with_last, View};
use candle_core::backend::BackendStorage;
use candle_core::quantized::k_quants::{self as kq, GgmlType};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub use candle_core::quantized::GgmlDType;

/// The block types a quantized frozen linear may hold (GGUF's legacy and k-quant types).
pub const BLOCK_TYPES: &[GgmlDType] = &[
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// How a quantized weight's rows are stored: the block type and the row length in values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QFormat {
    pub dtype: GgmlDType,
    pub cols: usize,
}

/// llama.cpp's name of a block type (`q4_k`, `q8_0`, ...).
pub fn type_name(t: GgmlDType) -> String {
    format!("{t:?}").to_lowercase().replace('k', "_k")
}

impl QFormat {
    /// A format for rows of `cols` values in blocks of `dtype`: an error naming the type when
    /// petal does not implement it, or when the rows are not whole blocks.
    pub fn new(dtype: GgmlDType, cols: usize) -> std::result::Result<Self, String> {
        if !BLOCK_TYPES.contains(&dtype) {
            return Err(format!(
                "block type {} is not implemented for quantized linears (petal runs {})",
                type_name(dtype),
                BLOCK_TYPES
                    .iter()
                    .map(|t| type_name(*t))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let block = dtype.block_size();
        if cols == 0 || cols % block != 0 {
            return Err(format!(
                "rows of {cols} values are not whole {} blocks of {block}",
                type_name(dtype)
            ));
        }
        Ok(QFormat { dtype, cols })
    }

    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    pub fn name(&self) -> String {
        type_name(self.dtype)
    }
}

/// Decode whole blocks of `T` from `bytes` into `out` (`bytes.len() / size_of::<T>()` blocks).
fn decode_as<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let size = std::mem::size_of::<T>();
    let n = bytes.len() / size;
    debug_assert!(bytes.len() == n * size && out.len() == n * T::BLCK_SIZE);
    if bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0 {
        // SAFETY: aligned, in bounds, and every block type is plain data (f16 scales and u8
        // quants, repr(C)): any bit pattern is a valid value.
        let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n) };
        T::to_float(blocks, out);
    } else {
        for (b, o) in bytes
            .chunks_exact(size)
            .zip(out.chunks_exact_mut(T::BLCK_SIZE))
        {
            // SAFETY: `b` holds size_of::<T>() bytes; plain data as above.
            let block = unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) };
            T::to_float(std::slice::from_ref(&block), o);
        }
    }
}

/// Dequantize whole rows: `bytes` holds `out.len() / fmt.cols` rows in `fmt`.
pub fn dequantize_rows(fmt: QFormat, bytes: &[u8], out: &mut [f32]) {
    match fmt.dtype {
        GgmlDType::Q4_0 => decode_as::<kq::BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => decode_as::<kq::BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => decode_as::<kq::BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => decode_as::<kq::BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => decode_as::<kq::BlockQ8_0>(bytes, out),
        GgmlDType::Q2K => decode_as::<kq::BlockQ2K>(bytes, out),
        GgmlDType::Q3K => decode_as::<kq::BlockQ3K>(bytes, out),
        GgmlDType::Q4K => decode_as::<kq::BlockQ4K>(bytes, out),
        GgmlDType::Q5K => decode_as::<kq::BlockQ5K>(bytes, out),
        GgmlDType::Q6K => decode_as::<kq::BlockQ6K>(bytes, out),
        other => unreachable!("QFormat::new refuses {other:?}"),
    }
}

/// Dequantize `rows` rows in parallel (chunks of rows per task).
fn dequantize_par(fmt: QFormat, bytes: &[u8], out: &mut [f32]) {
    let (rb, k) = (fmt.row_bytes(), fmt.cols);
    let per = (16384 / k).max(1);
    out.par_chunks_mut(per * k)
        .zip(bytes.par_chunks(per * rb))
        .for_each(|(o, b)| dequantize_rows(fmt, b, o));
}

fn quantize_as<T: GgmlType>(x: &[f32]) -> Vec<u8> {
    let mut blocks = vec![T::zeros(); x.len() / T::BLCK_SIZE];
    T::from_float(x, &mut blocks);
    let size = std::mem::size_of::<T>();
    // SAFETY: the blocks are plain data; read back as their bytes.
    let bytes =
        unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), blocks.len() * size) };
    bytes.to_vec()
}

/// Quantize f32 rows (row-major, `fmt.cols` wide) into `fmt`'s blocks, by candle's quantizers.
pub fn quantize_rows(fmt: QFormat, x: &[f32]) -> Vec<u8> {
    match fmt.dtype {
        GgmlDType::Q4_0 => quantize_as::<kq::BlockQ4_0>(x),
        GgmlDType::Q4_1 => quantize_as::<kq::BlockQ4_1>(x),
        GgmlDType::Q5_0 => quantize_as::<kq::BlockQ5_0>(x),
        GgmlDType::Q5_1 => quantize_as::<kq::BlockQ5_1>(x),
        GgmlDType::Q8_0 => quantize_as::<kq::BlockQ8_0>(x),
        GgmlDType::Q2K => quantize_as::<kq::BlockQ2K>(x),
        GgmlDType::Q3K => quantize_as::<kq::BlockQ3K>(x),
        GgmlDType::Q4K => quantize_as::<kq::BlockQ4K>(x),
        GgmlDType::Q5K => quantize_as::<kq::BlockQ5K>(x),
        GgmlDType::Q6K => quantize_as::<kq::BlockQ6K>(x),
        other => unreachable!("QFormat::new refuses {other:?}"),
    }
}

/// A quantized weight tensor `(rows, fmt.row_bytes())` of `u8` from f32 `w (rows, cols)`.
pub fn quantize(w: &Tensor, dtype: GgmlDType) -> Result<(Tensor, QFormat)> {
    let (n, k) = w.dims2()?;
    let fmt = QFormat::new(dtype, k).map_err(candle_core::Error::msg)?;
    let x = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let bytes = quantize_rows(fmt, &x);
    Ok((
        Tensor::from_vec(bytes, (n, fmt.row_bytes()), w.device())?,
        fmt,
    ))
}

/// The whole weight `(rows, cols)` in f32 (for tests, exports and the methods that need W).
pub fn dequantize(w: &Tensor, fmt: QFormat) -> Result<Tensor> {
    let n = w.dim(0)?;
    let bytes = w.flatten_all()?.to_vec1::<u8>()?;
    let mut out = vec![0f32; n * fmt.cols];
    dequantize_par(fmt, &bytes, &mut out);
    Tensor::from_vec(out, (n, fmt.cols), w.device())
}

/// Rows `ids` (any shape, integer) of a quantized table, dequantized: `(ids.., cols)` in f32.
/// Only the rows looked up are decoded (the token embedding of a quantized model).
pub fn lookup(w: &Tensor, fmt: QFormat, ids: &Tensor) -> Result<Tensor> {
    let picked = w.index_select(&ids.flatten_all()?, 0)?;
    let mut dims = ids.dims().to_vec();
    dims.push(fmt.cols);
    dequantize(&picked, fmt)?.reshape(dims)
}

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
    let per = 16;
    let yt: Vec<f32> = w
        .par_chunks(per * rb)
        .flat_map_iter(|chunk| {
            let mut out = Vec::with_capacity(per * m);
            let mut copy: Vec<T> = Vec::new();
            for row in chunk.chunks_exact(rb) {
                let blocks: &[T] = if row.as_ptr().align_offset(std::mem::align_of::<T>()) == 0 {
                    // SAFETY: aligned, in bounds, plain-data blocks (see decode_as)
                    unsafe { std::slice::from_raw_parts(row.as_ptr().cast::<T>(), rb / size) }
                } else {
                    copy.clear();
                    copy.extend(row.chunks_exact(size).map(|b| {
                        // SAFETY: `b` holds one block's bytes; plain data
                        unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
                    }));
                    &copy
                };
                out.extend(xq.iter().map(|xr| T::vec_dot(k, blocks, xr)));
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

/// The few-row product where `fmt` has one: candle's dot products need an even number of
/// 32-value blocks per row for the legacy types.
fn few_rows(x: &[f32], m: usize, fmt: QFormat, w: &[u8], n: usize) -> Option<Vec<f32>> {
    let k = fmt.cols;
    let even = (k / 32) % 2 == 0;
    Some(match fmt.dtype {
        GgmlDType::Q4_0 if even => few_rows_as::<kq::BlockQ4_0>(x, m, k, w, n),
        GgmlDType::Q4_1 if even => few_rows_as::<kq::BlockQ4_1>(x, m, k, w, n),
        GgmlDType::Q5_0 if even => few_rows_as::<kq::BlockQ5_0>(x, m, k, w, n),
        GgmlDType::Q5_1 if even => few_rows_as::<kq::BlockQ5_1>(x, m, k, w, n),
        GgmlDType::Q8_0 if even => few_rows_as::<kq::BlockQ8_0>(x, m, k, w, n),
        GgmlDType::Q2K => few_rows_as::<kq::BlockQ2K>(x, m, k, w, n),
        GgmlDType::Q3K => few_rows_as::<kq::BlockQ3K>(x, m, k, w, n),
        GgmlDType::Q4K => few_rows_as::<kq::BlockQ4K>(x, m, k, w, n),
        GgmlDType::Q5K => few_rows_as::<kq::BlockQ5K>(x, m, k, w, n),
        GgmlDType::Q6K => few_rows_as::<kq::BlockQ6K>(x, m, k, w, n),
        _ => return None,
    })
}

/// Rows of W decoded per tile: about 1 MiB of f32, at least 16 rows.
fn tile_rows(k: usize) -> usize {
    ((1 << 18) / k.max(1)).clamp(16, 512)
}

/// `y (m, n) = x (m, k) W^T`, W given as `n` quantized rows; `exact` keeps x in f32 for any
/// number of rows (a pass that will take a gradient).
fn forward(x: &[f32], m: usize, fmt: QFormat, w: &[u8], n: usize, exact: bool) -> Vec<f32> {
    if !exact && crate::skinny::takes(m) {
        if let Some(y) = few_rows(x, m, fmt, w, n) {
            return y;
        }
    }
    let mut y = vec![0f32; m * n];
    forward_into(x, m, fmt, w, n, &mut y);
    y
}

/// `y (m, n) = x (m, k) W^T` in f32 throughout, into row-major `y` (overwritten).
pub(crate) fn forward_into(x: &[f32], m: usize, fmt: QFormat, w: &[u8], n: usize, y: &mut [f32]) {
    let (k, rb) = (fmt.cols, fmt.row_bytes());
    if crate::skinny::takes(m) {
        // few rows: each task decodes a few rows of W and dots them with every row of x
        let per = 8;
        let cols: Vec<Vec<f32>> = w
            .par_chunks(per * rb)
            .map_init(
                || vec![0f32; per * k],
                |wt, b| {
                    let r = b.len() / rb;
                    dequantize_rows(fmt, b, &mut wt[..r * k]);
                    crate::skinny::xwt(x, &wt[..r * k], m, r, k)
                },
            )
            .collect();
        for (t, c) in cols.iter().enumerate() {
            let r = c.len() / m;
            for i in 0..m {
                y[i * n + t * per..i * n + t * per + r].copy_from_slice(&c[i * r..(i + 1) * r]);
            }
        }
        return;
    }
    let tr = tile_rows(k);
    let mut tile = vec![0f32; tr * k];
    let mut part = vec![0f32; m * tr];
    for o0 in (0..n).step_by(tr) {
        let r = tr.min(n - o0);
        dequantize_par(fmt, &w[o0 * rb..(o0 + r) * rb], &mut tile[..r * k]);
        // part (m, r) = x (m, k) tile^T (k, r)
        let t = View { x: &tile[..r * k], rs: 1, cs: k };
        mm(m, r, k, &mut part[..m * r], false, 1.0, rows(x, k), t, true);
        for i in 0..m {
            y[i * n + o0..i * n + o0 + r].copy_from_slice(&part[i * r..(i + 1) * r]);
        }
    }
}

/// `dx (m, k) = g (m, n) W`, W given as `n` quantized rows.
fn input_grad(g: &[f32], m: usize, fmt: QFormat, w: &[u8], n: usize) -> Vec<f32> {
    let mut dx = vec![0f32; m * fmt.cols];
    input_grad_into(g, m, fmt, w, n, &mut dx);
    dx
}

/// `dx (m, k) = g (m, n) W` into row-major `dx` (overwritten): a sum over tiles of W's rows.
pub(crate) fn input_grad_into(g: &[f32], m: usize, fmt: QFormat, w: &[u8], n: usize, dx: &mut [f32]) {
    let (k, rb) = (fmt.cols, fmt.row_bytes());
    let tr = tile_rows(k);
    let mut tile = vec![0f32; tr * k];
    for o0 in (0..n).step_by(tr) {
        let r = tr.min(n - o0);
        dequantize_par(fmt, &w[o0 * rb..(o0 + r) * rb], &mut tile[..r * k]);
        // dx += g[:, o0..o0+r] (m, r) tile (r, k)
        let gv = View { x: &g[o0..], rs: n, cs: 1 };
        mm(m, k, r, dx, o0 > 0, 1.0, gv, rows(&tile[..r * k], k), true);
    }
}

/// The op: `x W^T` (`QLinear`) or `x W` (`QLinearT`, the input gradient's product).
struct QLinear {
    fmt: QFormat,
    transposed: bool,
    exact: bool,
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
            false => forward(x, m, self.fmt, w, n, self.exact),
            true => input_grad(x, m, self.fmt, w, n),
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
        };
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(w, &op)?), None))
    }
}

/// `x W^T (+ b)` for f32 `x (.., cols)` and a quantized `w (rows, row_bytes)` in `fmt`; the
/// backward gives x's gradient only. x in another dtype is computed in f32 and cast back.
/// Without a gradient to take, a few rows (decoding) go through 8-bit dot products
/// (`few_rows`); everything else dequantizes tiles of W into f32 products.
pub fn quant_linear(x: &Tensor, w: &Tensor, fmt: QFormat, b: Option<&Tensor>) -> Result<Tensor> {
    quant_linear_with(x, w, fmt, b, x.track_op())
}

/// `quant_linear`, exact (f32 x) for any number of rows when `exact`.
fn quant_linear_with(
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
        exact,
    };
    let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op2(w, op)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    };
    y.to_dtype(dt)
}

/// `dx = g W` for the output gradient `g (.., rows)` of a quantized `w`: no graph node.
pub fn quant_input_grad(g: &Tensor, w: &Tensor, fmt: QFormat) -> Result<Tensor> {
    let op = QLinear {
        fmt,
        transposed: true,
        exact: true,
    };
    g.to_dtype(DType::F32)?.contiguous()?.apply_op2_no_bwd(w, &op)
}

/// LoRA over a quantized base as one graph node: `x W^T + b + s h B^T`, with `h = dropout(x)
/// A^T (n, r)` formed by the caller (as `lora_linear`). The node keeps x, h and B only: not the
/// base output, the update or their sum (a composed `quant_linear` + update would keep two
/// (n, out) buffers per linear until backward). Backward: dx = g W (tiles decoded again),
/// dh = s g B, dB = s g^T h.
pub fn quant_lora_linear(
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
            let y = quant_linear_with(x, &wc, fmt, bias.as_ref(), exact)?.to_dtype(DType::F32)?;
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
                let g = dy.reshape((dy.elem_count() / out, out))?.to_dtype(DType::F32)?;
                let dx = need[0]
                    .then(|| quant_input_grad(&g, &w, fmt)?.to_dtype(x.dtype())?.reshape(x.shape()))
                    .transpose()?;
                let bf = b.to_dtype(DType::F32)?;
                let dh = need[1]
                    .then(|| (g.matmul(&bf)? * scale)?.to_dtype(h.dtype())?.reshape(h.shape()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::rand;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn block_structs_are_as_large_as_ggml_says() {
        for &t in BLOCK_TYPES {
            let f = QFormat::new(t, t.block_size()).unwrap();
            let x = vec![0.5f32; t.block_size()];
            assert_eq!(quantize_rows(f, &x).len(), t.type_size(), "{t:?}");
        }
        assert_eq!(type_name(GgmlDType::Q4K), "q4_k");
        assert_eq!(type_name(GgmlDType::Q8_0), "q8_0");
    }

    #[test]
    fn dequantize_equals_candles_qtensor_dequantize() {
        for &t in BLOCK_TYPES {
            let w = rand(&[5, 512], 7);
            let (q, fmt) = quantize(&w, t).unwrap();
            let ours = dequantize(&q, fmt).unwrap();
            let theirs = candle_core::quantized::QTensor::quantize(&w, t)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            assert_eq!(max_diff(&ours, &theirs), 0.0, "{t:?}");
            // and it is a quantization of w: relative RMS error about a grid step
            let bits = match t {
                GgmlDType::Q2K => 2,
                GgmlDType::Q3K => 3,
                GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => 5,
                GgmlDType::Q6K => 6,
                GgmlDType::Q8_0 => 8,
                _ => 4,
            };
            let rms = |t: &Tensor| {
                t.sqr()
                    .unwrap()
                    .mean_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt()
            };
            let rel = rms(&(&ours - &w).unwrap()) / rms(&w);
            assert!(rel < 2f32.powi(2 - bits), "{t:?}: {rel}");
        }
    }

    #[test]
    fn dequantize_equals_gguf_py_on_random_blocks() {
        // tools/golden/make_quant_blocks.py: random blocks, decoded by llama.cpp's gguf-py
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/golden/quant_blocks.safetensors"
        );
        let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        for &ty in BLOCK_TYPES {
            let name = type_name(ty);
            let want = &t[&format!("{name}.values")];
            let fmt = QFormat::new(ty, want.dim(1).unwrap()).unwrap();
            let got = dequantize(&t[&format!("{name}.bytes")], fmt).unwrap();
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(max_diff(&got, want) <= 1e-6 * scale, "{name}");
        }
    }

    #[test]
    fn quant_linear_equals_dequantize_then_f32_in_value_and_input_gradient() {
        // rows of W spanning several tiles (tile_rows(512) = 512: use 1100 rows for the
        // few-row path's chunks and a short last tile) and m across both paths
        for &t in BLOCK_TYPES {
            let (n, k) = (if t == GgmlDType::Q4K { 1100 } else { 40 }, 512);
            let (q, fmt) = quantize(&rand(&[n, k], 3), t).unwrap();
            let b = rand(&[n], 4);
            for m in [1, 5, 37] {
                let x = Var::from_tensor(&rand(&[m, k], 5)).unwrap();
                let fast = quant_linear(x.as_tensor(), &q, fmt, Some(&b)).unwrap();
                let slow = quant_linear_reference(x.as_tensor(), &q, fmt, Some(&b)).unwrap();
                let scale = slow
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(max_diff(&fast, &slow) <= 1e-5 * scale, "{t:?} m {m}");
                let dy = rand(&[m, n], 6);
                let g1 = (&fast * &dy)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g2 = (&slow * &dy)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let (g1, g2) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
                let scale = g2
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(max_diff(g1, g2) <= 1e-5 * scale, "{t:?} m {m} grad");
            }
        }
    }

    #[test]
    fn few_rows_without_gradient_round_x_to_8_bits_and_stay_close() {
        for &t in BLOCK_TYPES {
            let (q, fmt) = quantize(&rand(&[70, 512], 3), t).unwrap();
            let x = rand(&[3, 512], 5);
            let fast = quant_linear(&x, &q, fmt, None).unwrap();
            let slow = quant_linear_reference(&x, &q, fmt, None).unwrap();
            let scale = slow
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_diff(&fast, &slow) / scale;
            assert!(d > 0.0 && d < 2e-2, "{t:?}: {d}");
        }
    }

    #[test]
    fn quant_lora_linear_equals_its_composed_twin_in_value_and_gradients() {
        let (q, fmt) = quantize(&rand(&[40, 256], 3), GgmlDType::Q5K).unwrap();
        let bias = rand(&[40], 8);
        for m in [3, 37] {
            crate::testing::same(
                &[rand(&[m, 256], 5), rand(&[m, 4], 6), rand(&[40, 4], 7)],
                |t| quant_lora_linear(&t[0], &q, fmt, Some(&bias), &t[1], &t[2], 0.5).unwrap(),
                |t| {
                    let base = quant_linear_reference(&t[0], &q, fmt, Some(&bias)).unwrap();
                    let up = t[1].matmul(&t[2].t().unwrap()).unwrap();
                    (base + (up * 0.5).unwrap()).unwrap()
                },
            );
        }
    }

    #[test]
    fn lookup_decodes_only_the_rows_asked_for() {
        let w = rand(&[30, 64], 9);
        let (q, fmt) = quantize(&w, GgmlDType::Q8_0).unwrap();
        let ids = Tensor::new(&[[3u32, 29], [0, 3]], &Device::Cpu).unwrap();
        let got = lookup(&q, fmt, &ids).unwrap();
        let want = dequantize(&q, fmt)
            .unwrap()
            .index_select(&ids.flatten_all().unwrap(), 0)
            .unwrap();
        assert_eq!(got.dims(), &[2, 2, 64]);
        assert_eq!(max_diff(&got.reshape((4, 64)).unwrap(), &want), 0.0);
    }

    #[test]
    fn unimplemented_types_and_partial_blocks_are_refused_by_name() {
        let e = QFormat::new(GgmlDType::Q8K, 256).unwrap_err();
        assert!(e.contains("q8_k") && e.contains("q4_k"), "{e}");
        let e = QFormat::new(GgmlDType::Q4K, 100).unwrap_err();
        assert!(e.contains("100") && e.contains("256"), "{e}");
    }
}
