//! NF4, QLoRA's 4-bit NormalFloat, with double-quantized scales, as bitsandbytes stores it
//! (`quantize_4bit(.., quant_type="nf4", blocksize=64, compress_statistics=True)`): values in
//! blocks of 64, each block's absmax scale; the scales minus their mean quantized again to 8
//! bits in groups of 256 by bitsandbytes' signed dynamic code, each group with an f32 scale.
//! A value is `NF4[q] * (DYN[c] * s + mean)`, each product and sum rounded to f32 as
//! bitsandbytes does, so decoding equals `bnb.functional.dequantize_4bit` bit for bit (the
//! golden test, `tools/golden/make_nf4.py`).
//!
//! The second-level groups run over the whole tensor's blocks in order and so cross rows; for
//! rows that decode alone each row carries the group scales it touches. A row of `cols` values
//! (`b = cols / 64` blocks, `g = ceil(b / 256) + 1` group slots) is:
//! `cols / 2` bytes of codes (two per byte, the first value in the high nibble), `b` bytes of
//! scale codes, the row's first block's place in its group (u16), the mean (f32), and `g` group
//! scales (f32), little-endian: 4.13 bits a value for 576-value rows (bitsandbytes: 4.127).

use super::Quantizer;
use rayon::prelude::*;
use std::sync::OnceLock;

/// NF4 as a [`Quantizer`]: `--quantize nf4`.
pub struct Nf4;

/// The NF4 quantizer.
pub static NF4: Nf4 = Nf4;

/// QLoRA's NormalFloat code: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero
/// (bitsandbytes' `get_4bit_type("nf4")`).
pub(super) const CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

const BLOCK: usize = 64;
/// First-level scales per second-level scale.
const GROUP: usize = 256;

/// bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map(signed=True)`): for each
/// decade 10^-6 .. 10^0, the midpoints of `2^i + 1` points spaced evenly over [0.1, 1] (f32
/// `linspace` as torch computes it: each half from its end by one fused multiply-add), both
/// signs, then 0 and 1, sorted.
fn dynamic_code() -> &'static [f32; 256] {
    static CODE8: OnceLock<[f32; 256]> = OnceLock::new();
    CODE8.get_or_init(|| {
        let decades = [1e-6f32, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
        let mut data = Vec::with_capacity(256);
        for (i, scale) in decades.iter().enumerate() {
            let n = (1usize << i) + 1;
            let (start, end) = (0.1f32, 1.0f32);
            let step = (end - start) / (n - 1) as f32;
            let at = |j: usize| match j < n / 2 {
                true => step.mul_add(j as f32, start),
                false => (-step).mul_add((n - j - 1) as f32, end),
            };
            let means: Vec<f32> = (0..n - 1).map(|j| (at(j) + at(j + 1)) / 2.0).collect();
            data.extend(means.iter().map(|m| scale * m));
            data.extend(means.iter().map(|m| -scale * m));
        }
        data.extend([0.0, 1.0]);
        data.sort_by(f32::total_cmp);
        data.try_into()
            .expect("7 decades of 2^i midpoints, both signs, 0 and 1: 256")
    })
}

/// Slots for group scales in a row of `blocks` blocks: the groups it may touch.
fn slots(blocks: usize) -> usize {
    blocks.div_ceil(GROUP) + 1
}

/// Each block's absmax of one row (`cols / 64` of them), decoded from its double-quantized code.
pub(super) fn block_scales(row: &[u8], cols: usize, out: &mut [f32]) {
    let code8 = dynamic_code();
    let at = cols / 2 + cols / BLOCK;
    let phase = u16::from_le_bytes([row[at], row[at + 1]]) as usize;
    let offset = f32_at(row, at + 2);
    for (j, o) in out.iter_mut().enumerate() {
        let group = f32_at(row, at + 6 + 4 * ((phase + j) / GROUP));
        *o = code8[row[cols / 2 + j] as usize] * group + offset;
    }
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The nearest entry of the sorted `code` to `x` (ties to the lower one), as bitsandbytes'
/// CPU quantizer finds it: the last entry at most x, then its right neighbour if closer, the
/// first entry taken as -1 (bitsandbytes sets it so for its search).
fn nearest8(code: &[f32; 256], x: f32) -> u8 {
    let i = code.partition_point(|c| *c <= x).saturating_sub(1);
    let left = if i == 0 { -1.0 } else { code[i] };
    if i < 255 && (x - code[i + 1]).abs() < (x - left).abs() {
        return (i + 1) as u8;
    }
    i as u8
}

/// The index of NF4's code for `x` in [-1, 1]: how many midpoints lie below it (torch's
/// `bucketize`, as bitsandbytes quantizes).
pub fn nf4_index(x: f32) -> u8 {
    let mut q = 0;
    for i in 0..15 {
        q += ((CODE[i] + CODE[i + 1]) / 2.0 < x) as u8;
    }
    q
}

/// A tensor's NF4 parts as bitsandbytes holds them (its `QuantState` with `nested`): packed
/// codes (two per byte), scale codes, group scales, the mean of the scales.
pub struct Nf4Parts<'a> {
    pub packed: &'a [u8],
    pub scale_codes: &'a [u8],
    pub group_scales: &'a [f32],
    pub offset: f32,
}

impl Nf4 {
    /// Rows `(rows, row_bytes(cols))` from bitsandbytes' parts of a tensor of `rows x cols`
    /// values (a QLoRA checkpoint's `weight`, `weight.absmax`, `weight.nested_absmax`,
    /// `weight.quant_state...offset`), or why they do not fit.
    pub fn from_parts(&self, cols: usize, p: &Nf4Parts) -> Result<Vec<u8>, String> {
        let n = p.packed.len() * 2;
        let blocks = n / BLOCK;
        if cols == 0 || !cols.is_multiple_of(BLOCK) || !n.is_multiple_of(cols) {
            return Err(format!(
                "{n} values are not rows of {cols} in blocks of {BLOCK}"
            ));
        }
        if p.scale_codes.len() != blocks || p.group_scales.len() != blocks.div_ceil(GROUP) {
            return Err(format!(
                "{blocks} blocks need {blocks} scale codes and {} group scales, not {} and {}",
                blocks.div_ceil(GROUP),
                p.scale_codes.len(),
                p.group_scales.len()
            ));
        }
        let (bpr, rb) = (cols / BLOCK, self.row_bytes(cols));
        let mut out = vec![0u8; n / cols * rb];
        out.par_chunks_mut(rb).enumerate().for_each(|(r, row)| {
            let first = r * bpr;
            row[..cols / 2].copy_from_slice(&p.packed[first * BLOCK / 2..][..cols / 2]);
            row[cols / 2..][..bpr].copy_from_slice(&p.scale_codes[first..first + bpr]);
            let at = cols / 2 + bpr;
            row[at..at + 2].copy_from_slice(&((first % GROUP) as u16).to_le_bytes());
            row[at + 2..at + 6].copy_from_slice(&p.offset.to_le_bytes());
            for s in 0..slots(bpr) {
                let v = p
                    .group_scales
                    .get(first / GROUP + s)
                    .copied()
                    .unwrap_or(0.0);
                row[at + 6 + 4 * s..at + 10 + 4 * s].copy_from_slice(&v.to_le_bytes());
            }
        });
        Ok(out)
    }
}

impl Quantizer for Nf4 {
    fn name(&self) -> String {
        "nf4".into()
    }

    fn block_size(&self) -> usize {
        BLOCK
    }

    fn row_bytes(&self, cols: usize) -> usize {
        let blocks = cols / BLOCK;
        cols / 2 + blocks + 2 + 4 + 4 * slots(blocks)
    }

    fn decode(&self, cols: usize, bytes: &[u8], out: &mut [f32]) {
        let rb = self.row_bytes(cols);
        let mut scales = vec![0f32; cols / BLOCK];
        for (row, o) in bytes.chunks_exact(rb).zip(out.chunks_exact_mut(cols)) {
            block_scales(row, cols, &mut scales);
            for ((packed, o), &absmax) in row[..cols / 2]
                .chunks_exact(BLOCK / 2)
                .zip(o.chunks_exact_mut(BLOCK))
                .zip(&scales)
            {
                let table: [f32; 16] = std::array::from_fn(|q| CODE[q] * absmax);
                super::lut::lookup(packed, &table, o, true);
            }
        }
    }

    fn few_rows(&self, x: &[f32], m: usize, cols: usize, w: &[u8], n: usize) -> Option<Vec<f32>> {
        let rb = self.row_bytes(cols);
        let simd = super::simd::Simd::best()?;
        super::nf4_rows::few_rows_on(simd, x, m, cols, w, n, rb, &CODE, |row, out| {
            block_scales(row, cols, out)
        })
    }

    fn encode(&self, cols: usize, w: &[f32]) -> Vec<u8> {
        let absmax: Vec<f32> = w
            .par_chunks(BLOCK)
            .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        let packed: Vec<u8> = w
            .par_chunks(BLOCK)
            .zip(&absmax)
            .flat_map_iter(|(b, a)| {
                let inv = 1.0 / a.max(1e-38);
                b.chunks_exact(2).map(move |p| {
                    let q = |v: f32| nf4_index((v * inv).clamp(-1.0, 1.0));
                    (q(p[0]) << 4) | q(p[1])
                })
            })
            .collect();
        // the scales less their mean, in groups of 256 by the dynamic code
        let offset = (absmax.iter().map(|a| *a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let code8 = dynamic_code();
        let group_scales: Vec<f32> = centred
            .chunks(GROUP)
            .map(|g| g.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        let scale_codes: Vec<u8> = centred
            .chunks(GROUP)
            .zip(&group_scales)
            .flat_map(|(g, s)| {
                g.iter().map(move |v| match *s > 0.0 {
                    true => nearest8(code8, v / s),
                    false => nearest8(code8, 0.0),
                })
            })
            .collect();
        let parts = Nf4Parts {
            packed: &packed,
            scale_codes: &scale_codes,
            group_scales: &group_scales,
            offset,
        };
        self.from_parts(cols, &parts)
            .expect("rows of whole blocks (checked by QFormat)")
    }

    fn covers_embeddings(&self) -> bool {
        false
    }
}

/// NF4's 16 values (bitsandbytes' `quant_map`).
pub fn nf4_code() -> &'static [f32] {
    &CODE
}

/// The 8-bit code of NF4's second-level scales (bitsandbytes' `nested_quant_map`).
pub fn nf4_scale_code() -> &'static [f32] {
    dynamic_code()
}
