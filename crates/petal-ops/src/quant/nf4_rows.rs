//! Few-row products over NF4 rows (decoding, a token at a time) with x kept in f32: each block
//! of 64 codes is looked up in the 16-value NF4 table inside the dot product (`vpermps`),
//! never stored: `x . w = sum_b absmax_b (NF4[q_b] . x_b)`. AVX-512, or AVX2 + FMA (two
//! 8-entry lookups and a blend); elsewhere the caller decodes rows then dots them, as before.

use super::simd::Simd;

/// Values a block (one absmax scale).
const BLOCK: usize = 64;

/// `y (m, n) = x (m, cols) W^T` for NF4 rows of `rb` bytes, the codes first (`cols / 2` bytes,
/// the first value of a pair in the high nibble); `scales(row, out)` writes a row's block
/// scales. None unless this CPU has `simd` ([`Simd::all`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn few_rows_on(
    simd: Simd,
    x: &[f32],
    m: usize,
    cols: usize,
    w: &[u8],
    n: usize,
    rb: usize,
    code: &[f32; 16],
    scales: impl Fn(&[u8], &mut [f32]) + Sync,
) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if simd.runs() && cols.is_multiple_of(BLOCK) && x.len() == m * cols && w.len() == n * rb {
        // x with each 32 values' even positions first, then the odd ones: the order the high
        // and low nibbles of 16 code bytes come in
        let xr: Vec<f32> = x
            .chunks_exact(32)
            .flat_map(|c| (0..32).map(move |t| if t < 16 { c[2 * t] } else { c[2 * t - 31] }))
            .collect();
        let init = || vec![0f32; cols / BLOCK];
        let y = super::product::by_rows_of_w(w, rb, m, n, init, |sc, row, out| {
            scales(row, sc);
            for xi in xr.chunks_exact(cols) {
                // SAFETY: the CPU has `simd`'s features (checked above); the row holds
                // cols / 2 code bytes, xi cols values, sc one scale a block.
                out.push(unsafe {
                    match simd {
                        Simd::Avx512 => x86::dot(&row[..cols / 2], sc, xi, code),
                        Simd::Avx2 => x86::dot_avx2(&row[..cols / 2], sc, xi, code),
                    }
                });
            }
        });
        return Some(y);
    }
    let _ = (simd, x, m, cols, w, n, rb, code, scales);
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// One row's codes dotted with `xr` (rearranged as `few_rows` does), `sc` its block scales.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot(codes: &[u8], sc: &[f32], xr: &[f32], code: &[f32; 16]) -> f32 {
        assert!(codes.len() >= sc.len() * BLOCK / 2 && xr.len() >= sc.len() * BLOCK);
        let table = _mm512_loadu_ps(code.as_ptr());
        let low = _mm512_set1_epi32(15);
        let mut acc = _mm512_setzero_ps();
        for (b, &s) in sc.iter().enumerate() {
            let mut t = _mm512_setzero_ps();
            for h in 0..2 {
                let at = b * BLOCK + h * 32;
                let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                    codes.as_ptr().add(at / 2) as *const __m128i
                ));
                let even = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
                let odd = _mm512_permutexvar_ps(_mm512_and_si512(q, low), table);
                let xp = xr.as_ptr().add(at);
                t = _mm512_fmadd_ps(even, _mm512_loadu_ps(xp), t);
                t = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xp.add(16)), t);
            }
            acc = _mm512_fmadd_ps(_mm512_set1_ps(s), t, acc);
        }
        _mm512_reduce_add_ps(acc)
    }

    /// [`dot`] on AVX2 + FMA: 8 codes at a time, each looked up in both halves of the table
    /// (`vpermps` takes 8 entries) and the half picked by the code's bit 3.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(codes: &[u8], sc: &[f32], xr: &[f32], code: &[f32; 16]) -> f32 {
        assert!(codes.len() >= sc.len() * BLOCK / 2 && xr.len() >= sc.len() * BLOCK);
        let (t0, t1) = (
            _mm256_loadu_ps(code.as_ptr()),
            _mm256_loadu_ps(code.as_ptr().add(8)),
        );
        let look = |i: __m256i| {
            let upper = _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)); // bit 3 as the sign
            _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(t0, i),
                _mm256_permutevar8x32_ps(t1, i),
                upper,
            )
        };
        let low = _mm256_set1_epi32(15);
        let mut acc = _mm256_setzero_ps();
        for (b, &s) in sc.iter().enumerate() {
            let mut t = _mm256_setzero_ps();
            for h in 0..2 {
                let at = b * BLOCK + h * 32;
                for half in 0..2 {
                    // code bytes 8 half .. 8 half + 8 of these 16: even values at xr[8 half..],
                    // odd ones at xr[16 + 8 half..]
                    let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        codes.as_ptr().add(at / 2 + 8 * half) as *const __m128i,
                    ));
                    let xp = xr.as_ptr().add(at + 8 * half);
                    t = _mm256_fmadd_ps(look(_mm256_srli_epi32(q, 4)), _mm256_loadu_ps(xp), t);
                    let odd = look(_mm256_and_si256(q, low));
                    t = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xp.add(16)), t);
                }
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s), t, acc);
        }
        crate::quant::q4_1_rows::x86::sum8(acc)
    }
}
