//! Decoders of GGML's legacy block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) written for the
//! vectoriser: candle's `to_float` for them runs about a third of the speed, which decoding
//! (a whole weight per token) feels. The same plain loops are compiled three times, for
//! AVX-512, AVX2+FMA and baseline x86-64, and picked at run time by what the CPU has. Held to
//! gguf-py's decoding by the golden test (`tools/golden/make_quant_blocks.py`).

use candle_core::quantized::GgmlDType;
use half::f16;

/// Decode whole blocks of a legacy type; `false` for the types this file does not decode.
pub(super) fn legacy(t: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    if !matches!(
        t,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_0
    ) {
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
        _ => unreachable!("checked by `legacy`"),
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
