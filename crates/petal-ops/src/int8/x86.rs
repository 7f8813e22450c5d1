//! The AVX-512 VNNI, AVX-VNNI, AVX2 and nibble microkernels of `int8` (see there).

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

/// Block `i`'s words into the i32 (or 16-bit) sums `s` of a tile of `s.len()` rows by 16
/// columns: per word, `$step(acc, x, b)` with x a row's word broadcast and b 8 columns' words.
macro_rules! block_words {
    ($t:ident, $ap:ident, $bp:ident, $i:ident, $s:ident, $step:path) => {
        for p in $i * $t.bw..(($i + 1) * $t.bw).min($t.kcq) {
            let q = $bp.add(p * 16) as *const __m256i;
            let b0 = _mm256_loadu_si256(q);
            let b1 = _mm256_loadu_si256(q.add(1));
            for (r, acc) in $s.iter_mut().enumerate() {
                let x = _mm256_set1_epi32(*$ap.add(r * $t.lda + p) as i32);
                acc[0] = $step(acc[0], x, b0);
                acc[1] = $step(acc[1], x, b1);
            }
        }
    };
}

/// The 6 x 16 tiles of the 256-bit kernels: for each block of `bw` words, `$step(acc, x, b)`
/// adds a word's products into the block's i32 sums (x: a row's word broadcast, b: 8 columns'
/// words), which [`block_into_c`] then scales into c. A macro, not a function taking the step:
/// each kernel's `target_feature` set must cover its step for the step to be inlined.
macro_rules! tiles_6x16 {
    ($t:ident, $c:ident, $ldc:ident, $add:ident, $excess:expr, $step:path) => {{
        let (ap, bp) = ($t.a.as_ptr(), $t.b.as_ptr());
        for i in 0..$t.blocks() {
            let mut s = [[_mm256_setzero_si256(); 2]; 6];
            block_words!($t, ap, bp, i, s, $step);
            block_into_c($t, i, &s, $excess, $c, $ldc, $add || i > 0);
        }
    }};
}

/// `acc + vpmaddwd(x, b)`: two products of 16-bit codes a lane.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn madd_add(acc: __m256i, x: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(x, b))
}

/// Blocks of `bw` words: each block's i32 sums (`vpmaddwd`) scaled and added into c.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn micro_avx2(t: &Tile, c: &mut [f32], ldc: usize, add: bool) {
    tiles_6x16!(t, c, ldc, add, false, madd_add)
}

/// The AVX2 kernel's tiles on the VNNI kernel's words: `vpdpbusd` on 256 bits (AVX-VNNI), four
/// byte products a lane and the sum in one instruction where AVX2 takes two for two; each
/// block's i32 sums less the excess, scaled and added into c.
#[target_feature(enable = "avx2,fma,avxvnni")]
pub(super) unsafe fn micro_avx_vnni(t: &Tile, c: &mut [f32], ldc: usize, add: bool) {
    tiles_6x16!(t, c, ldc, add, true, _mm256_dpbusd_avx_epi32)
}

/// Block `i`'s i32 sums of a 6 x 16 tile (less the block's excess where `excess`) scaled by a's
/// and b's scales, `(x sb) sa`, as the VNNI kernel rounds, and written or added into c.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block_into_c(
    t: &Tile,
    i: usize,
    s: &[[__m256i; 2]; 6],
    excess: bool,
    c: &mut [f32],
    ldc: usize,
    add: bool,
) {
    let at = i * t.n;
    let sb = t.sb.as_ptr().add(at);
    for (r, acc) in s.iter().enumerate().take(t.rows) {
        let sa = t.sa[r * t.sas + i];
        let cr = c.as_mut_ptr().add(r * ldc);
        for (v, s) in acc.iter().enumerate() {
            let j = v * 8;
            if j >= t.cols {
                break;
            }
            let live = (t.cols - j).min(8);
            let mut s = *s;
            if excess && live == 8 {
                let e = _mm256_loadu_si256(t.excess.as_ptr().add(at + j) as *const __m256i);
                s = _mm256_sub_epi32(s, e);
            }
            let x = _mm256_cvtepi32_ps(s);
            if live == 8 {
                let x = _mm256_mul_ps(x, _mm256_loadu_ps(sb.add(j)));
                let cp = cr.add(j);
                let y = if add {
                    _mm256_fmadd_ps(x, _mm256_set1_ps(sa), _mm256_loadu_ps(cp))
                } else {
                    _mm256_mul_ps(x, _mm256_set1_ps(sa))
                };
                _mm256_storeu_ps(cp, y);
                continue;
            }
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, s);
            for (l, &x) in lanes.iter().enumerate().take(live) {
                let e = if excess { t.excess[at + j + l] } else { 0 };
                let cp = cr.add(j + l);
                let v = (x - e) as f32 * *sb.add(j + l);
                *cp = if add { v.mul_add(sa, *cp) } else { v * sa };
            }
        }
    }
}

/// The nibble kernels' 6 x 16 tiles (`int8::nibbles`), in passes of `$hr` rows over the same
/// panel of b (by the second pass in L1): for each block of 8 words, `$step(acc, b, x)` adds a
/// word's products of b's 4-bit codes (unsigned bytes) by a row's 8-bit ones (signed) into the
/// block's sums, `$widen` makes those i32, and the block is scaled with its offset term into
/// the tile's f32 sums. The AVX2 kernel takes all 6 rows at once (its 12 block sums, two
/// columns of b and a row's word fill the 16 registers; the f32 sums live on the stack): on
/// an AVX2-only AMD EPYC its products ran 1.04-1.13x as fast as in two passes of 3 rows, whose
/// f32 sums stay in registers. The VNNI kernels keep 3 (not measured there).
macro_rules! nibble_tiles {
    ($t:ident, $c:ident, $ldc:ident, $add:ident, $step:path, $widen:path, $hr:literal) => {{
        for h in (0..6).step_by($hr) {
            if h < $t.rows {
                nibble_tiles!(@pass $t, h, $c, $ldc, $add, $step, $widen, $hr);
            }
        }
    }};
    (@pass $t:ident, $h:ident, $c:ident, $ldc:ident, $add:ident, $step:path, $widen:path, $hr:literal) => {{
        let (ap, bp) = ($t.a.as_ptr().add($h * $t.lda), $t.b.as_ptr());
        let (rows, sa0) = (($t.rows - $h).min($hr), $h * $t.sas);
        let c = &mut $c[$h * $ldc..];
        debug_assert!($t.bw == 8);
        let full = $t.cols == 16;
        // the tile's f32 sums, from the first block to the last
        let mut f = [[_mm256_setzero_ps(); 2]; $hr];
        if $add && full {
            for (r, f) in f.iter_mut().enumerate().take(rows) {
                let cp = c.as_ptr().add(r * $ldc);
                *f = [_mm256_loadu_ps(cp), _mm256_loadu_ps(cp.add(8))];
            }
        }
        for i in 0..$t.blocks() {
            let mut s = [[_mm256_setzero_si256(); 2]; $hr];
            block_words!($t, ap, bp, i, s, $step);
            // the block's 16 steps then 16 offsets (a part-filled panel's padded with zeros)
            let sl = $t.sb.as_ptr().add(i * $t.sbs);
            let (st, lv) = (
                [_mm256_loadu_ps(sl), _mm256_loadu_ps(sl.add(8))],
                [_mm256_loadu_ps(sl.add(16)), _mm256_loadu_ps(sl.add(24))],
            );
            for (r, (acc, f)) in s.iter().zip(f.iter_mut()).enumerate().take(rows) {
                // SAFETY: `micro` checked sa and sums hold every row's blocks
                let at = sa0 + r * $t.sas + i;
                let sa = _mm256_set1_ps(*$t.sa.get_unchecked(at));
                let sums = _mm256_set1_ps(*$t.sums.get_unchecked(at));
                for v in 0..2 {
                    let x = _mm256_cvtepi32_ps($widen(acc[v]));
                    f[v] = _mm256_fmadd_ps(x, _mm256_mul_ps(st[v], sa), f[v]);
                    f[v] = _mm256_fmadd_ps(lv[v], sums, f[v]);
                }
            }
        }
        for (r, f) in f.iter().enumerate().take(rows) {
            let cr = c.as_mut_ptr().add(r * $ldc);
            if full {
                _mm256_storeu_ps(cr, f[0]);
                _mm256_storeu_ps(cr.add(8), f[1]);
                continue;
            }
            let mut lanes = [0f32; 16];
            _mm256_storeu_ps(lanes.as_mut_ptr(), f[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), f[1]);
            for (j, &v) in lanes.iter().enumerate().take($t.cols) {
                let cp = cr.add(j);
                *cp = if $add { *cp + v } else { v };
            }
        }
    }};
}

/// `acc + vpmaddubsw(b, x)` in 16-bit lanes: at most 8 x 2 x 15 x 127 = 30480 over a block.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn maddubs_add(acc: __m256i, x: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi16(acc, _mm256_maddubs_epi16(b, x))
}

/// 16-bit lane pairs summed into i32 (`vpmaddwd` by ones).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn widen_pairs(s: __m256i) -> __m256i {
    _mm256_madd_epi16(s, _mm256_set1_epi16(1))
}

/// Sums already i32.
#[inline(always)]
fn same(s: __m256i) -> __m256i {
    s
}

/// The AVX2 nibble kernel: a block's `vpmaddubsw` sums kept in 16 bits, widened once.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn micro_nibbles(t: &Tile, c: &mut [f32], ldc: usize, add: bool) {
    nibble_tiles!(t, c, ldc, add, maddubs_add, widen_pairs, 6)
}

/// `vpdpbusd(acc, b, x)` on 256 bits, VEX (AVX-VNNI).
#[target_feature(enable = "avx2,avxvnni")]
#[inline]
unsafe fn dpbusd_vex(acc: __m256i, x: __m256i, b: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(acc, b, x)
}

/// `vpdpbusd(acc, b, x)` on 256 bits, EVEX (AVX-512 VNNI + VL).
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
#[inline]
unsafe fn dpbusd_evex(acc: __m256i, x: __m256i, b: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, b, x)
}

/// The nibble kernel on `vpdpbusd`: four products a lane summed into i32 in one instruction.
pub(super) unsafe fn micro_nibbles_vnni(t: &Tile, c: &mut [f32], ldc: usize, add: bool) {
    #[cfg(test)]
    let vex = !EVEX.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    let vex = true;
    if vex && std::arch::is_x86_feature_detected!("avxvnni") {
        nibbles_vex(t, c, ldc, add)
    } else {
        nibbles_evex(t, c, ldc, add)
    }
}

/// Under test: the EVEX form even where the CPU has the VEX one (both give the same sums).
#[cfg(test)]
pub(super) static EVEX: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn nibbles_vex(t: &Tile, c: &mut [f32], ldc: usize, add: bool) {
    nibble_tiles!(t, c, ldc, add, dpbusd_vex, same, 3)
}

#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
unsafe fn nibbles_evex(t: &Tile, c: &mut [f32], ldc: usize, add: bool) {
    nibble_tiles!(t, c, ldc, add, dpbusd_evex, same, 3)
}
