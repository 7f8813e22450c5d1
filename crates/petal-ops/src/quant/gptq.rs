//! GPTQ's error-compensating quantizer (Frantar et al. 2022; the `fasterquant` of the official
//! code, IST-DASLab/gptq `gptq.py`): the columns of W are quantized one at a time, and the error
//! each one makes is spread over the columns not yet quantized through the inverse Hessian of
//! the layer's reconstruction loss `|| W X - Q X ||^2` (`H = X^T X` over calibration inputs), so
//! the layer's output, not its weights, stays close. Grid: GPTQ's asymmetric 4-bit one per output
//! row and group of inputs (the range widened to include 0, `scale = (max - min) / 15`,
//! `zero = round(-min / scale)`), found when the quantization reaches a group's first column, on
//! the weights as the earlier columns' errors have updated them. With act-order the columns are
//! visited in order of decreasing `diag(H)` and each group is a run of that order (`g_idx`).
//!
//! Everything is in f64 (the official code runs in f32 on a GPU); the blocks of lazy updates are
//! one group long, so a group's grid is always found on fully updated weights (as the official
//! code does for its default of groups of 128 in blocks of 128). The readable twin is the
//! transcription in `tools/golden/make_gptq_solver.py`, held to it in `tests`.

use rayon::prelude::*;

/// The settings of one GPTQ run.
#[derive(Debug, Clone, Copy)]
pub struct GptqOptions {
    /// Inputs per group (a divisor of every quantized row's length).
    pub group: usize,
    /// Visit the columns in order of decreasing Hessian diagonal (`desc_act`).
    pub act_order: bool,
    /// Dampening added to H's diagonal, as a fraction of its mean (`percdamp`, 0.01).
    pub damp: f64,
}

/// A weight `(rows, cols)` quantized on the 4-bit grid: codes in the columns' own order,
/// per row and group an f32 scale and a zero point, and each column's group.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqWeight {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// `(rows, cols)`, 0..=15.
    pub codes: Vec<u8>,
    /// `(rows, groups)`.
    pub scales: Vec<f32>,
    /// `(rows, groups)`, 0..=15.
    pub zeros: Vec<u8>,
    /// `(cols)`: the group of each column.
    pub g_idx: Vec<u32>,
}

impl GptqWeight {
    /// The quantized weight `(rows, cols)`: `scale (q - zero)` (scales as they are given; the
    /// folders store them in f16).
    pub fn dequantize(&self) -> Vec<f32> {
        let groups = self.cols / self.group;
        let mut w = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let g = r * groups + self.g_idx[c] as usize;
                let q = self.codes[r * self.cols + c] as f32;
                w[r * self.cols + c] = self.scales[g] * (q - self.zeros[g] as f32);
            }
        }
        w
    }
}

const MAXQ: f64 = 15.0;

/// GPTQ's grid of one row's group: (scale, zero).
fn grid(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((0f64, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = match lo == 0.0 && hi == 0.0 {
        true => (-1.0, 1.0),
        false => (lo, hi),
    };
    let scale = (hi - lo) / MAXQ;
    (scale, (-lo / scale).round_ties_even())
}

fn code(w: f64, scale: f64, zero: f64) -> f64 {
    ((w / scale).round_ties_even() + zero).clamp(0.0, MAXQ)
}

/// The upper triangular U with `H^{-1} = U^T U`, by the official code's steps
/// (`cholesky(cholesky_inverse(cholesky(H)), upper=True)`), on nalgebra in f64: an error when H
/// is not positive definite.
fn inverse_upper_factor(h: &[f64], n: usize) -> Result<Vec<f64>, String> {
    let not_pd = || "the Hessian is not positive definite: raise --damp".to_string();
    let h = nalgebra::DMatrix::from_row_slice(n, n, h);
    let inv = h.cholesky().ok_or_else(not_pd)?.inverse();
    // U = L^T of H^{-1}'s lower factor L; row-major out of nalgebra's column-major L
    let l = inv.cholesky().ok_or_else(not_pd)?.l();
    Ok(l.as_slice().to_vec())
}

/// GPTQ-quantize `w (rows, cols)` (row-major) given the Hessian `h (cols, cols)` of its inputs
/// (any positive multiple of `X^T X`). A one-line error when `cols` is not whole groups or H is
/// not positive definite after dampening.
pub fn gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    opts: GptqOptions,
) -> Result<GptqWeight, String> {
    let g = opts.group;
    if g == 0 || !cols.is_multiple_of(g) {
        return Err(format!("rows of {cols} values are not whole groups of {g}"));
    }
    assert_eq!(w.len(), rows * cols);
    assert_eq!(h.len(), cols * cols);
    let mut h = h.to_vec();
    // dead inputs (never non-zero in the calibration data): H_ii = 1, their weights 0
    let dead: Vec<bool> = (0..cols).map(|i| h[i * cols + i] == 0.0).collect();
    for i in (0..cols).filter(|&i| dead[i]) {
        h[i * cols + i] = 1.0;
    }
    let order: Vec<usize> = match opts.act_order {
        true => {
            let mut o: Vec<usize> = (0..cols).collect();
            // descending diagonal, stable (torch.argsort(descending=True) on distinct values)
            o.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]));
            o
        }
        false => (0..cols).collect(),
    };
    // W and H in the visiting order
    let mut wp: Vec<f64> = (0..rows * cols)
        .map(|i| {
            let (r, k) = (i / cols, order[i % cols]);
            if dead[k] {
                0.0
            } else {
                w[r * cols + k] as f64
            }
        })
        .collect();
    let mut hp: Vec<f64> = (0..cols * cols)
        .map(|i| h[order[i / cols] * cols + order[i % cols]])
        .collect();
    let mean_diag = (0..cols).map(|i| hp[i * cols + i]).sum::<f64>() / cols as f64;
    for i in 0..cols {
        hp[i * cols + i] += opts.damp * mean_diag;
    }
    let u = inverse_upper_factor(&hp, cols)?;

    let groups = cols / g;
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; rows * groups];
    let mut zeros = vec![0u8; rows * groups];
    // one block of lazy updates per group: rows are independent, so each row runs alone
    codes
        .par_chunks_mut(cols)
        .zip(wp.par_chunks_mut(cols))
        .zip(
            scales
                .par_chunks_mut(groups)
                .zip(zeros.par_chunks_mut(groups)),
        )
        .for_each(|((codes, w), (scales, zeros))| {
            for b in 0..groups {
                let (i1, i2) = (b * g, (b + 1) * g);
                let (scale, zero) = grid(w[i1..i2].iter().copied());
                scales[b] = scale as f32;
                zeros[b] = zero as u8;
                let mut err = vec![0f64; g];
                for i in i1..i2 {
                    let q = code(w[i], scale, zero);
                    codes[order[i]] = q as u8;
                    let e = (w[i] - scale * (q - zero)) / u[i * cols + i];
                    err[i - i1] = e;
                    for j in i + 1..i2 {
                        w[j] -= e * u[i * cols + j];
                    }
                }
                // the block's errors onto every later column
                for j in i2..cols {
                    let s: f64 = (i1..i2).map(|i| err[i - i1] * u[i * cols + j]).sum();
                    w[j] -= s;
                }
            }
        });
    let mut g_idx = vec![0u32; cols];
    for (k, &c) in order.iter().enumerate() {
        g_idx[c] = (k / g) as u32;
    }
    Ok(GptqWeight {
        rows,
        cols,
        group: g,
        codes,
        scales,
        zeros,
        g_idx,
    })
}

/// Round to nearest on the same grid (no error compensation), in the same form: the baseline
/// GPTQ is measured against. In f32, as [`super::Int4`] (`--quantize int4`) rounds: the same
/// codes.
pub fn rtn(w: &[f32], rows: usize, cols: usize, group: usize) -> Result<GptqWeight, String> {
    if group == 0 || !cols.is_multiple_of(group) {
        return Err(format!(
            "rows of {cols} values are not whole groups of {group}"
        ));
    }
    let groups = cols / group;
    let mut out = GptqWeight {
        rows,
        cols,
        group,
        codes: vec![0; rows * cols],
        scales: vec![0.0; rows * groups],
        zeros: vec![0; rows * groups],
        g_idx: (0..cols).map(|c| (c / group) as u32).collect(),
    };
    for r in 0..rows {
        for b in 0..groups {
            let vals = &w[r * cols + b * group..r * cols + (b + 1) * group];
            let (scale, zero) = super::Int4::grid(vals);
            out.scales[r * groups + b] = scale;
            out.zeros[r * groups + b] = zero as u8;
            for (k, v) in vals.iter().enumerate() {
                out.codes[r * cols + b * group + k] = super::Int4::code(*v, scale, zero);
            }
        }
    }
    Ok(out)
}
