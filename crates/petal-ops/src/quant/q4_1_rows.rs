//! Few-row products over Q4_1 blocks (decoding, a token at a time) with x kept in f32: each
//! 32-value block `d * q + m` is decoded inside the dot product, never stored, so a row of W
//! costs its 20-byte blocks and a few instructions each. Q4_1 is SmolLM2's type; candle's own
//! Q4_1 dot product is scalar. `q4_1 x . w = sum_b d_b (q_b . x_b) + m_b (sum x_b)`.
//! AVX-512 or AVX2 + FMA (elsewhere the caller decodes rows then dots them, as before); the
//! readable twin is `rows_reference`.

use super::simd::Simd;

/// Bytes of one block: d and m (f16), 16 bytes of nibbles (value j low, j + 16 high).
const BLOCK: usize = 20;

/// `y (m, n) = x (m, k) W^T` for Q4_1 rows of W on the vector unit `simd`, None unless this
/// CPU has it ([`Simd::all`]) and k is whole blocks.
pub(super) fn few_rows_on(
    simd: Simd,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if simd.runs() && k.is_multiple_of(32) && x.len() == m * k && w.len() == n * k / 32 * BLOCK {
        let rb = k / 32 * BLOCK;
        // the block sums of x, for the m terms
        let sums: Vec<f32> = x.chunks_exact(32).map(|b| b.iter().sum()).collect();
        let y = super::product::by_rows_of_w(
            w,
            rb,
            m,
            n,
            || (),
            |_, row, out| {
                for (xi, si) in x.chunks_exact(k).zip(sums.chunks_exact(k / 32)) {
                    // SAFETY: the CPU has `simd`'s features (checked above); the lengths agree
                    // (k / 32 blocks of row, 32 values of xi and one sum each).
                    out.push(unsafe {
                        match simd {
                            Simd::Avx512 => x86::dot(row, xi, si),
                            Simd::Avx2 => x86::dot_avx2(row, xi, si),
                        }
                    });
                }
            },
        );
        return Some(y);
    }
    let _ = (simd, x, m, k, w, n);
    None
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// One Q4_1 row (`xi.len() / 32` blocks) dotted with `xi`, `si` its block sums.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn dot(row: &[u8], xi: &[f32], si: &[f32]) -> f32 {
        let blocks = xi.len() / 32;
        assert!(row.len() >= blocks * BLOCK && si.len() >= blocks);
        let mut acc = _mm512_setzero_ps();
        let mut ms = 0f32;
        let low = _mm512_set1_epi32(15);
        for (b, &sum) in si[..blocks].iter().enumerate() {
            let p = row.as_ptr().add(b * BLOCK);
            // d and m: two f16 in the block's first 4 bytes
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
            let d = _mm512_broadcastss_ps(dm);
            ms += _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)) * sum;
            let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(4) as *const __m128i));
            let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, low));
            let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
            let xp = xi.as_ptr().add(b * 32);
            let t = _mm512_mul_ps(lo, _mm512_loadu_ps(xp));
            let t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(16)), t);
            acc = _mm512_fmadd_ps(d, t, acc);
        }
        _mm512_reduce_add_ps(acc) + ms
    }

    /// [`dot`] on AVX2 + FMA: the block's 16 nibble bytes as two halves of 8, low nibbles
    /// values 0-15 and high ones 16-31.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(row: &[u8], xi: &[f32], si: &[f32]) -> f32 {
        let blocks = xi.len() / 32;
        assert!(row.len() >= blocks * BLOCK && si.len() >= blocks);
        let mut acc = _mm256_setzero_ps();
        let mut ms = 0f32;
        let low = _mm256_set1_epi32(15);
        for (b, &sum) in si[..blocks].iter().enumerate() {
            let p = row.as_ptr().add(b * BLOCK);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
            let d = _mm256_broadcastss_ps(dm);
            ms += _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)) * sum;
            let q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(4) as *const __m128i));
            let q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(12) as *const __m128i));
            let f = |q: __m256i| _mm256_cvtepi32_ps(q);
            let xp = xi.as_ptr().add(b * 32);
            let t = _mm256_mul_ps(f(_mm256_and_si256(q0, low)), _mm256_loadu_ps(xp));
            let t = _mm256_fmadd_ps(f(_mm256_and_si256(q1, low)), _mm256_loadu_ps(xp.add(8)), t);
            let t = _mm256_fmadd_ps(f(_mm256_srli_epi32(q0, 4)), _mm256_loadu_ps(xp.add(16)), t);
            let t = _mm256_fmadd_ps(f(_mm256_srli_epi32(q1, 4)), _mm256_loadu_ps(xp.add(24)), t);
            acc = _mm256_fmadd_ps(d, t, acc);
        }
        sum8(acc) + ms
    }

    /// The sum of a vector's 8 lanes.
    #[target_feature(enable = "avx2")]
    pub(in crate::quant) unsafe fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

/// The readable twin: each row decoded by the definition, dotted in f64.
#[cfg(test)]
pub(super) fn rows_reference(x: &[f32], m: usize, k: usize, w: &[u8], n: usize) -> Vec<f32> {
    let rb = k / 32 * BLOCK;
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f64();
    let mut y = vec![0f32; m * n];
    for o in 0..n {
        let row = &w[o * rb..(o + 1) * rb];
        for i in 0..m {
            let mut s = 0f64;
            for (b, blk) in row.chunks_exact(BLOCK).enumerate() {
                let (d, mm) = (f16(&blk[0..2]), f16(&blk[2..4]));
                for j in 0..32 {
                    let q = if j < 16 {
                        blk[4 + j] & 15
                    } else {
                        blk[4 + j - 16] >> 4
                    };
                    s += (d * q as f64 + mm) * x[i * k + b * 32 + j] as f64;
                }
            }
            y[i * n + o] = s as f32;
        }
    }
    y
}
