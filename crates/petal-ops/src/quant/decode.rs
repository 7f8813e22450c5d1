//! Decoders of the block types GGUF files mostly hold (the legacy Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
//! and the k-quants Q4_K, Q6_K of the common Q4_K_M files) written for the vectoriser: candle's
//! `to_float` for them runs about a third of the speed, which decoding (a whole weight per
//! token) and training (every weight decoded two or three times a step) feel. The same plain loops are compiled three times, for
//! AVX-512, AVX2+FMA and baseline x86-64, and picked at run time by what the CPU has. Held to
//! gguf-py's decoding by the golden test (`tools/golden/make_quant_blocks.py`).

use candle_core::quantized::GgmlDType;
use half::f16;

/// Decode whole blocks; `false` for the types this file does not decode (candle's then).
pub(super) fn fast(t: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    use GgmlDType::*;
    if !matches!(t, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q6K) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU has the features the function is compiled for (checked above)
            unsafe { avx512(t, bytes, out) };
            return true;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above
            unsafe { avx2(t, bytes, out) };
            return true;
        }
    }
    plain(t, bytes, out);
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn avx512(t: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    plain(t, bytes, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(t: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    plain(t, bytes, out)
}

#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[inline(always)]
fn plain(t: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    match t {
        GgmlDType::Q4_0 => q4_0(bytes, out),
        GgmlDType::Q4_1 => q4_1(bytes, out),
        GgmlDType::Q5_0 => q5_0(bytes, out),
        GgmlDType::Q5_1 => q5_1(bytes, out),
        GgmlDType::Q8_0 => q8_0(bytes, out),
        GgmlDType::Q4K => q4_k(bytes, out),
        GgmlDType::Q6K => q6_k(bytes, out),
        _ => unreachable!("checked by `fast`"),
    }
}

/// d, 16 bytes of nibbles: value (q - 8) d; low nibbles are the first 16 values.
#[inline(always)]
fn q4_0(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
        let d = half(b, 0);
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let q = b[2 + j];
            lo[j] = ((q & 15) as i32 - 8) as f32 * d;
            hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// d, m, nibbles: value q d + m.
#[inline(always)]
fn q4_1(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let (d, m) = (half(b, 0), half(b, 2));
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let q = b[4 + j];
            lo[j] = (q & 15) as f32 * d + m;
            hi[j] = (q >> 4) as f32 * d + m;
        }
    }
}

/// d, 32 high bits, nibbles: value ((q | h << 4) - 16) d.
#[inline(always)]
fn q5_0(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
        let d = half(b, 0);
        let h = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let q = b[6 + j];
            let h0 = ((h >> j) & 1) << 4;
            let h1 = ((h >> (j + 16)) & 1) << 4;
            lo[j] = (((q & 15) as u32 | h0) as i32 - 16) as f32 * d;
            hi[j] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// d, m, 32 high bits, nibbles: value (q | h << 4) d + m.
#[inline(always)]
fn q5_1(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes.chunks_exact(24).zip(out.chunks_exact_mut(32)) {
        let (d, m) = (half(b, 0), half(b, 2));
        let h = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let q = b[8 + j];
            let h0 = ((h >> j) & 1) << 4;
            let h1 = ((h >> (j + 16)) & 1) << 4;
            lo[j] = ((q & 15) as u32 | h0) as f32 * d + m;
            hi[j] = ((q >> 4) as u32 | h1) as f32 * d + m;
        }
    }
}

/// d, 32 signed bytes: value q d.
#[inline(always)]
fn q8_0(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        let d = half(b, 0);
        for j in 0..32 {
            o[j] = b[2 + j] as i8 as f32 * d;
        }
    }
}

/// d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of nibbles:
/// sub-block j's value is d sc_j q - dmin m_j (ggml's `dequantize_row_q4_K`).
#[inline(always)]
fn q4_k(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
        let (d, dmin) = (half(b, 0), half(b, 2));
        let sc = &b[4..16];
        let qs = &b[16..144];
        for j in 0..4 {
            let (s1, m1) = scale_min_k4(2 * j, sc);
            let (s2, m2) = scale_min_k4(2 * j + 1, sc);
            let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
            let q = &qs[32 * j..32 * j + 32];
            let (lo, hi) = o[64 * j..64 * j + 64].split_at_mut(32);
            for l in 0..32 {
                lo[l] = d1 * (q[l] & 15) as f32 - m1;
                hi[l] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` packed in `q` (12 bytes), as ggml packs them.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed scales, d: value
/// d sc (q - 32) (ggml's `dequantize_row_q6_K`).
#[inline(always)]
fn q6_k(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
        let d = half(b, 208);
        for n in 0..2 {
            let ql = &b[64 * n..64 * n + 64];
            let qh = &b[128 + 32 * n..128 + 32 * n + 32];
            let sc = &b[192 + 8 * n..192 + 8 * n + 8];
            let y = &mut o[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 15) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
    }
}

/// Whether [`nibbles`] reads type `t`: its values are 4-bit codes on an affine grid per block of
/// 32 (Q4_0, Q4_1, Q4_K's sub-blocks).
pub(super) fn has_nibbles(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K)
}

/// Whole blocks of `t` as their 4-bit codes (one a byte, in value order) and, per 32 values,
/// the grid's step and offset: value `step q + lo`, as the decoders above compute it.
pub(super) fn nibbles(
    t: GgmlDType,
    bytes: &[u8],
    codes: &mut [u8],
    step: &mut [f32],
    lo: &mut [f32],
) {
    // the 16 bytes of a block of 32: low nibbles first, then high ones
    fn split(q: &[u8], c: &mut [u8]) {
        for j in 0..16 {
            c[j] = q[j] & 15;
            c[j + 16] = q[j] >> 4;
        }
    }
    let grids = step.iter_mut().zip(lo.iter_mut());
    match t {
        GgmlDType::Q4_0 => {
            for ((b, c), (s, l)) in bytes
                .chunks_exact(18)
                .zip(codes.chunks_exact_mut(32))
                .zip(grids)
            {
                let d = half(b, 0);
                split(&b[2..18], c);
                (*s, *l) = (d, -8.0 * d);
            }
        }
        GgmlDType::Q4_1 => {
            for ((b, c), (s, l)) in bytes
                .chunks_exact(20)
                .zip(codes.chunks_exact_mut(32))
                .zip(grids)
            {
                split(&b[4..20], c);
                (*s, *l) = (half(b, 0), half(b, 2));
            }
        }
        GgmlDType::Q4K => {
            let blocks = bytes.chunks_exact(144).zip(codes.chunks_exact_mut(256));
            let grids = step.chunks_exact_mut(8).zip(lo.chunks_exact_mut(8));
            for ((b, c), (s, l)) in blocks.zip(grids) {
                let (d, dmin) = (half(b, 0), half(b, 2));
                for j in 0..8 {
                    let (sc, m) = scale_min_k4(j, &b[4..16]);
                    (s[j], l[j]) = (d * sc as f32, -(dmin * m as f32));
                    let q = &b[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
                    let shift = 4 * (j % 2);
                    for (c, q) in c[32 * j..32 * j + 32].iter_mut().zip(q) {
                        *c = (q >> shift) & 15;
                    }
                }
            }
        }
        other => unreachable!("{other:?} has no 4-bit codes (`has_nibbles`)"),
    }
}
