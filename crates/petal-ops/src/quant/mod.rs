//! Frozen linears whose weight stays in a GGUF block format: `y = x W^T` and its input gradient
//! `dx = dy W`, with W dequantized a tile of rows at a time inside the op (never a full f32 copy,
//! never a weight gradient). The weight is held as its raw blocks in a `u8` tensor of shape
//! `(rows, row_bytes)`; a [`QFormat`] says how to read them. The common block types are decoded
//! by `decode` (vectorised at run time), the others by candle's own `GgmlType::to_float`;
//! products go through `gemm` or, with AVX512-BF16, petal's bf16 kernel (`product`).
//!
//! The readable twin, [`quant_linear_reference`], dequantizes all of W and multiplies by
//! candle's matmul; the tests hold the op to it for every block type.

use candle_core::quantized::k_quants::{self as kq, GgmlType};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

mod decode;
pub mod gptq;
mod int4;
mod lut;
mod nf4;
mod nf4_rows;
#[cfg(test)]
mod nibble_tests;
mod product;
mod q4_1_rows;
mod simd;
#[cfg(test)]
mod tests;
mod tiles;

pub use product::arithmetic;
pub(crate) use product::{forward_rows, input_grad_tensor, mode, Mode};
pub use product::{
    quant_input_grad, quant_linear, quant_linear_exact, quant_linear_reference, quant_lora_linear,
};
pub(crate) use tiles::{forward_into, input_grad_into};

pub use candle_core::quantized::GgmlDType;
pub use int4::{Int4, Int4Ordered, INT4, INT4_G32, INT4_G64};
pub use nf4::{nf4_code, nf4_index, nf4_scale_code, Nf4, Nf4Parts, NF4};

/// The GGML block types a quantized frozen linear may hold (GGUF's legacy and k-quant types).
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

/// A way of storing a frozen weight's rows in fewer bits (ModuLoRA's "quantizer as a
/// plug-in"): whatever implements it trains under LoRA and the other additive methods through
/// the same ops (`quant_linear`, `quant_lora_linear`, the quantized head loss), which only ever
/// ask it to decode whole rows into f32. petal's own: the GGML block types ([`ggml`]), NF4
/// with double-quantized scales ([`NF4`], QLoRA's), and grouped int4 with scales and zeros
/// ([`INT4`], GPTQ's storage). A new one is a `static` of a type implementing this.
///
/// A row must be self-contained (`row_bytes(cols)` bytes that decode alone): tiles, the
/// embedding's looked-up rows and row slices are all cut along rows.
pub trait Quantizer: Send + Sync {
    /// Its name as `--quantize` takes it (`q4_k`, `nf4`, ...).
    fn name(&self) -> String;
    /// Values per block: a row's length must be a whole number of blocks.
    fn block_size(&self) -> usize;
    /// Bytes of one row of `cols` values.
    fn row_bytes(&self, cols: usize) -> usize;
    /// Decode whole rows (`bytes.len() / row_bytes(cols)` of them) into `out`.
    fn decode(&self, cols: usize, bytes: &[u8], out: &mut [f32]);
    /// Quantize a whole tensor of f32 rows (`cols` wide): statistics may span rows (NF4's
    /// second-level scales do), the rows written must still decode alone.
    fn encode(&self, cols: usize, w: &[f32]) -> Vec<u8>;
    /// `x (m, cols) W^T` for a few rows without decoding W to f32 (8-bit dot products), where
    /// the format has such a path; inexact, for inference only.
    fn few_rows(
        &self,
        _x: &[f32],
        _m: usize,
        _cols: usize,
        _w: &[u8],
        _n: usize,
    ) -> Option<Vec<f32>> {
        None
    }
    /// Bytes of one block where a row is its blocks alone, each holding its own scales (GGUF's
    /// types): then columns `c0..c1` on block boundaries decode from bytes `c0 / block_size *
    /// block_bytes ..` of the row on their own. None where a row keeps other statistics.
    fn block_bytes(&self) -> Option<usize> {
        None
    }
    /// Whether every block of 32 values is 4-bit codes on an affine grid (value `step q + lo`),
    /// which [`Quantizer::nibbles`] gives: the forward product then runs on the codes
    /// themselves (`int8::nibbles`).
    fn has_nibbles(&self) -> bool {
        false
    }
    /// Whole rows as 4-bit codes (one a byte, `cols` a row) and each block of 32's step and
    /// offset (`cols / 32` a row), where [`Quantizer::has_nibbles`].
    fn nibbles(
        &self,
        _cols: usize,
        _bytes: &[u8],
        _codes: &mut [u8],
        _step: &mut [f32],
        _lo: &mut [f32],
    ) {
        unreachable!("{} has no 4-bit codes", self.name())
    }
    /// Whether `--quantize` with it also quantizes the token embedding and output head
    /// (llama.cpp's types do; QLoRA and GPTQ keep them in the model's dtype).
    fn covers_embeddings(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for dyn Quantizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl PartialEq for dyn Quantizer {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for dyn Quantizer {}

/// A GGML block type as a [`Quantizer`].
struct Ggml(GgmlDType);

static GGML: [Ggml; 10] = [
    Ggml(GgmlDType::Q4_0),
    Ggml(GgmlDType::Q4_1),
    Ggml(GgmlDType::Q5_0),
    Ggml(GgmlDType::Q5_1),
    Ggml(GgmlDType::Q8_0),
    Ggml(GgmlDType::Q2K),
    Ggml(GgmlDType::Q3K),
    Ggml(GgmlDType::Q4K),
    Ggml(GgmlDType::Q5K),
    Ggml(GgmlDType::Q6K),
];

/// The quantizer of a GGML block type: an error naming the type when petal does not run it.
pub fn ggml(t: GgmlDType) -> std::result::Result<&'static dyn Quantizer, String> {
    match GGML.iter().find(|g| g.0 == t) {
        Some(g) => Ok(g),
        None => Err(format!(
            "block type {} is not implemented for quantized linears (petal runs {})",
            type_name(t),
            BLOCK_TYPES
                .iter()
                .map(|t| type_name(*t))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

impl Quantizer for Ggml {
    fn name(&self) -> String {
        type_name(self.0)
    }

    fn block_size(&self) -> usize {
        self.0.block_size()
    }

    fn row_bytes(&self, cols: usize) -> usize {
        cols / self.0.block_size() * self.0.type_size()
    }

    fn decode(&self, _cols: usize, bytes: &[u8], out: &mut [f32]) {
        ggml_decode(self.0, bytes, out)
    }

    fn block_bytes(&self) -> Option<usize> {
        Some(self.0.type_size())
    }

    fn encode(&self, _cols: usize, w: &[f32]) -> Vec<u8> {
        ggml_encode(self.0, w)
    }

    fn few_rows(&self, x: &[f32], m: usize, cols: usize, w: &[u8], n: usize) -> Option<Vec<f32>> {
        product::ggml_few_rows(self.0, x, m, cols, w, n)
    }

    fn has_nibbles(&self) -> bool {
        decode::has_nibbles(self.0)
    }

    fn nibbles(
        &self,
        _cols: usize,
        bytes: &[u8],
        codes: &mut [u8],
        step: &mut [f32],
        lo: &mut [f32],
    ) {
        decode::nibbles(self.0, bytes, codes, step, lo)
    }
}

/// Every quantizer petal has, by name: the GGML types, `nf4`, `int4` (`_g64`, `_g32`).
pub fn quantizers() -> Vec<&'static dyn Quantizer> {
    let mut all: Vec<&'static dyn Quantizer> = GGML.iter().map(|g| g as _).collect();
    all.extend([&NF4 as &dyn Quantizer, &INT4, &INT4_G64, &INT4_G32]);
    all
}

/// The quantizer `--quantize NAME` names, or an error listing them.
pub fn quantizer(name: &str) -> std::result::Result<&'static dyn Quantizer, String> {
    let all = quantizers();
    all.iter()
        .find(|q| q.name() == name)
        .copied()
        .ok_or_else(|| {
            let names: Vec<String> = all.iter().map(|q| q.name()).collect();
            format!("`{name}` is not one of {}", names.join(", "))
        })
}

/// How a quantized weight's rows are stored: the quantizer and the row length in values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QFormat {
    pub q: &'static dyn Quantizer,
    pub cols: usize,
}

/// llama.cpp's name of a block type (`q4_k`, `q8_0`, ...).
pub fn type_name(t: GgmlDType) -> String {
    format!("{t:?}").to_lowercase().replace('k', "_k")
}

impl QFormat {
    /// A format for rows of `cols` values in blocks of GGML's `dtype`: an error naming the type
    /// when petal does not implement it, or when the rows are not whole blocks.
    pub fn new(dtype: GgmlDType, cols: usize) -> std::result::Result<Self, String> {
        Self::of(ggml(dtype)?, cols)
    }

    /// A format for rows of `cols` values by quantizer `q`: an error when they are not whole
    /// blocks.
    pub fn of(q: &'static dyn Quantizer, cols: usize) -> std::result::Result<Self, String> {
        let block = q.block_size();
        if cols == 0 || !cols.is_multiple_of(block) {
            return Err(format!(
                "rows of {cols} values are not whole {} blocks of {block}",
                q.name()
            ));
        }
        Ok(QFormat { q, cols })
    }

    pub fn row_bytes(&self) -> usize {
        self.q.row_bytes(self.cols)
    }

    pub fn name(&self) -> String {
        self.q.name()
    }
}

/// Decode whole blocks of `T` from `bytes` into `out` (`bytes.len() / size_of::<T>()` blocks).
fn decode_as<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    T::to_float(&as_blocks::<T>(bytes), out);
}

/// Whole blocks of `T` in `bytes`: read in place where aligned for `T`, else copied out.
fn as_blocks<T: GgmlType>(bytes: &[u8]) -> std::borrow::Cow<'_, [T]> {
    let size = std::mem::size_of::<T>();
    let n = bytes.len() / size;
    debug_assert_eq!(bytes.len(), n * size);
    if bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0 {
        // SAFETY: aligned, in bounds, and every block type is plain data (f16 scales and u8
        // quants, repr(C)): any bit pattern is a valid value.
        return unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n) }.into();
    }
    bytes
        .chunks_exact(size)
        // SAFETY: each chunk holds one block's bytes; plain data as above.
        .map(|b| unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
        .collect::<Vec<T>>()
        .into()
}

/// Dequantize whole rows: `bytes` holds `out.len() / fmt.cols` rows in `fmt`.
pub fn dequantize_rows(fmt: QFormat, bytes: &[u8], out: &mut [f32]) {
    fmt.q.decode(fmt.cols, bytes, out)
}

fn ggml_decode(t: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    if decode::fast(t, bytes, out) {
        return;
    }
    match t {
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
        other => unreachable!("`ggml` refuses {other:?}"),
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

/// Quantize f32 rows (row-major, `fmt.cols` wide) into `fmt`'s blocks.
pub fn quantize_rows(fmt: QFormat, x: &[f32]) -> Vec<u8> {
    fmt.q.encode(fmt.cols, x)
}

fn ggml_encode(t: GgmlDType, x: &[f32]) -> Vec<u8> {
    match t {
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
        other => unreachable!("`ggml` refuses {other:?}"),
    }
}

/// A quantized weight tensor `(rows, fmt.row_bytes())` of `u8` from `w (rows, cols)`, in
/// GGML's block type `dtype`.
pub fn quantize(w: &Tensor, dtype: GgmlDType) -> Result<(Tensor, QFormat)> {
    quantize_with(w, ggml(dtype).map_err(candle_core::Error::msg)?)
}

/// A quantized weight tensor `(rows, fmt.row_bytes())` of `u8` from `w (rows, cols)` by `q`.
pub fn quantize_with(w: &Tensor, q: &'static dyn Quantizer) -> Result<(Tensor, QFormat)> {
    let (n, k) = w.dims2()?;
    let fmt = QFormat::of(q, k).map_err(candle_core::Error::msg)?;
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

/// `f(row)` of every row of a quantized `w`, each decoded to f32 in turn (one row in memory at
/// a time): what a method needs of W when it needs a reduction of it (DoRA's row norms) or a
/// few of its columns (PaCA's).
pub fn for_each_row(w: &Tensor, fmt: QFormat, mut f: impl FnMut(&[f32])) -> Result<()> {
    let bytes = w.flatten_all()?.to_vec1::<u8>()?;
    let mut row = vec![0f32; fmt.cols];
    for r in bytes.chunks_exact(fmt.row_bytes()) {
        dequantize_rows(fmt, r, &mut row);
        f(&row);
    }
    Ok(())
}

/// Rows `ids` (any shape, integer) of a quantized table, dequantized: `(ids.., cols)` in f32.
/// Only the rows looked up are decoded (the token embedding of a quantized model).
pub fn lookup(w: &Tensor, fmt: QFormat, ids: &Tensor) -> Result<Tensor> {
    let picked = w.index_select(&ids.flatten_all()?, 0)?;
    let mut dims = ids.dims().to_vec();
    dims.push(fmt.cols);
    dequantize(&picked, fmt)?.reshape(dims)
}
