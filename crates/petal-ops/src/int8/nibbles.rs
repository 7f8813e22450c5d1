//! The forward product `x W^T` over a 4-bit weight in its own codes: W's blocks of 32 values
//! (Q4_0, Q4_1, Q4_K's sub-blocks, grouped int4) each hold 4-bit codes `q` on an affine grid,
//! value `step q + lo`; x is quantized per row and block of 32 to signed 8-bit codes as the
//! other kernels quantize a (`ca`, scale `sa`). A block's contribution is then
//! `sa (step sum(ca q) + lo sum(ca))`: exact in W, the code products summed exactly in
//! integers.
//!
//! On AVX2 `vpmaddubsw` multiplies 32 unsigned bytes (the codes, 0..15) by 32 signed ones (x's,
//! -127..127) and adds adjacent pairs into 16 bits: at most 2 x 15 x 127 = 3810 a lane, so a
//! whole block's eight words sum in 16-bit lanes (30480) before one `vpmaddwd` by ones widens
//! them: nine multiplies for 256 products where the AVX2 kernel of 16-bit codes takes sixteen,
//! and no rounding of W. With `vpdpbusd` (AVX-VNNI, or AVX-512 VNNI on 256 bits) one
//! instruction sums four products into i32.
//!
//! The input gradient `g W` runs along W's columns, across blocks with different steps, so W's
//! own codes do not serve it: each tile of W is decoded and each column's blocks of 32 rows
//! coded again in 4 bits on the block's own range (`code4`), which the same kernels take. That
//! rounds W a second time, for the gradient only (the forward keeps W exact): a rounding error
//! up to 1/30 of the block's range, about the size of a 4-bit format's own. 5 and 6 bits were
//! measured too (docs/quantized.md): no closer loss curves, and on AVX2 their 16-bit sums must
//! widen every 4 or 2 words, which took the products back to f32's rate.

use super::pack::{word_at, PackedB, Shared};
use super::{absmax, code, scales, Kind, BLOCK};
use rayon::prelude::*;

impl PackedB {
    /// `b = W^T (cols, rows)` for the forward `x W^T`, from `rows` rows of `cols` values that
    /// `row(i, codes, step, lo)` gives as 4-bit codes (one a byte) with each block of 32's step
    /// and offset. Reuses `words`' allocation.
    pub(crate) fn from_codes(
        kind: Kind,
        rows: usize,
        cols: usize,
        mut words: Vec<u32>,
        row: impl Fn(usize, &mut [u8], &mut [f32], &mut [f32]) + Sync,
    ) -> PackedB {
        assert!(
            kind.is_nibbles(),
            "from_codes: {kind:?} takes no 4-bit codes"
        );
        let (k, n) = (cols, rows);
        assert!(k.is_multiple_of(BLOCK), "nibbles: rows of whole blocks");
        let (g, nr) = (kind.group(), kind.nr());
        let (kw, nb, np) = (k / g, k / BLOCK, n.div_ceil(nr));
        words.resize(kw * np * nr, 0);
        // each panel's steps and offsets, block by block: `[jp][block]` of NR steps then NR
        // offsets (padding columns 0), so that a tile reads them as one stream
        let mut scale = vec![0f32; steps_at(np, 0, nb, nr)];
        let (wp, sp) = (Shared(words.as_mut_ptr()), Shared(scale.as_mut_ptr()));
        let (wp, sp) = (&wp, &sp);
        (0..np).into_par_iter().for_each_init(
            || (vec![0u8; k], vec![0f32; nb], vec![0f32; nb]),
            |(codes, step, off), jp| {
                for jj in 0..nr {
                    let j = jp * nr + jj;
                    let live = j < n;
                    if live {
                        row(j, codes, step, off);
                    }
                    for p in 0..kw {
                        let w = if live {
                            u32::from_le_bytes([
                                codes[4 * p],
                                codes[4 * p + 1],
                                codes[4 * p + 2],
                                codes[4 * p + 3],
                            ])
                        } else {
                            0 // the last panel's padding columns
                        };
                        let at = word_at(kind, kw, np, p, j);
                        // SAFETY: panel jp's words are this task's alone, inside `words`.
                        unsafe { *wp.0.add(at) = w };
                    }
                    if live {
                        for blk in 0..nb {
                            let at = steps_at(jp, blk, nb, nr) + jj;
                            // SAFETY: panel jp's scales are this task's alone; at + nr is
                            // inside `scale` (blk < nb, jj < nr).
                            unsafe {
                                *sp.0.add(at) = step[blk];
                                *sp.0.add(at + nr) = off[blk];
                            }
                        }
                    }
                }
            },
        );
        PackedB::of_codes(kind, n, kw, words, scale)
    }

    /// `b = rows (rows, cols)` for the input gradient `g W`, from `rows` rows of `cols` values
    /// that `row(i, out)` writes as f32 (a quantized weight's rows, decoded a block of 32 at a
    /// time), each column's blocks of 32 rows coded again in 4 bits ([`code4`]). Reuses
    /// `words`' allocation.
    pub(crate) fn from_rows_coded(
        kind: Kind,
        rows: usize,
        cols: usize,
        mut words: Vec<u32>,
        row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> PackedB {
        assert!(
            kind.is_nibbles(),
            "from_rows_coded: {kind:?} takes no codes"
        );
        let (k, n) = (rows, cols);
        let (g, nr) = (kind.group(), kind.nr());
        let (kw, nb, np) = (k.div_ceil(g), k.div_ceil(BLOCK), n.div_ceil(nr));
        words.resize(kw * np * nr, 0);
        let mut scale = vec![0f32; steps_at(np, 0, nb, nr)];
        let (wp, sp) = (Shared(words.as_mut_ptr()), Shared(scale.as_mut_ptr()));
        let (wp, sp) = (&wp, &sp);
        // a task per block of 32 rows: the rows decoded, every column's range, its codes (as
        // `code4` computes them, in loops along the rows that vectorise across columns),
        // then a word of k at a time written across all panels
        (0..nb).into_par_iter().for_each_init(
            || {
                let n = np * nr;
                (
                    vec![0f32; BLOCK * n],
                    vec![0u8; BLOCK * n],
                    vec![0f32; 3 * n],
                )
            },
            |(f, q, lims), blk| {
                let (k0, k1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(k));
                let h = k1 - k0;
                for kk in k0..k1 {
                    row(kk, &mut f[(kk - k0) * n..(kk - k0 + 1) * n]);
                }
                let (lo, rest) = lims[..3 * n].split_at_mut(n);
                let (hi, inv) = rest.split_at_mut(n);
                lo.fill(f32::INFINITY);
                hi.fill(f32::NEG_INFINITY);
                for r in f[..h * n].chunks_exact(n) {
                    for ((lo, hi), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(r) {
                        *lo = lo.min(v);
                        *hi = hi.max(v);
                    }
                }
                for j in 0..n {
                    let (step, l, i) = grid(lo[j], hi[j]);
                    (lo[j], inv[j]) = (l, i);
                    let at = steps_at(j / nr, blk, nb, nr) + j % nr;
                    // SAFETY: block blk's scales are this task's alone; at + nr is inside
                    // `scale` (blk < nb, j % nr < nr).
                    unsafe {
                        *sp.0.add(at) = step;
                        *sp.0.add(at + nr) = l;
                    }
                }
                for (r, q) in q.chunks_exact_mut(n).enumerate().take(BLOCK) {
                    if r >= h {
                        q.fill(0); // a short last block: rows past k code as 0
                        continue;
                    }
                    let f = &f[r * n..(r + 1) * n];
                    for (((q, &v), &lo), &inv) in q.iter_mut().zip(f).zip(&*lo).zip(&*inv) {
                        *q = to_code(v, lo, inv);
                    }
                }
                let mut w = [0u32; 16];
                for p in blk * kind.bw()..((blk + 1) * kind.bw()).min(kw) {
                    let r = p * g - k0;
                    let rows = [0, 1, 2, 3].map(|t| &q[(r + t) * n..(r + t + 1) * n]);
                    for jp in 0..np {
                        let live = nr.min(n - jp * nr);
                        for (jj, w) in w.iter_mut().enumerate().take(nr) {
                            let j = jp * nr + jj;
                            *w = if jj < live {
                                u32::from_le_bytes(rows.map(|q| q[j]))
                            } else {
                                0 // the last panel's padding columns
                            };
                        }
                        let dst = word_at(kind, kw, np, p, jp * nr);
                        // SAFETY: word p is in this task's block, so this task's alone; a
                        // panel's nr words of p are consecutive.
                        unsafe { std::ptr::copy_nonoverlapping(w.as_ptr(), wp.0.add(dst), nr) };
                    }
                }
            },
        );
        PackedB::of_codes(kind, n, kw, words, scale)
    }

    /// A nibble kind's operand: the words and the panels' steps and offsets.
    fn of_codes(kind: Kind, n: usize, kw: usize, words: Vec<u32>, scale: Vec<f32>) -> PackedB {
        PackedB {
            kind,
            n,
            kw,
            words,
            scale,
            excess: Vec::new(),
        }
    }
}

/// A block's 4-bit grid from its least and greatest values: `(step, lo, 1 / step)`; a
/// constant (or non-finite) range gives step 0, all codes 0.
fn grid(lo: f32, hi: f32) -> (f32, f32, f32) {
    let range = hi - lo;
    if range > 0.0 && range.is_finite() {
        (range / 15.0, lo, 15.0 / range)
    } else {
        (0.0, if lo.is_finite() { lo } else { 0.0 }, 0.0)
    }
}

/// `round((v - lo) inv)` in `0..=15` (ties to even, by the 1.5 x 2^23 trick).
#[inline(always)]
fn to_code(v: f32, lo: f32, inv: f32) -> u8 {
    const MAGIC: f32 = 12_582_912.0;
    ((((v - lo) * inv) + MAGIC) - MAGIC).clamp(0.0, 15.0) as u8
}

/// `v`'s 4-bit codes on its own range (`q[..v.len()]`): `lo` its least value, `step` its
/// range over 15, `q = round((v - lo) / step)`, value `step q + lo`; returns `(step, lo)`. A
/// constant (or non-finite) range codes as all zeros with step 0.
pub fn code4(v: &[f32], q: &mut [u8]) -> (f32, f32) {
    let (lo, hi) = v
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    let (step, lo, inv) = grid(lo, hi);
    for (q, &x) in q.iter_mut().zip(v) {
        *q = to_code(x, lo, inv);
    }
    (step, lo)
}

/// Where the steps of panel `jp`'s block `blk` start in a nibble `PackedB`'s scales (`nb`
/// blocks along k, `nr` columns a panel): each block's `nr` steps, then its `nr` offsets.
pub(super) fn steps_at(jp: usize, blk: usize, nb: usize, nr: usize) -> usize {
    (jp * nb + blk) * 2 * nr
}

/// The readable twin: `x (m, k) W^T` for W's `n` rows of `k` values given as 4-bit codes
/// (`codes[i * k + p]`) with a step and offset per block of 32 (`step[i * k / 32 + b]`), x
/// quantized per row and block as the kernels do; each block's sum in f64.
pub fn mm_nibbles_reference(
    x: &[f32],
    codes: &[u8],
    step: &[f32],
    lo: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let nb = k / BLOCK;
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        let blocks: Vec<(Vec<f64>, f64)> = row
            .chunks(BLOCK)
            .map(|b| {
                let (inv, back) = scales(absmax(b));
                (
                    b.iter().map(|&v| code(v, inv) as f64).collect(),
                    back as f64,
                )
            })
            .collect();
        for j in 0..n {
            let mut s = 0f64;
            for (bi, (ca, sa)) in blocks.iter().enumerate() {
                let (st, off) = (step[j * nb + bi] as f64, lo[j * nb + bi] as f64);
                for (p, &c) in ca.iter().enumerate() {
                    let w = st * codes[j * k + bi * BLOCK + p] as f64 + off;
                    s += c * sa * w;
                }
            }
            y[i * n + j] = s as f32;
        }
    }
    y
}
