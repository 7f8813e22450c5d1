//! LoftQ (Li et al., 2023) and MiCA initialisations of LoRA, as PEFT 0.21.2's `loftq_init` and
//! `mica_init`.

use crate::{Error, Result};
use candle_core::{DType, Tensor};
use petal_ops::linalg::{svd_bottom, svd_top, Mat};
use std::collections::BTreeMap;

/// `loftq_config`'s keys and PEFT's `LoftQConfig` defaults.
pub const LOFTQ_BITS: (&str, u64) = ("loftq_bits", 4);
pub const LOFTQ_ITER: (&str, u64) = ("loftq_iter", 1);

/// LoftQ's settings from `loftq_config`: the quantizer's bits (4: NF4 in blocks of 64; 8: int8
/// per row) and the alternating steps, or why they are not usable.
pub(super) fn settings(c: &BTreeMap<String, u64>) -> Result<(u64, u64)> {
    if let Some(k) = c
        .keys()
        .find(|k| ![LOFTQ_BITS.0, LOFTQ_ITER.0].contains(&k.as_str()))
    {
        return Err(Error::config(
            "adapter config",
            "loftq_config",
            format!("unknown key {k:?} (it takes loftq_bits and loftq_iter)"),
        ));
    }
    let bits = c.get(LOFTQ_BITS.0).copied().unwrap_or(LOFTQ_BITS.1);
    let iters = c.get(LOFTQ_ITER.0).copied().unwrap_or(LOFTQ_ITER.1);
    if bits != 4 && bits != 8 {
        return Err(Error::config(
            "adapter config",
            "loftq_config.loftq_bits",
            format!("{bits} is not 4 (NF4) or 8 (int8), the quantizers PEFT's LoftQ has"),
        ));
    }
    if iters == 0 {
        return Err(Error::config(
            "adapter config",
            "loftq_config.loftq_iter",
            "must be at least 1",
        ));
    }
    Ok((bits, iters))
}

/// LoftQ: W's quantization Q and a rank-r L R with `Q + L R ≈ W`, found by alternating
/// `Q = deq(quant(W - L R))` and `L R = SVD_r(W - Q)` (`iters` times, starting from L R = 0):
/// returns `(A = R, B = L, Q)`, the base being replaced by Q. As PEFT, A and B are not divided
/// by LoRA's scaling (alpha / r = 1 makes the start `Q + B A`); the quantizers are
/// bitsandbytes' as PEFT calls them (`quantize`), in f32, the SVD in f64.
pub(super) fn loftq_init(
    w: &Tensor,
    r: usize,
    (bits, iters): (u64, u64),
    path: &str,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (out, inp) = super::init::rank_fits("LoftQ", w, r, path)?;
    let weight: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut res = weight.clone();
    let (mut q, mut l, mut rr) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iters {
        q = quantize(&res, inp, bits);
        let diff = weight.iter().zip(&q).map(|(w, q)| (w - q) as f64).collect();
        (l, rr) = low_rank(out, inp, diff, r);
        if i + 1 == iters {
            break;
        }
        for (row, chunk) in res.chunks_mut(inp).enumerate() {
            for (col, v) in chunk.iter_mut().enumerate() {
                let lr: f64 = (0..r).map(|k| l[row * r + k] * rr[k * inp + col]).sum();
                *v = (weight[row * inp + col] as f64 - lr) as f32;
            }
        }
    }
    let dev = w.device();
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    Ok((
        Tensor::from_vec(f32s(rr), (r, inp), dev)?,
        Tensor::from_vec(f32s(l), (out, r), dev)?,
        Tensor::from_vec(q, (out, inp), dev)?,
    ))
}

/// PEFT's `_low_rank_decomposition`: `L = U_r sqrt(S_r)` (out, r), `R = sqrt(S_r) V_r^T` (r, in).
fn low_rank(rows: usize, cols: usize, data: Vec<f64>, r: usize) -> (Vec<f64>, Vec<f64>) {
    let (u, s, vt) = svd_top(&Mat { rows, cols, data }, r);
    let root: Vec<f64> = s.iter().map(|v| v.sqrt()).collect();
    let l = (0..rows * r).map(|i| u.data[i] * root[i % r]).collect();
    let rr = (0..r * cols).map(|i| vt.data[i] * root[i / cols]).collect();
    (l, rr)
}

/// bitsandbytes' `1 / 127` (`7.874015718698502e-3`, the f32 value).
const INV127: f32 = 1.0 / 127.0;

/// `x`'s values after bitsandbytes' quantizer and dequantizer, as PEFT's LoftQ calls them:
/// 4 bits: NF4 over the flattened tensor in blocks of 64 with f32 absmax scales (no double
/// quantization; a last partial block divided by its scale, as bitsandbytes does); 8 bits:
/// int8 per row of `cols` of x rounded to f16 (`Int8Params`, then `int8_vectorwise_quant`:
/// round half to even of `x * (127 / absmax)`, dequantized as `q * absmax * (1/127)`).
fn quantize(x: &[f32], cols: usize, bits: u64) -> Vec<f32> {
    let absmax = |b: &[f32]| b.iter().fold(0f32, |m, v| m.max(v.abs()));
    if bits == 8 {
        // `Int8Params` rounds the weight to f16 before it quantizes
        let f16 = |v: &f32| half::f16::from_f32(*v).to_f32();
        return x
            .chunks(cols)
            .flat_map(|row| {
                let row: Vec<f32> = row.iter().map(f16).collect();
                let a = absmax(&row);
                let inv = 127.0f32 / a;
                row.into_iter().map(move |v| {
                    let q = if a == 0.0 {
                        0.0
                    } else {
                        (v * inv).round_ties_even()
                    };
                    q * a * INV127
                })
            })
            .collect();
    }
    let code = petal_ops::quant::nf4_code();
    x.chunks(64)
        .flat_map(|b| {
            let a = absmax(b);
            let scaled: Vec<f32> = if b.len() == 64 {
                let inv = 1.0 / a.max(1e-38);
                b.iter().map(|v| v * inv).collect()
            } else {
                b.iter().map(|v| v / a.max(1e-38)).collect()
            };
            scaled
                .into_iter()
                .map(move |v| code[petal_ops::quant::nf4_index(v.clamp(-1.0, 1.0)) as usize] * a)
        })
        .collect()
}

/// MiCA: `B` the r left singular vectors of W with the smallest singular values (torch's
/// `U[:, -r:]` of the thin SVD), `A = 0`; B stays frozen.
pub(super) fn mica_init(w: &Tensor, r: usize, path: &str) -> Result<(Tensor, Tensor)> {
    let (out, inp) = super::init::rank_fits("MiCA", w, r, path)?;
    let data: Vec<f64> = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let (u, _, _) = svd_bottom(
        &Mat {
            rows: out,
            cols: inp,
            data,
        },
        r,
    );
    let dev = w.device();
    Ok((
        Tensor::zeros((r, inp), DType::F32, dev)?,
        Tensor::from_vec(u.data, (out, r), dev)?.to_dtype(DType::F32)?,
    ))
}

#[cfg(test)]
#[path = "loftq_tests.rs"]
mod tests;
