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
//! instruction sums four products into i32. (The input gradient's product runs along W's
//! columns, across blocks with different steps: it stays on the other kernels.)

use super::pack::{PackedB, Shared};
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
                        let q0 = p / kind.panel() * kind.panel();
                        let kcq = kind.panel().min(kw - q0);
                        let at = q0 * np * nr + jp * kcq * nr + (p - q0) * nr + jj;
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
