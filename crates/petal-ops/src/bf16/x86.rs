//! The AVX512-BF16 kernels: bf16 rounding and the 8 x 48 register-tile microkernel.

use super::{MR, NR};
use std::arch::x86_64::*;

/// Rounds the leading whole 16-value chunks to bf16; returns the values written.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn narrow(src: &[f32], dst: &mut [u16]) -> usize {
    let chunks = src.len().min(dst.len()) / 16;
    for i in 0..chunks {
        let v = _mm512_loadu_ps(src.as_ptr().add(16 * i));
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.as_mut_ptr().add(16 * i) as *mut _, h);
    }
    chunks * 16
}

/// Converts the leading whole 32-value chunks; returns the pairs written.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn cvt_row(src: &[f32], dst: &mut [u32]) -> usize {
    let chunks = (src.len() / 32).min(dst.len() / 16);
    for i in 0..chunks {
        let lo = _mm512_loadu_ps(src.as_ptr().add(32 * i));
        let hi = _mm512_loadu_ps(src.as_ptr().add(32 * i + 16));
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().add(16 * i) as *mut _, v);
    }
    chunks * 16
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn micro(
    kcp: usize,
    a: &[u32],
    b: &[u32],
    c: &mut [f32],
    ldc: usize,
    add: bool,
    scale: f32,
    rows: usize,
    cols: usize,
) {
    let mut s = [[_mm512_setzero_ps(); 3]; MR];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for p in 0..kcp {
        let q = bp.add(p * NR);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(q as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(q.add(16) as *const _));
        let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(q.add(32) as *const _));
        for (r, acc) in s.iter_mut().enumerate() {
            let w = *ap.add(r * kcp + p) as i32;
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(w));
            acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
            acc[2] = _mm512_dpbf16_ps(acc[2], x, b2);
        }
    }
    let sv = _mm512_set1_ps(scale);
    for (r, acc) in s.iter().enumerate() {
        if r >= rows {
            break;
        }
        for (v, t) in acc.iter().enumerate() {
            let j = v * 16;
            if j >= cols {
                break;
            }
            let mask: __mmask16 = if cols - j >= 16 {
                0xffff
            } else {
                (1u16 << (cols - j)) - 1
            };
            let cp = c.as_mut_ptr().add(r * ldc + j);
            let x = if add {
                _mm512_fmadd_ps(*t, sv, _mm512_maskz_loadu_ps(mask, cp))
            } else {
                _mm512_mul_ps(*t, sv)
            };
            _mm512_mask_storeu_ps(cp, mask, x);
        }
    }
}

/// `dst[j * ld + i] = src[i * ls + j]` for i, j < 16: a 16 x 16 block of words transposed in
/// registers (32-bit, then 64-bit interleaves within 128-bit lanes, then two lane shuffles).
///
/// # Safety
/// `src` readable at `i * ls + j` and `dst` writable at `j * ld + i` for i, j < 16.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose16(src: *const u32, ls: usize, dst: *mut u32, ld: usize) {
    let mut a = [_mm512_setzero_si512(); 16];
    for (i, r) in a.iter_mut().enumerate() {
        *r = _mm512_loadu_si512(src.add(i * ls) as *const _);
    }
    // t: rows 2k, 2k + 1 interleaved by words
    let mut t = [_mm512_setzero_si512(); 16];
    for k in 0..8 {
        t[2 * k] = _mm512_unpacklo_epi32(a[2 * k], a[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_epi32(a[2 * k], a[2 * k + 1]);
    }
    // u[4g + c], lane l: rows 4g..4g + 4 of column 4l + c
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let b = 4 * g;
        u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    // column 4l + c: lane l of u[c], u[4 + c], u[8 + c], u[12 + c]
    for c in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]);
        let v2 = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
        let v3 = _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]);
        let cols = [
            _mm512_shuffle_i32x4::<0x88>(v0, v2),
            _mm512_shuffle_i32x4::<0xDD>(v0, v2),
            _mm512_shuffle_i32x4::<0x88>(v1, v3),
            _mm512_shuffle_i32x4::<0xDD>(v1, v3),
        ];
        for (l, col) in cols.iter().enumerate() {
            _mm512_storeu_si512(dst.add((4 * l + c) * ld) as *mut _, *col);
        }
    }
}
