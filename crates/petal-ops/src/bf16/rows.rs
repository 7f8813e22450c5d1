//! `PackedB` made from a weight's rows decoded one at a time (a quantized tile): straight into
//! the packed k-pairs, with no f32 or bf16 copy of the whole tile.

use super::{cvt_row, kc_here, narrow, pair, Aligned, PackedB, NR};
use rayon::prelude::*;

impl PackedB {
    /// `b` packed from `rows` rows of `cols` values that `row(i, out)` writes as f32 (a
    /// quantized weight's rows, decoded one at a time into a row-sized buffer: no f32 or bf16
    /// copy of the whole tile): `b = rows^T (cols, rows)` when `transposed` (the forward
    /// `x W^T`), else `b = rows (rows, cols)` (the input gradient `g W`). Reuses `words`.
    pub fn from_rows(
        rows: usize,
        cols: usize,
        transposed: bool,
        words: Vec<u32>,
        row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> PackedB {
        let (k, n) = crate::cpu::k_n(rows, cols, transposed);
        let kp = k.div_ceil(2).next_multiple_of(crate::amx::PAIRS);
        let kc = kc_here();
        let np = n.div_ceil(NR);
        // every word is written below, padding included
        let mut words = Aligned::reuse(words, kp * np * NR);
        // where the words of column panel jp start in each k-block: (first pair, pairs, word)
        let blocks = move |jp: usize| {
            (0..kp).step_by(kc).map(move |p0| {
                let kcp = kc.min(kp - p0);
                (p0, kcp, p0 * np * NR + jp * kcp * NR)
            })
        };
        struct Out(*mut u32);
        // SAFETY: the tasks below write disjoint words (distinct columns or distinct pairs).
        unsafe impl Sync for Out {}
        let out = Out(words.get_mut().as_mut_ptr());
        let out = &out;
        if transposed {
            // a task per group of G columns (rows of W) of a panel: the group decoded into
            // pairs, then written a whole cache line (G words) per pair into each k-block
            // (each row's pairs written alone across the panel touched every line G times,
            // far outside L1 for wide rows); groups, not panels, so that a tile of a few
            // panels still shares out evenly
            const G: usize = 16;
            const _: () = assert!(crate::amx::PAIRS == G && NR.is_multiple_of(G));
            (0..np * NR / G).into_par_iter().for_each_init(
                || (vec![0f32; cols], vec![0u32; G * kp]),
                |(f, strip), t| {
                    let (jp, g0) = (t * G / NR, t * G % NR);
                    for (jj, pairs) in strip.chunks_exact_mut(kp).enumerate() {
                        let c = jp * NR + g0 + jj;
                        if c < rows {
                            row(c, f);
                            cvt_row(f, pairs);
                        } else {
                            pairs.fill(0);
                        }
                    }
                    for (p0, kcp, w0) in blocks(jp) {
                        // kcp is a whole number of G-pair blocks (k-blocks of PAIRS pairs)
                        for p in (0..kcp).step_by(G) {
                            // SAFETY: inside `strip` (p0 + p + G <= kp) and `words`; this task
                            // alone writes these G columns.
                            unsafe {
                                transpose(&strip[p0 + p..], kp, out.0.add(w0 + p * NR + g0), NR)
                            };
                        }
                    }
                },
            );
        } else {
            // a task per few pairs: rows 2p and 2p + 1 interleaved, NR words at a time
            (0..kp).into_par_iter().with_min_len(4).for_each_init(
                || (vec![0f32; cols], vec![0u16; np * NR], vec![0u16; np * NR]),
                |(f, lo, hi), p| {
                    for (r, bits) in [(2 * p, &mut *lo), (2 * p + 1, &mut *hi)] {
                        if r < rows {
                            row(r, f);
                            narrow(f, &mut bits[..cols]); // past cols stays 0
                        } else {
                            bits.fill(0);
                        }
                    }
                    for jp in 0..np {
                        let (p0, _, w0) = blocks(jp).nth(p / kc).expect("pair inside k");
                        // SAFETY: inside `words`; this task alone writes pair p.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(out.0.add(w0 + (p - p0) * NR), NR)
                        };
                        let (l, h) = (&lo[jp * NR..(jp + 1) * NR], &hi[jp * NR..(jp + 1) * NR]);
                        for ((d, &l), &h) in dst.iter_mut().zip(l).zip(h) {
                            *d = pair(l, h);
                        }
                    }
                },
            );
        }
        PackedB {
            k,
            n,
            kp,
            kc,
            words,
        }
    }

    /// The packed words, for reuse by the next `from_rows`.
    pub fn into_words(self) -> Vec<u32> {
        self.words.v
    }
}

/// `dst[j * ld + i] = src[i * ls + j]` for i, j < 16 (a block of 16 rows' pairs written as 16
/// pairs of 16 columns each).
///
/// # Safety
/// `src` holds `15 * ls + 16` words; `dst` is writable at `j * ld + i` for i, j < 16.
unsafe fn transpose(src: &[u32], ls: usize, dst: *mut u32, ld: usize) {
    debug_assert!(src.len() >= 15 * ls + 16);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX512F (checked above); the bounds are the caller's.
        return unsafe { super::x86::transpose16(src.as_ptr(), ls, dst, ld) };
    }
    for j in 0..16 {
        for i in 0..16 {
            // SAFETY: the caller's bounds.
            unsafe { *dst.add(j * ld + i) = src[i * ls + j] };
        }
    }
}
