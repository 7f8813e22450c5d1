//! The operands in the kernels' 32-bit words: `a` row by row, `b` in panels of NR columns made
//! from rows that a closure decodes one at a time (a quantized tile of W: no f32 copy of the
//! whole tile, as `bf16::PackedB::from_rows` packs the bf16 kernel's pairs).

use super::{absmax, code, scales, word, words_of, Kind, BLOCK};
use crate::cpu::View;
use rayon::prelude::*;

/// `a (m, k)` quantized per row and block into words: `[i][q]`, `kw` words a row, rows padded
/// to MR; scales `[i][block]`.
pub(crate) struct PackedA {
    pub(crate) kind: Kind,
    pub(super) m: usize,
    pub(super) words: Vec<u32>,
    pub(super) scale: Vec<f32>,
    pub(super) kw: usize,
    pub(super) nb: usize,
    /// Nibbles: the sum of each block's codes times its scale `[i][block]` (for b's offsets);
    /// else empty
    pub(super) sums: Vec<f32>,
}

impl PackedA {
    pub(crate) fn new(kind: Kind, a: View, m: usize, k: usize) -> PackedA {
        assert!(
            m == 0 || k == 0 || (m - 1) * a.rs + (k - 1) * a.cs < a.x.len(),
            "int8 matmul: input too small"
        );
        let g = kind.group();
        let kw = k.div_ceil(g);
        let rows = m.div_ceil(kind.mr()) * kind.mr();
        let nb = k.div_ceil(BLOCK);
        let mut words = vec![0u32; rows * kw];
        let mut scale = vec![1f32; rows * nb];
        words[..m * kw]
            .par_chunks_mut(kw.max(1))
            .zip(scale.par_chunks_mut(nb.max(1)))
            .enumerate()
            .for_each_init(
                || (Vec::new(), vec![0i8; kw * g]),
                |(row, codes), (i, (w, s))| {
                    let x = if a.cs == 1 {
                        &a.x[i * a.rs..i * a.rs + k]
                    } else {
                        row.clear();
                        row.extend((0..k).map(|j| a.x[i * a.rs + j * a.cs]));
                        &row[..]
                    };
                    code_blocks(x, codes, s);
                    words_of(kind, codes, true, w);
                },
            );
        if kind.excess() {
            words[m * kw..].iter_mut().for_each(|w| *w = 0x8080_8080); // zero codes
        }
        // nibbles: each block's codes summed, read back from the words (signed bytes), times
        // the block's scale
        let mut sums = Vec::new();
        if kind.is_nibbles() && kw > 0 {
            sums = vec![0f32; rows * nb];
            sums.par_chunks_mut(nb)
                .zip(words.par_chunks(kw))
                .zip(scale.par_chunks(nb))
                .for_each(|((sums, w), sa)| {
                    for ((sum, blk), sa) in sums.iter_mut().zip(w.chunks(kind.bw())).zip(sa) {
                        let bytes = blk.iter().flat_map(|w| w.to_le_bytes());
                        *sum = bytes.map(|b| b as i8 as i32).sum::<i32>() as f32 * sa;
                    }
                });
        }
        PackedA {
            kind,
            m,
            words,
            scale,
            kw,
            nb,
            sums,
        }
    }
}

/// `x`'s codes block by block (`codes[..x.len()]`; the rest untouched) and each block's scale.
fn code_blocks(x: &[f32], codes: &mut [i8], scale: &mut [f32]) {
    for ((s, x), c) in scale
        .iter_mut()
        .zip(x.chunks(BLOCK))
        .zip(codes.chunks_mut(BLOCK))
    {
        let (inv, back) = scales(absmax(x));
        *s = back;
        for (c, &x) in c.iter_mut().zip(x) {
            *c = code(x, inv);
        }
    }
}

/// `b (k, n)` quantized per column and block, in words: blocks of `Kind::panel` words of k, each a run
/// of NR-column panels `[q][j]`; scales `[block][j]` (nibbles: `[panel][block]`, NR steps then
/// NR offsets), and VNNI's excess correction (128 x the
/// sum of a block's codes) the same way.
pub(crate) struct PackedB {
    pub(super) kind: Kind,
    pub(super) n: usize,
    pub(super) kw: usize,
    pub(super) words: Vec<u32>,
    pub(super) scale: Vec<f32>,
    /// per block, per column (VNNI), else empty
    pub(super) excess: Vec<i32>,
}

/// Where word `p` of column `j` lies in a `PackedB`'s words (`kw` words of k, `np` panels):
/// its k-block of `Kind::panel` words, its panel there, its row in the panel.
pub(super) fn word_at(kind: Kind, kw: usize, np: usize, p: usize, j: usize) -> usize {
    let nr = kind.nr();
    let q0 = p / kind.panel() * kind.panel();
    let kcq = kind.panel().min(kw - q0);
    q0 * np * nr + (j / nr) * kcq * nr + (p - q0) * nr + j % nr
}

/// A raw pointer the packing tasks write disjoint parts through.
pub(super) struct Shared<T>(pub(super) *mut T);
// SAFETY: each packing task (here and in `nibbles`) writes words, scales, excesses and
// offsets no other task writes.
unsafe impl<T> Sync for Shared<T> {}

impl PackedB {
    /// `b` packed from `rows` rows of `cols` values that `row(i, out)` writes as f32 (a
    /// quantized weight's rows, decoded one at a time): `b = rows^T (cols, rows)` when
    /// `transposed` (the forward `x W^T`), else `b = rows (rows, cols)` (the input gradient
    /// `g W`). Reuses `words`' allocation.
    pub(crate) fn from_rows(
        kind: Kind,
        rows: usize,
        cols: usize,
        transposed: bool,
        mut words: Vec<u32>,
        row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> PackedB {
        let (k, n) = crate::cpu::k_n(rows, cols, transposed);
        let (g, nr) = (kind.group(), kind.nr());
        let (kw, nb, np) = (k.div_ceil(g), k.div_ceil(BLOCK), n.div_ceil(nr));
        // every word is written below, padding included
        words.resize(kw * np * nr, 0);
        if k == 0 || n == 0 {
            return PackedB {
                kind,
                n,
                kw,
                words,
                scale: Vec::new(),
                excess: Vec::new(),
            };
        }
        let mut scale = vec![1f32; nb * n];
        let mut excess = vec![0i32; nb * n];
        let (wp, sp, ep) = (
            Shared(words.as_mut_ptr()),
            Shared(scale.as_mut_ptr()),
            Shared(excess.as_mut_ptr()),
        );
        let (wp, sp, ep) = (&wp, &sp, &ep);
        let at = move |p: usize, j: usize| word_at(kind, kw, np, p, j);
        if transposed {
            // a task per panel: its columns (rows of W) decoded and coded one at a time into a
            // strip, then written a panel row (NR words) at a time
            (0..np).into_par_iter().for_each_init(
                || {
                    (
                        vec![0f32; k],
                        vec![0i8; kw * g],
                        vec![0u32; nr * kw],
                        vec![0f32; nb],
                    )
                },
                |(f, codes, strip, sc), jp| {
                    let live = nr.min(n - jp * nr);
                    for (jj, w) in strip.chunks_exact_mut(kw).enumerate() {
                        if jj >= live {
                            w.fill(0);
                            continue;
                        }
                        let j = jp * nr + jj;
                        row(j, f);
                        code_blocks(f, codes, sc);
                        for (blk, (&s, c)) in sc.iter().zip(codes.chunks(BLOCK)).enumerate() {
                            // SAFETY: column j is this task's alone; blk < nb, j < n.
                            unsafe {
                                *sp.0.add(blk * n + j) = s;
                                *ep.0.add(blk * n + j) =
                                    128 * c.iter().map(|&c| c as i32).sum::<i32>();
                            }
                        }
                        words_of(kind, codes, false, w);
                    }
                    for p in 0..kw {
                        let dst = at(p, jp * nr);
                        for jj in 0..nr {
                            // SAFETY: panel jp's words are this task's alone, inside `words`.
                            unsafe { *wp.0.add(dst + jj) = strip[jj * kw + p] };
                        }
                    }
                },
            );
        } else {
            // a task per block of BLOCK rows (whole words of k): the rows decoded, each
            // column's block coded, then written a word of k at a time across all panels
            let bw = kind.bw();
            (0..nb).into_par_iter().for_each_init(
                || (vec![0f32; BLOCK * n], vec![0f32; n], vec![0i32; n]),
                |(f, inv, sum), blk| {
                    let (k0, k1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(k));
                    for kk in k0..k1 {
                        row(kk, &mut f[(kk - k0) * n..(kk - k0 + 1) * n]);
                    }
                    let f = &f[..(k1 - k0) * n];
                    // each column's absmax over the block's rows, then its multiplier
                    inv.fill(0.0);
                    for r in f.chunks_exact(n) {
                        for (m, v) in inv.iter_mut().zip(r) {
                            *m = m.max(v.abs());
                        }
                    }
                    for (j, inv) in inv.iter_mut().enumerate() {
                        let (i, back) = scales(*inv);
                        *inv = i;
                        // SAFETY: block blk's scales are this task's alone; j < n.
                        unsafe { *sp.0.add(blk * n + j) = back };
                    }
                    sum.fill(0);
                    let mut c = [0i8; 4];
                    for p in blk * bw..((blk + 1) * bw).min(kw) {
                        for jp in 0..np {
                            let dst = at(p, jp * nr);
                            for (jj, j) in (jp * nr..(jp + 1) * nr).enumerate() {
                                let w = if j < n {
                                    for (t, c) in c.iter_mut().enumerate().take(g) {
                                        let kk = p * g + t;
                                        *c = if kk < k1 {
                                            code(f[(kk - k0) * n + j], inv[j])
                                        } else {
                                            0
                                        };
                                    }
                                    sum[j] += c[..g].iter().map(|&c| c as i32).sum::<i32>();
                                    word(kind, &c[..g], false)
                                } else {
                                    0 // the last panel's padding columns
                                };
                                // SAFETY: word p is in this task's block, so this task's alone.
                                unsafe { *wp.0.add(dst + jj) = w };
                            }
                        }
                    }
                    for (j, s) in sum.iter().enumerate() {
                        // SAFETY: block blk's excesses are this task's alone.
                        unsafe { *ep.0.add(blk * n + j) = 128 * s };
                    }
                },
            );
        }
        if !kind.excess() {
            excess = Vec::new();
        }
        PackedB {
            kind,
            n,
            kw,
            words,
            scale,
            excess,
        }
    }

    /// `b (k, n)` given as a view, packed through [`PackedB::from_rows`]: W^T's rows are b's
    /// columns where those are contiguous (or scattered), else b's own rows.
    #[cfg(test)]
    pub(crate) fn new(kind: Kind, b: View, k: usize, n: usize) -> PackedB {
        assert!(
            k == 0 || n == 0 || (k - 1) * b.rs + (n - 1) * b.cs < b.x.len(),
            "int8 matmul: weight too small"
        );
        if b.rs == 1 || b.cs != 1 {
            let col = |j: usize, out: &mut [f32]| {
                for (kk, o) in out.iter_mut().enumerate() {
                    *o = b.x[kk * b.rs + j * b.cs];
                }
            };
            return PackedB::from_rows(kind, n, k, true, Vec::new(), col);
        }
        let row = |kk: usize, out: &mut [f32]| out.copy_from_slice(&b.x[kk * b.rs..][..n]);
        PackedB::from_rows(kind, k, n, false, Vec::new(), row)
    }

    /// Panel `jp` of the k-block starting at word `q0` (`kcq` words).
    pub(super) fn panel(&self, q0: usize, kcq: usize, jp: usize) -> &[u32] {
        let nr = self.kind.nr();
        let np = self.n.div_ceil(nr);
        let at = q0 * np * nr + jp * kcq * nr;
        &self.words[at..at + kcq * nr]
    }

    /// Blocks of 32 along k.
    pub(super) fn blocks(&self) -> usize {
        self.kw.div_ceil(self.kind.bw())
    }

    /// The packed words, for reuse by the next `from_rows`.
    pub(crate) fn into_words(self) -> Vec<u32> {
        self.words
    }
}
