//! 4-bit codes through a 16-entry table (NF4's and int4's decoding): each byte holds two codes,
//! each code picks one of 16 f32 values. With AVX-512 one permute looks up 16 codes
//! (`vpermps` over a table in one register); with AVX2 two 8-entry permutes and a blend; else
//! a plain loop. All three copy table entries, so they agree exactly.

/// `out[2i], out[2i + 1]` = `table` at the two codes of `packed[i]`: the high nibble first
/// when `hi_first` (bitsandbytes' order), else the low one (GPTQ's).
pub(super) fn lookup(packed: &[u8], table: &[f32; 16], out: &mut [f32], hi_first: bool) {
    debug_assert_eq!(out.len(), 2 * packed.len());
    #[cfg(target_arch = "x86_64")]
    {
        let whole = packed.len() / 8 * 8;
        if whole > 0 && avx512() {
            // SAFETY: the CPU has AVX-512F (checked); the loop stays in `whole` bytes
            unsafe { lookup_avx512(&packed[..whole], table, &mut out[..2 * whole], hi_first) };
            return plain(&packed[whole..], table, &mut out[2 * whole..], hi_first);
        }
        let whole = packed.len() / 4 * 4;
        if whole > 0 && avx2() {
            // SAFETY: the CPU has AVX2 (checked); the loop stays in `whole` bytes
            unsafe { lookup_avx2(&packed[..whole], table, &mut out[..2 * whole], hi_first) };
            return plain(&packed[whole..], table, &mut out[2 * whole..], hi_first);
        }
    }
    plain(packed, table, out, hi_first)
}

fn plain(packed: &[u8], table: &[f32; 16], out: &mut [f32], hi_first: bool) {
    let (a, b) = if hi_first { (4, 0) } else { (0, 4) };
    for (p, o) in packed.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = table[((p >> a) & 15) as usize];
        o[1] = table[((p >> b) & 15) as usize];
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
}

/// Byte i of 8 to the 32-bit lanes 2i and 2i + 1.
#[cfg(target_arch = "x86_64")]
const PAIRS: [i8; 16] = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7];

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,ssse3")]
unsafe fn lookup_avx512(packed: &[u8], table: &[f32; 16], out: &mut [f32], hi_first: bool) {
    use std::arch::x86_64::*;
    let t = _mm512_loadu_ps(table.as_ptr());
    let pairs = _mm_loadu_si128(PAIRS.as_ptr().cast());
    let (a, b) = if hi_first { (4, 0) } else { (0, 4) };
    let shifts = _mm512_setr_epi32(a, b, a, b, a, b, a, b, a, b, a, b, a, b, a, b);
    let fifteen = _mm512_set1_epi32(15);
    for (i, p) in packed.chunks_exact(8).enumerate() {
        let bytes = _mm_loadl_epi64(p.as_ptr().cast());
        let codes = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(bytes, pairs));
        let idx = _mm512_and_si512(_mm512_srlv_epi32(codes, shifts), fifteen);
        _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), _mm512_permutexvar_ps(idx, t));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lookup_avx2(packed: &[u8], table: &[f32; 16], out: &mut [f32], hi_first: bool) {
    use std::arch::x86_64::*;
    let lo = _mm256_loadu_ps(table.as_ptr());
    let hi = _mm256_loadu_ps(table.as_ptr().add(8));
    let pairs = _mm_loadu_si128(PAIRS.as_ptr().cast());
    let (a, b) = if hi_first { (4, 0) } else { (0, 4) };
    let shifts = _mm256_setr_epi32(a, b, a, b, a, b, a, b);
    let fifteen = _mm256_set1_epi32(15);
    for (i, p) in packed.chunks_exact(4).enumerate() {
        let bytes = _mm_cvtsi32_si128(i32::from_le_bytes([p[0], p[1], p[2], p[3]]));
        let codes = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(bytes, pairs));
        let idx = _mm256_and_si256(_mm256_srlv_epi32(codes, shifts), fifteen);
        // entries 8..15 where bit 3 of the code is set (moved to the sign bit for the blend)
        let upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
        let y = _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(lo, idx),
            _mm256_permutevar8x32_ps(hi, idx),
            upper,
        );
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), y);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_path_equals_the_plain_loop() {
        let table: [f32; 16] = std::array::from_fn(|i| i as f32 * 1.5 - 7.0);
        let packed: Vec<u8> = (0..77u32).map(|i| (i * 37 + 11) as u8).collect();
        for hi_first in [true, false] {
            let mut want = vec![0f32; 2 * packed.len()];
            super::plain(&packed, &table, &mut want, hi_first);
            let mut got = vec![0f32; 2 * packed.len()];
            super::lookup(&packed, &table, &mut got, hi_first);
            assert_eq!(got, want, "dispatched, hi_first {hi_first}");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                let mut got = vec![0f32; 2 * 76];
                // SAFETY: AVX2 checked
                unsafe { super::lookup_avx2(&packed[..76], &table, &mut got, hi_first) };
                assert_eq!(got, want[..152], "avx2, hi_first {hi_first}");
            }
        }
    }
}
