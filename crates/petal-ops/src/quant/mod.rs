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
mod product;
#[cfg(test)]
mod tests;

pub(crate) use product::{forward_into, input_grad_into, use_bf16};
pub use product::{quant_input_grad, quant_linear, quant_linear_reference, quant_lora_linear};

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
        if cols == 0 || !cols.is_multiple_of(block) {
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
    if decode::fast(fmt.dtype, bytes, out) {
        return;
    }
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
