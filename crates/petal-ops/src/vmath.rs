//! Vectorised row math for the softmax-shaped kernels (head loss, attention, softmax, SwiGLU):
//! `exp` as a Cody-Waite reduction `x = n ln2 + f`, `|f| <= ln2 / 2`, a degree-7 Taylor
//! polynomial for `e^f` (truncation error below 1e-8 relative) and `2^n` by `vscalefps`, on
//! AVX-512 where the CPU has it (runtime check), else std's scalar `exp`. Within 2 ulp of the
//! correctly rounded exp; -inf gives 0, +inf gives inf, NaN stays NaN.

/// `row[i] = exp(row[i] - m)`; returns their sum.
pub fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX512F (checked).
        return unsafe { x86::exp_sub_sum(row, m) };
    }
    let mut z = 0f32;
    for x in row.iter_mut() {
        *x = (*x - m).exp();
        z += *x;
    }
    z
}

/// `row[i] = exp(row[i] - m)` (the sum not needed).
pub fn exp_sub(row: &mut [f32], m: f32) {
    exp_sub_sum(row, m);
}

/// The largest value of `row` (-inf when empty).
pub fn max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX512F (checked).
        return unsafe { x86::max(row) };
    }
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `1 / (1 + exp(-v))` element by element into `out`.
pub fn sigmoid(v: &[f32], out: &mut [f32]) {
    assert_eq!(v.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX512F (checked); the lengths are equal.
        return unsafe { x86::sigmoid(v, out) };
    }
    for (o, v) in out.iter_mut().zip(v) {
        *o = 1.0 / (1.0 + (-v).exp());
    }
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
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
        let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x); // ln2, high part
        let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), f); // ln2 - high part
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_exp_is_within_two_ulp_of_the_f64_exp_over_the_f32_range() {
        let mut xs: Vec<f32> = (0..20001).map(|i| -100.0 + i as f32 * 0.0094).collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 88.7, -87.3, 0.3465736, -0.3465736]);
        let mut got = xs.clone();
        let sum = exp_sub_sum(&mut got, 0.0);
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
            assert!((*g as f64 - w).abs() <= tol, "exp({x}) = {g}, want {w}");
        }
        assert!(sum.is_infinite() && want_sum > f32::MAX as f64); // as f32 summation
        let mut mid: Vec<f32> = (0..1000).map(|i| -20.0 + i as f32 * 0.04).collect();
        let want: f64 = mid.iter().map(|&x| (x as f64 - 3.0).exp()).sum();
        let sum = exp_sub_sum(&mut mid, 3.0);
        assert!(((sum as f64) - want).abs() < 1e-6 * want, "{sum} vs {want}");
    }

    #[test]
    fn vector_exp_keeps_the_special_values_and_the_max_sees_every_lane() {
        let mut v = vec![f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 100.0, -200.0];
        exp_sub(&mut v, 0.0);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[1], f32::INFINITY);
        assert!(v[2].is_nan());
        assert_eq!(v[3], f32::INFINITY);
        assert_eq!(v[4], 0.0);
        for n in [1, 15, 16, 17, 40] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 7919) % 23) as f32 - 30.0).collect();
            let want = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&row), want, "length {n}");
        }
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let mut s = vec![0f32; 3];
        sigmoid(&[0.0, 20.0, -20.0], &mut s);
        assert!((s[0] - 0.5).abs() < 1e-7 && (s[1] - 1.0).abs() < 1e-7 && s[2] < 3e-9);
    }
}
