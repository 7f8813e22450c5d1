//! Vectorised row math for the softmax-shaped kernels (head loss, attention, softmax, SwiGLU):
//! `exp` as a Cody-Waite reduction `x = n ln2 + f`, `|f| <= ln2 / 2`, a degree-7 Taylor
//! polynomial for `e^f` (truncation error below 1e-8 relative) and `2^n` (`vscalefps` on
//! AVX-512; on AVX2 + FMA two exponent-field multiplies `2^(n - n/2) 2^(n/2)`, which stay
//! normal numbers over the clamped range so that only the last product rounds, as `vscalefps`
//! does), picked at run time, else std's scalar `exp`. Within 2 ulp of the correctly rounded
//! exp; -inf gives 0, +inf gives inf, NaN stays NaN.

/// ln 2 in two parts (the high one exact in few bits, so `n ln2_hi` is exact).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// e^f's Taylor coefficients, highest degree first (Horner's order): 1/7!, ..., 1/2, 1, 1.
const TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// The instruction set the row math runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Simd {
    Avx512,
    Avx2,
    Scalar,
}

impl Simd {
    /// The fastest this CPU runs.
    pub(crate) fn best() -> Simd {
        static BEST: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Simd::all_here()[0])
    }

    /// Every kind this CPU runs, fastest first (the tests check each).
    pub(crate) fn all_here() -> Vec<Simd> {
        let mut v = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                v.push(Simd::Avx512);
            }
            if has!("avx2") && has!("fma") {
                v.push(Simd::Avx2);
            }
        }
        v.push(Simd::Scalar);
        v
    }
}

/// `row[i] = exp(row[i] - m)`; returns their sum.
pub fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
    exp_sub_sum_on(Simd::best(), row, m)
}

fn exp_sub_sum_on(simd: Simd, row: &mut [f32], m: f32) -> f32 {
    match simd {
        // SAFETY: `simd` is one this CPU runs (`Simd::all_here`).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { x86::exp_sub_sum(row, m) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2::exp_sub_sum(row, m) },
        _ => {
            let mut z = 0f32;
            for x in row.iter_mut() {
                *x = (*x - m).exp();
                z += *x;
            }
            z
        }
    }
}

/// `row[i] = exp(row[i] - m)` (the sum not needed).
pub fn exp_sub(row: &mut [f32], m: f32) {
    exp_sub_sum(row, m);
}

/// The largest value of `row` (-inf when empty).
pub fn max(row: &[f32]) -> f32 {
    max_on(Simd::best(), row)
}

fn max_on(simd: Simd, row: &[f32]) -> f32 {
    match simd {
        // SAFETY: `simd` is one this CPU runs (`Simd::all_here`).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { x86::max(row) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2::max(row) },
        _ => row.iter().copied().fold(f32::NEG_INFINITY, f32::max),
    }
}

/// `1 / (1 + exp(-v))` element by element into `out`.
pub fn sigmoid(v: &[f32], out: &mut [f32]) {
    sigmoid_on(Simd::best(), v, out)
}

fn sigmoid_on(simd: Simd, v: &[f32], out: &mut [f32]) {
    assert_eq!(v.len(), out.len());
    match simd {
        // SAFETY: `simd` is one this CPU runs (`Simd::all_here`); the lengths are equal.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { x86::sigmoid(v, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2::sigmoid(v, out) },
        _ => {
            for (o, v) in out.iter_mut().zip(v) {
                *o = 1.0 / (1.0 + (-v).exp());
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp(x: __m512) -> __m512 {
        // clamp so that n stays finite (NaN passes: min/max return the second operand on NaN)
        let x = _mm512_min_ps(_mm512_set1_ps(89.0), x);
        let x = _mm512_max_ps(_mm512_set1_ps(-104.0), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_HI), x);
        let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_LO), f);
        let mut p = _mm512_set1_ps(super::TAYLOR[0]);
        for c in &super::TAYLOR[1..] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
        }
        _mm512_scalef_ps(p, n)
    }

    fn tail_mask(left: usize) -> __mmask16 {
        if left >= 16 {
            0xffff
        } else {
            (1u16 << left) - 1
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
        let mv = _mm512_set1_ps(m);
        let mut acc = _mm512_setzero_ps();
        let p = row.as_mut_ptr();
        for i in (0..row.len()).step_by(16) {
            let k = tail_mask(row.len() - i);
            let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), mv));
            _mm512_mask_storeu_ps(p.add(i), k, e);
            acc = _mm512_mask_add_ps(acc, k, acc, e);
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max(row: &[f32]) -> f32 {
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..row.len()).step_by(16) {
            let k = tail_mask(row.len() - i);
            acc = _mm512_mask_max_ps(acc, k, acc, _mm512_maskz_loadu_ps(k, row.as_ptr().add(i)));
        }
        _mm512_reduce_max_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sigmoid(v: &[f32], out: &mut [f32]) {
        let one = _mm512_set1_ps(1.0);
        for i in (0..v.len()).step_by(16) {
            let k = tail_mask(v.len() - i);
            let x = _mm512_maskz_loadu_ps(k, v.as_ptr().add(i));
            let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let s = _mm512_div_ps(one, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), k, s);
        }
    }
}

/// The same on AVX2 + FMA: 8 lanes, the tail of a row through a padded copy.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(x: __m256) -> __m256 {
        // clamp so that n stays in [-150, 129] (NaN passes: min/max return the second operand)
        let x = _mm256_min_ps(_mm256_set1_ps(89.0), x);
        let x = _mm256_max_ps(_mm256_set1_ps(-104.0), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_HI), x);
        let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_LO), f);
        let mut p = _mm256_set1_ps(super::TAYLOR[0]);
        for c in &super::TAYLOR[1..] {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(*c));
        }
        // 2^n as 2^n1 2^n2, n1 = floor(n / 2), n2 = n - n1: both in [-75, 65], normal numbers,
        // so p 2^n1 is exact and the one rounding is the last product's
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32::<1>(ni);
        let n2 = _mm256_sub_epi32(ni, n1);
        let pow = |k: __m256i| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                k,
                _mm256_set1_epi32(127),
            )))
        };
        _mm256_mul_ps(_mm256_mul_ps(p, pow(n1)), pow(n2))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `f` over whole 8-lane chunks of `row`, then over the tail padded with `pad` (the lanes
    /// past the end are computed and dropped; `f` returns what to add to the running sum).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunks(
        row: &[f32],
        out: *mut f32,
        pad: f32,
        mut f: impl FnMut(__m256) -> (__m256, __m256),
    ) -> __m256 {
        let mut acc = _mm256_setzero_ps();
        let body = row.len() / 8 * 8;
        for i in (0..body).step_by(8) {
            let (y, a) = f(_mm256_loadu_ps(row.as_ptr().add(i)));
            _mm256_storeu_ps(out.add(i), y);
            acc = _mm256_add_ps(acc, a);
        }
        let left = row.len() - body;
        if left > 0 {
            let mut t = [pad; 8];
            t[..left].copy_from_slice(&row[body..]);
            let (y, a) = f(_mm256_loadu_ps(t.as_ptr()));
            let mut ys = [0f32; 8];
            _mm256_storeu_ps(ys.as_mut_ptr(), y);
            std::ptr::copy_nonoverlapping(ys.as_ptr(), out.add(body), left);
            let mut keep = [0f32; 8];
            keep[..left].fill(f32::from_bits(u32::MAX));
            acc = _mm256_add_ps(acc, _mm256_and_ps(a, _mm256_loadu_ps(keep.as_ptr())));
        }
        acc
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
        let mv = _mm256_set1_ps(m);
        let out = row.as_mut_ptr();
        let acc = chunks(row, out, 0.0, |x| {
            let e = exp(_mm256_sub_ps(x, mv));
            (e, e)
        });
        sum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn max(row: &[f32]) -> f32 {
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let body = row.len() / 8 * 8;
        for i in (0..body).step_by(8) {
            acc = _mm256_max_ps(acc, _mm256_loadu_ps(row.as_ptr().add(i)));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes
            .into_iter()
            .chain(row[body..].iter().copied())
            .fold(f32::NEG_INFINITY, f32::max)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sigmoid(v: &[f32], out: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        chunks(v, out.as_mut_ptr(), 0.0, |x| {
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), x));
            (_mm256_div_ps(one, _mm256_add_ps(one, e)), one)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_exp_is_within_two_ulp_of_the_f64_exp_over_the_f32_range() {
        for simd in Simd::all_here() {
            exp_within_two_ulp(simd);
        }
    }

    fn exp_within_two_ulp(simd: Simd) {
        let mut xs: Vec<f32> = (0..20001).map(|i| -100.0 + i as f32 * 0.0094).collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 88.7, -87.3, 0.3465736, -0.3465736]);
        let mut got = xs.clone();
        let sum = exp_sub_sum_on(simd, &mut got, 0.0);
        let mut want_sum = 0f64;
        for (x, g) in xs.iter().zip(&got) {
            let w = (*x as f64).exp();
            want_sum += w;
            let ulp = (w as f32).abs() * f32::EPSILON;
            let tol = if w < f32::MIN_POSITIVE as f64 {
                1e-44 // denormal outputs: absolute
            } else {
                2.0 * ulp as f64
            };
            assert!(
                (*g as f64 - w).abs() <= tol,
                "{simd:?}: exp({x}) = {g}, want {w}"
            );
        }
        assert!(sum.is_infinite() && want_sum > f32::MAX as f64); // as f32 summation
        let mut mid: Vec<f32> = (0..1000).map(|i| -20.0 + i as f32 * 0.04).collect();
        let want: f64 = mid.iter().map(|&x| (x as f64 - 3.0).exp()).sum();
        let sum = exp_sub_sum_on(simd, &mut mid, 3.0);
        assert!(((sum as f64) - want).abs() < 1e-6 * want, "{sum} vs {want}");
    }

    #[test]
    fn vector_exp_keeps_the_special_values_and_the_max_sees_every_lane() {
        for simd in Simd::all_here() {
            special_values_and_every_lane(simd);
        }
    }

    fn special_values_and_every_lane(simd: Simd) {
        let mut v = vec![f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 100.0, -200.0];
        exp_sub_sum_on(simd, &mut v, 0.0);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[1], f32::INFINITY);
        assert!(v[2].is_nan());
        assert_eq!(v[3], f32::INFINITY);
        assert_eq!(v[4], 0.0);
        for n in [1, 7, 8, 9, 15, 16, 17, 40] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 7919) % 23) as f32 - 11.0).collect();
            let want = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_on(simd, &row), want, "{simd:?}, length {n}");
            // every length's sum and sigmoid, lane by lane
            let mut e = row.clone();
            let z = exp_sub_sum_on(simd, &mut e, want);
            let zw: f64 = row.iter().map(|&x| (x as f64 - want as f64).exp()).sum();
            assert!(
                (z as f64 - zw).abs() < 1e-6 * zw,
                "{simd:?}, length {n}: {z} vs {zw}"
            );
            let mut s = vec![0f32; n];
            sigmoid_on(simd, &row, &mut s);
            for (x, s) in row.iter().zip(&s) {
                let w = 1.0 / (1.0 + (-*x as f64).exp());
                assert!(
                    (*s as f64 - w).abs() < 1e-6 * w,
                    "{simd:?}: sigmoid({x}) = {s}"
                );
            }
        }
        assert_eq!(max_on(simd, &[]), f32::NEG_INFINITY);
        let mut s = vec![0f32; 3];
        sigmoid_on(simd, &[0.0, 20.0, -20.0], &mut s);
        assert!((s[0] - 0.5).abs() < 1e-7 && (s[1] - 1.0).abs() < 1e-7 && s[2] < 3e-9);
    }
}
