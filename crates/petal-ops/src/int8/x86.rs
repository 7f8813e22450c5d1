//! The AVX-512 VNNI and AVX2 microkernels of `int8` (see there).

use super::Tile;
use std::arch::x86_64::*;

/// The 16-lane masks of a tile's columns.
fn masks(cols: usize) -> [__mmask16; 3] {
    let m = |j: usize| match cols.saturating_sub(j) {
        0 => 0,
        l if l >= 16 => 0xffff,
        l => (1u16 << l) - 1,
    };
    [m(0), m(16), m(32)]
}

/// Blocks of `bw` words: each block's code products summed in i32 (`vpdpbusd`), less the
/// excess, then scaled into f32 sums kept in registers; stored once at the end.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn micro_vnni(t: &Tile, c: &mut [f32], ldc: usize, add: bool) {
    let mut f = [[_mm512_setzero_ps(); 3]; 4];
    let (ap, bp) = (t.a.as_ptr(), t.b.as_ptr());
    let mask = masks(t.cols);
    for i in 0..t.blocks() {
        let mut s = [[_mm512_setzero_si512(); 3]; 4];
        for p in i * t.bw..((i + 1) * t.bw).min(t.kcq) {
            let q = bp.add(p * 48) as *const __m512i;
            let b0 = _mm512_loadu_si512(q);
            let b1 = _mm512_loadu_si512(q.add(1));
            let b2 = _mm512_loadu_si512(q.add(2));
            for (r, acc) in s.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(*ap.add(r * t.lda + p) as i32);
                acc[0] = _mm512_dpbusd_epi32(acc[0], x, b0);
                acc[1] = _mm512_dpbusd_epi32(acc[1], x, b1);
                acc[2] = _mm512_dpbusd_epi32(acc[2], x, b2);
            }
        }
        let at = i * t.n;
        let mut e = [_mm512_setzero_si512(); 3];
        let mut sb = [_mm512_setzero_ps(); 3];
        for v in 0..3 {
            e[v] = _mm512_maskz_loadu_epi32(mask[v], t.excess.as_ptr().add(at + 16 * v));
            sb[v] = _mm512_maskz_loadu_ps(mask[v], t.sb.as_ptr().add(at + 16 * v));
        }
        for (r, (acc, f)) in s.iter().zip(f.iter_mut()).enumerate() {
            let sa = _mm512_set1_ps(t.sa[r * t.sas + i]);
            for v in 0..3 {
                let x = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[v], e[v]));
                f[v] = _mm512_fmadd_ps(_mm512_mul_ps(x, sb[v]), sa, f[v]);
            }
        }
    }
    for (r, f) in f.iter().enumerate().take(t.rows) {
        let cr = c.as_mut_ptr().add(r * ldc);
        for v in 0..3 {
            if mask[v] == 0 {
                break;
            }
            let cp = cr.add(16 * v);
            let y = if add {
                _mm512_add_ps(f[v], _mm512_maskz_loadu_ps(mask[v], cp))
            } else {
                f[v]
            };
            _mm512_mask_storeu_ps(cp, mask[v], y);
        }
    }
}

/// Blocks of `bw` words: each block's i32 sums (`vpmaddwd`) scaled and added into c.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn micro_avx2(t: &Tile, c: &mut [f32], ldc: usize, add: bool) {
    let (ap, bp) = (t.a.as_ptr(), t.b.as_ptr());
    for i in 0..t.blocks() {
        let mut s = [[_mm256_setzero_si256(); 2]; 6];
        for p in i * t.bw..((i + 1) * t.bw).min(t.kcq) {
            let q = bp.add(p * 16) as *const __m256i;
            let b0 = _mm256_loadu_si256(q);
            let b1 = _mm256_loadu_si256(q.add(1));
            for (r, acc) in s.iter_mut().enumerate() {
                let x = _mm256_set1_epi32(*ap.add(r * t.lda + p) as i32);
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(x, b0));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(x, b1));
            }
        }
        let add = add || i > 0;
        let sb = t.sb.as_ptr().add(i * t.n);
        for (r, acc) in s.iter().enumerate().take(t.rows) {
            let sa = _mm256_set1_ps(t.sa[r * t.sas + i]);
            let cr = c.as_mut_ptr().add(r * ldc);
            for (v, s) in acc.iter().enumerate() {
                let j = v * 8;
                if j >= t.cols {
                    break;
                }
                let x = _mm256_cvtepi32_ps(*s);
                if t.cols - j >= 8 {
                    // (x sb) sa [+ c], as the VNNI kernel rounds
                    let x = _mm256_mul_ps(x, _mm256_loadu_ps(sb.add(j)));
                    let cp = cr.add(j);
                    let y = if add {
                        _mm256_fmadd_ps(x, sa, _mm256_loadu_ps(cp))
                    } else {
                        _mm256_mul_ps(x, sa)
                    };
                    _mm256_storeu_ps(cp, y);
                    continue;
                }
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), x);
                let sa = t.sa[r * t.sas + i];
                for (l, x) in lanes.iter().enumerate().take(t.cols - j) {
                    let cp = cr.add(j + l);
                    let v = x * *sb.add(j + l);
                    *cp = if add { v.mul_add(sa, *cp) } else { v * sa };
                }
            }
        }
    }
}
