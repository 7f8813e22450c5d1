//! `y (m, n) = x (m, k) W^T` for a handful of rows `m` (decoding several sequences, one token
//! each), with `W (n, k)` row-major as a linear layer stores it. The `gemm` crate packs all of
//! W into a fresh buffer on every call whatever m is, which for a few rows costs more than the
//! product (measured: 35% of a batched decoding step in packing, 23% more in page faults on the
//! fresh buffers). Here each output is a dot product of an x row with a W row, both read in
//! place: W streams through once, the rows of x stay in cache. Rows of W are split over the
//! thread pool.

use rayon::prelude::*;

/// The most rows of x this path takes; more go to `gemm`.
pub(crate) const MAX_ROWS: usize = 16;

/// Whether a product over `m` rows of x takes this path (the fused kernels ask; the composed
/// reference ops never come here).
pub(crate) fn takes(m: usize) -> bool {
    (1..=MAX_ROWS).contains(&m)
}
const LANES: usize = 16;

/// A weight element read as f32: f32 itself, or bf16 bits (the top half of an f32).
pub(crate) trait Widen: Copy + Send + Sync {
    fn f32(self) -> f32;
}
impl Widen for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}
impl Widen for u16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// `x` (m, k) and `w` (n, k) row-major (f32, or bf16 bits), 1 <= m <= MAX_ROWS: `x w^T`,
/// (m, n) row-major, summed in f32.
pub(crate) fn xwt<W: Widen>(x: &[f32], w: &[W], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!((1..=MAX_ROWS).contains(&m) && x.len() >= m * k && w.len() >= n * k);
    let mut yt = vec![0f32; n * m]; // (n, m): each W row's m outputs together
    let per_task = (16384 / k.max(1)).clamp(4, 256); // about 64 KB of W a task
    yt.par_chunks_mut(per_task * m)
        .enumerate()
        .for_each(|(t, out)| {
            let o0 = t * per_task;
            for (j, outs) in out.chunks_mut(m).enumerate() {
                let row = &w[(o0 + j) * k..(o0 + j + 1) * k];
                dots(row, x, k, outs);
            }
        });
    let mut y = vec![0f32; m * n];
    for (o, outs) in yt.chunks(m).enumerate() {
        for (i, v) in outs.iter().enumerate() {
            y[i * n + o] = *v;
        }
    }
    y
}

/// `xwt` over a bf16 W for rows of x in f32 (rounded to bf16 first, as the packed bf16 kernel
/// rounds them) or bf16.
pub(crate) fn xwt_bf16(x: &crate::bf16::Rows, w: &[u16], m: usize, n: usize, k: usize) -> Vec<f32> {
    let xr: Vec<f32> = match x {
        crate::bf16::Rows::F32(x) => x
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect(),
        crate::bf16::Rows::Bf16(x) => x.iter().map(|v| v.f32()).collect(),
    };
    xwt(&xr, w, m, n, k)
}

/// `outs[i] = <row, x[i]>` for each row i of x (k wide).
fn dots<W: Widen>(row: &[W], x: &[f32], k: usize, outs: &mut [f32]) {
    use crate::vmath::Simd;
    match Simd::best() {
        // SAFETY: `Simd::best` is an instruction set this CPU runs.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { dots_avx512(row, x, k, outs) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { dots_avx2(row, x, k, outs) },
        _ => dots_any::<W, false>(row, x, k, outs),
    }
}

/// The same loop compiled for AVX2 (16 lanes are two registers), for CPUs without AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<W: Widen>(row: &[W], x: &[f32], k: usize, outs: &mut [f32]) {
    dots_any::<W, true>(row, x, k, outs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512<W: Widen>(row: &[W], x: &[f32], k: usize, outs: &mut [f32]) {
    dots_any::<W, true>(row, x, k, outs)
}

/// Four x rows at a time against one W row, LANES independent sums each (so the compiler
/// keeps them in vector registers without reassociating anything), then the tail. `FUSED`:
/// each step one fused multiply-add (`mul_add`, one `vfmadd` where the caller enables FMA;
/// Rust never fuses `a + w * x` itself, which takes a multiply and an add); without FMA in
/// hardware `mul_add` is a slow library call, so the portable path keeps the two.
#[inline(always)]
fn dots_any<W: Widen, const FUSED: bool>(row: &[W], x: &[f32], k: usize, outs: &mut [f32]) {
    let body = k / LANES * LANES;
    let mut i = 0;
    while i < outs.len() {
        let r = (outs.len() - i).min(4);
        let mut acc = [[0f32; LANES]; 4];
        for c in (0..body).step_by(LANES) {
            let wc: &[W; LANES] = row[c..c + LANES].try_into().expect("LANES wide");
            for (q, a) in acc.iter_mut().enumerate().take(r) {
                let xc: &[f32; LANES] = x[(i + q) * k + c..(i + q) * k + c + LANES]
                    .try_into()
                    .expect("LANES wide");
                for l in 0..LANES {
                    a[l] = match FUSED {
                        true => wc[l].f32().mul_add(xc[l], a[l]),
                        false => a[l] + wc[l].f32() * xc[l],
                    };
                }
            }
        }
        for (q, a) in acc.iter().enumerate().take(r) {
            let xr = &x[(i + q) * k..(i + q + 1) * k];
            let tail: f32 = (body..k).map(|c| row[c].f32() * xr[c]).sum();
            outs[i + q] = a.iter().sum::<f32>() + tail;
        }
        i += r;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_row_products_equal_the_definition_for_every_row_count_and_ragged_widths() {
        let mut s = 1u64;
        let mut r = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (m, n, k) in [
            (1, 5, 3),
            (2, 70, 33),
            (4, 129, 64),
            (5, 300, 257),
            (16, 513, 100),
            (7, 1, 16),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| r()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| r()).collect();
            let y = xwt(&x, &w, m, n, k);
            for i in 0..m {
                for o in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| x[i * k + c] as f64 * w[o * k + c] as f64)
                        .sum();
                    let got = y[i * n + o] as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "({m},{n},{k}) [{i},{o}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The portable loop (two operations a step) and the fused one (`mul_add`) both equal the
    /// definition, whichever of them this CPU's dispatch takes.
    #[test]
    fn the_portable_and_the_fused_loops_both_equal_the_definition() {
        let k = 100;
        let row: Vec<f32> = (0..k)
            .map(|i| ((i * 29 % 53) as f32 - 26.0) / 16.0)
            .collect();
        let x: Vec<f32> = (0..5 * k)
            .map(|i| ((i * 31 % 71) as f32 - 35.0) / 32.0)
            .collect();
        let (mut plain, mut fused) = (vec![0f32; 5], vec![0f32; 5]);
        dots_any::<f32, false>(&row, &x, k, &mut plain);
        dots_any::<f32, true>(&row, &x, k, &mut fused);
        for i in 0..5 {
            let want: f64 = (0..k).map(|c| row[c] as f64 * x[i * k + c] as f64).sum();
            for got in [plain[i], fused[i]] {
                assert!(
                    (got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn few_row_products_over_bf16_weights_equal_the_definition_on_the_widened_weights() {
        let (m, n, k) = (3, 77, 131);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let w: Vec<u16> = (0..n * k)
            .map(|i| half::bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 32.0).to_bits())
            .collect();
        let y = xwt(&x, &w, m, n, k);
        for i in 0..m {
            for o in 0..n {
                let want: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * half::bf16::from_bits(w[o * k + c]).to_f64())
                    .sum();
                assert!((y[i * n + o] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
            }
        }
    }
}
