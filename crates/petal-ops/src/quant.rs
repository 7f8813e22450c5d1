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
use crate::Kernels;
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
fn forward(x: &[f32], m: usize, fmt: QFormat, w: &[u8], n: usize, op: &QLinear) -> Vec<f32> {
    if !op.exact && crate::skinny::takes(m) {
        if let Some(y) = few_rows(x, m, fmt, w, n) {
            return y;
        }
    }
    let mut y = vec![0f32; m * n];
    forward_into(x, m, fmt, w, n, &mut y, op.bf16);
    y
}

/// Tiles of W decoded for a product: f32, or rounded to bf16 for the AVX512-BF16 kernel.
struct Tiles {
    f32s: Vec<f32>,
    bits: Vec<u16>,
    bf16: bool,
    /// the forward's (rows of x, rows of the tile) product before it is copied into place
    part: Vec<f32>,
}

thread_local! {
    /// Tile buffers kept between products on this thread: fresh (rows, cols) buffers on every
    /// product would each be zeroed page by page by the kernel.
    static SPARE: std::cell::Cell<Option<Tiles>> = const { std::cell::Cell::new(None) };
}

impl Tiles {
    /// Buffers for `rows` rows of `k` values (and `extra` more f32 values for the caller),
    /// taken from this thread's spare set where there is one.
    fn new(rows: usize, k: usize, bf16: bool) -> Self {
        let mut t = SPARE.with(|s| s.take()).unwrap_or(Tiles {
            f32s: Vec::new(),
            bits: Vec::new(),
            bf16,
            part: Vec::new(),
        });
        t.bf16 = bf16;
        if t.f32s.len() < rows * k {
            t.f32s.resize(rows * k, 0.0);
        }
        if bf16 && t.bits.len() < rows * k {
            t.bits.resize(rows * k, 0);
        }
        t
    }

    /// Hand the buffers back for the next product on this thread.
    fn done(self) {
        SPARE.with(|s| s.set(Some(self)));
    }

    /// Decode `r` rows of blocks into the tile.
    fn decode(&mut self, fmt: QFormat, blocks: &[u8], r: usize) {
        let len = r * fmt.cols;
        dequantize_par(fmt, blocks, &mut self.f32s[..len]);
        if self.bf16 {
            let per = 1 << 16;
            self.bits[..len]
                .par_chunks_mut(per)
                .zip(self.f32s[..len].par_chunks(per))
                .for_each(|(b, f)| crate::bf16::narrow(f, b));
        }
    }

    /// `c (m, n) = [c +] a (m, k) T` for the tile `T` of `r` rows seen as `(k, n)` with strides
    /// (`rs`, `cs`): `rs = 1, cs = cols` is the tile transposed (forward), `rs = cols, cs = 1`
    /// the tile itself (input gradient).
    #[allow(clippy::too_many_arguments)]
    fn product(&self, m: usize, n: usize, k: usize, c: &mut [f32], acc: bool, a: View, rs: usize, cs: usize, len: usize) {
        if self.bf16 {
            let b = crate::bf16::BView { x: &self.bits[..len], rs, cs };
            crate::bf16::mm_bf16(m, n, k, c, acc, 1.0, a.into(), b, true);
        } else {
            let b = View { x: &self.f32s[..len], rs, cs };
            mm(m, n, k, c, acc, 1.0, a, b, true);
        }
    }
}

/// `y (m, n) = x (m, k) W^T` in f32 throughout, into row-major `y` (overwritten).
pub(crate) fn forward_into(
    x: &[f32],
    m: usize,
    fmt: QFormat,
    w: &[u8],
    n: usize,
    y: &mut [f32],
    bf16: bool,
) {
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
    let mut tile = Tiles::new(tr, k, bf16);
    let mut part = std::mem::take(&mut tile.part);
    if part.len() < m * tr {
        part.resize(m * tr, 0.0);
    }
    for o0 in (0..n).step_by(tr) {
        let r = tr.min(n - o0);
        tile.decode(fmt, &w[o0 * rb..(o0 + r) * rb], r);
        // part (m, r) = x (m, k) tile^T (k, r)
        tile.product(m, r, k, &mut part[..m * r], false, rows(x, k), 1, k, r * k);
        y.par_chunks_mut(n)
            .zip(part.par_chunks(r))
            .for_each(|(y, p)| y[o0..o0 + r].copy_from_slice(p));
    }
    tile.part = part;
    tile.done();
}

/// `dx (m, k) = g (m, n) W`, W given as `n` quantized rows.
fn input_grad(g: &[f32], m: usize, fmt: QFormat, w: &[u8], n: usize, bf16: bool) -> Vec<f32> {
    let mut dx = vec![0f32; m * fmt.cols];
    input_grad_into(g, m, fmt, w, n, &mut dx, bf16);
    dx
}

/// `dx (m, k) = g (m, n) W` into row-major `dx` (overwritten): a sum over tiles of W's rows.
pub(crate) fn input_grad_into(
    g: &[f32],
    m: usize,
    fmt: QFormat,
    w: &[u8],
    n: usize,
    dx: &mut [f32],
    bf16: bool,
) {
    let (k, rb) = (fmt.cols, fmt.row_bytes());
    let tr = tile_rows(k);
    let mut tile = Tiles::new(tr, k, bf16);
    for o0 in (0..n).step_by(tr) {
        let r = tr.min(n - o0);
        tile.decode(fmt, &w[o0 * rb..(o0 + r) * rb], r);
        // dx += g[:, o0..o0+r] (m, r) tile (r, k)
        let gv = View { x: &g[o0..], rs: n, cs: 1 };
        tile.product(m, k, r, dx, o0 > 0, gv, k, 1, r * k);
    }
    tile.done();
}

/// The op: `x W^T` (`QLinear`) or `x W` (`QLinearT`, the input gradient's product).
struct QLinear {
    fmt: QFormat,
    transposed: bool,
    /// x stays f32 for any number of rows (else few rows take 8-bit dot products)
    exact: bool,
    /// tiles rounded to bf16 for the AVX512-BF16 kernel (x rounded too, as autocast does)
    bf16: bool,
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
            false => forward(x, m, self.fmt, w, n, self),
            true => input_grad(x, m, self.fmt, w, n, self.bf16),
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
            bf16: self.bf16,
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

/// Whether the tile products take the AVX512-BF16 kernel.
pub(crate) fn use_bf16(k: Kernels) -> bool {
    k.fused() && crate::bf16::available()
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
        exact,
        bf16: use_bf16(k),
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
    let op = QLinear {
        fmt,
        transposed: true,
        exact: true,
        bf16: use_bf16(k),
    };
    g.to_dtype(DType::F32)?.contiguous()?.apply_op2_no_bwd(w, &op)
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
                let g = dy.reshape((dy.elem_count() / out, out))?.to_dtype(DType::F32)?;
                let dx = need[0]
                    .then(|| quant_input_grad(k, &g, &w, fmt)?.to_dtype(x.dtype())?.reshape(x.shape()))
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

    const REF: Kernels = Kernels::REFERENCE;

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
                let fast = quant_linear(REF, x.as_tensor(), &q, fmt, Some(&b)).unwrap();
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
    fn bf16_tiles_equal_f32_products_of_bf16_rounded_operands() {
        // with AVX512-BF16 the fused kernels round W's tiles and the left operand to bf16 and
        // accumulate in f32: the same as f32 products of the rounded values (elsewhere the f32
        // path, equal to them within bf16's step)
        let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let tol = if crate::bf16::available() { 1e-5 } else { 1e-2 };
        for t in [GgmlDType::Q4_1, GgmlDType::Q6K] {
            let (q, fmt) = quantize(&rand(&[600, 512], 3), t).unwrap();
            let wr = round(&dequantize(&q, fmt).unwrap());
            let (x, g) = (rand(&[37, 512], 5), rand(&[37, 600], 6));
            let y = quant_linear(Kernels::FUSED, &x, &q, fmt, None).unwrap();
            let want = round(&x).matmul(&wr.t().unwrap()).unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(max_diff(&y, &want) <= tol * scale, "{t:?}");
            let dx = quant_input_grad(Kernels::FUSED, &g, &q, fmt).unwrap();
            let want = round(&g).matmul(&wr).unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(max_diff(&dx, &want) <= tol * scale, "{t:?} grad");
        }
    }

    #[test]
    fn few_rows_without_gradient_round_x_to_8_bits_and_stay_close() {
        for &t in BLOCK_TYPES {
            let (q, fmt) = quantize(&rand(&[70, 512], 3), t).unwrap();
            let x = rand(&[3, 512], 5);
            let fast = quant_linear(REF, &x, &q, fmt, None).unwrap();
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
                |t| quant_lora_linear(REF, &t[0], &q, fmt, Some(&bias), &t[1], &t[2], 0.5).unwrap(),
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
