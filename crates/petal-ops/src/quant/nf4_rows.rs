//! Few-row products over NF4 rows (decoding, a token at a time) with x kept in f32: each block
//! of 64 codes is looked up in the 16-value NF4 table inside the dot product (`vpermps`),
//! never stored: `x . w = sum_b absmax_b (NF4[q_b] . x_b)`. AVX-512 only (elsewhere the caller
//! decodes rows then dots them, as before).

/// Values a block (one absmax scale).
const BLOCK: usize = 64;

/// `y (m, n) = x (m, cols) W^T` for NF4 rows of `rb` bytes, the codes first (`cols / 2` bytes,
/// the first value of a pair in the high nibble); `scales(row, out)` writes a row's block
/// scales. None where this CPU lacks AVX-512.
#[allow(clippy::too_many_arguments)]
pub(super) fn few_rows(
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
    if std::arch::is_x86_feature_detected!("avx512f")
        && cols.is_multiple_of(BLOCK)
        && x.len() == m * cols
        && w.len() == n * rb
    {
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
                // SAFETY: the CPU has AVX-512F (checked above); the row holds cols / 2 code
                // bytes, xi cols values, sc one scale a block.
                out.push(unsafe { x86::dot(&row[..cols / 2], sc, xi, code) });
            }
        });
        return Some(y);
    }
    let _ = (x, m, cols, w, n, rb, code, scales);
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
}
