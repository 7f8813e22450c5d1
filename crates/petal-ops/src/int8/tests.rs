use super::*;
use crate::cpu::{cols, rows};

fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 4.0
        })
        .collect()
}

/// Every kernel here against the twin, on shapes that leave partial tiles, words and
/// k-blocks; b as given (k, n) and as the transpose of a row-major (n, k).
#[test]
fn int8_matmul_equals_the_quantized_integer_reference_on_every_kernel() {
    for kind in Kind::all_here() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 50, 3),
            (13, 97, 517),
            (9, 49, 1030),
            (20, 16, 64),
        ] {
            let a = data(m * k, 1);
            let mut b = data(k * n, 2);
            let len = b.len();
            b[5 % len] = 0.0;
            let want = mm_int8_reference(&a, &b, m, n, k);
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for (view, acc) in [(rows(&b, n), false), (cols(&bt, k), true)] {
                let base = data(m * n, 3);
                let mut c = if acc {
                    base.clone()
                } else {
                    vec![f32::NAN; m * n]
                };
                mm_int8_with(kind, m, n, k, &mut c, acc, rows(&a, k), view);
                for (i, (got, w)) in c.iter().zip(&want).enumerate() {
                    let w = if acc { w + base[i] } else { *w };
                    let tol = 1e-5 * (1.0 + w.abs()) * (k as f32).sqrt();
                    assert!(
                        (got - w).abs() <= tol,
                        "{kind:?} {m}x{n}x{k} acc {acc} at {i}: {got} vs {w}"
                    );
                }
            }
        }
    }
}

/// The codes stay 8-bit: against the exact f64 product, the error is that of 8-bit
/// rounding (about 1% of the operands' scale), and an all-zero row gives zeros.
#[test]
fn int8_matmul_is_close_to_the_exact_product_and_zero_rows_stay_zero() {
    let (m, n, k) = (4, 32, 256);
    let mut a = data(m * k, 4);
    a[..k].iter_mut().for_each(|x| *x = 0.0);
    let b = data(k * n, 5);
    let mut c = vec![0f32; m * n];
    mm_int8(m, n, k, &mut c, false, rows(&a, k), rows(&b, n));
    assert!(c[..n].iter().all(|&x| x == 0.0));
    for i in 1..m {
        for j in 0..n {
            let exact: f64 = (0..k)
                .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                .sum();
            // each term's relative error is below 2/127; the sum's error grows as sqrt(k)
            assert!((c[i * n + j] as f64 - exact).abs() < 4.0 * 4.0 * (k as f64).sqrt() / 127.0);
        }
    }
}

/// Codes, steps and offsets of a 4-bit weight (n rows of k), as a Q4_1-like format holds them.
fn nibble_weight(n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let r = data(n * k + 2 * n * k / BLOCK, seed);
    let codes = r[..n * k]
        .iter()
        .map(|v| ((v + 2.0) * 4.0).clamp(0.0, 15.0) as u8)
        .collect();
    let nb = n * k / BLOCK;
    let step = r[n * k..n * k + nb]
        .iter()
        .map(|v| 0.01 + v.abs() * 0.05)
        .collect();
    let lo = r[n * k + nb..].iter().map(|v| v * 0.3).collect();
    (codes, step, lo)
}

/// The nibble kernel against its twin on shapes with partial tiles and several k-panels, and
/// the twin against the f64 product of the decoded weight with x's dequantized codes.
#[test]
#[cfg(target_arch = "x86_64")]
fn nibble_products_equal_the_twin_and_use_w_exactly() {
    if Kind::nibbles_here().is_empty() {
        eprintln!("skipped: no AVX2");
        return;
    }
    // the VNNI kernel in both encodings where the CPU has both (EVEX: AVX-512 VNNI + VL)
    let mut kinds: Vec<(Kind, bool)> = Kind::nibbles_here()
        .into_iter()
        .map(|k| (k, false))
        .collect();
    let evex = is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
    if evex && kinds.contains(&(Kind::NibblesVnni, false)) && is_x86_feature_detected!("avxvnni") {
        kinds.push((Kind::NibblesVnni, true));
    }
    let shapes = [(1, 1, 32), (7, 50, 96), (13, 97, 4160), (6, 16, 256)];
    for ((kind, evex), &(m, n, k)) in kinds
        .iter()
        .flat_map(|&k| shapes.iter().map(move |s| (k, s)))
    {
        x86::EVEX.store(evex, std::sync::atomic::Ordering::Relaxed);
        let x = data(m * k, 11);
        let (codes, step, lo) = nibble_weight(n, k, 12);
        let want = mm_nibbles_reference(&x, &codes, &step, &lo, m, n, k);
        let pa = PackedA::new(kind, rows(&x, k), m, k);
        let nb = k / BLOCK;
        let pb = PackedB::from_codes(kind, n, k, Vec::new(), |j, c, s, l| {
            c.copy_from_slice(&codes[j * k..(j + 1) * k]);
            s.copy_from_slice(&step[j * nb..(j + 1) * nb]);
            l.copy_from_slice(&lo[j * nb..(j + 1) * nb]);
        });
        for acc in [false, true] {
            let base = data(m * n, 13);
            let mut y = if acc {
                base.clone()
            } else {
                vec![f32::NAN; m * n]
            };
            mm_int8_packed(
                crate::bf16::Out {
                    c: &mut y,
                    ldc: n,
                    c0: 0,
                },
                acc,
                &pa,
                &pb,
            );
            for (i, (got, w)) in y.iter().zip(&want).enumerate() {
                let w = if acc { w + base[i] } else { *w };
                let tol = 1e-5 * (1.0 + w.abs()) * (k as f32).sqrt();
                assert!(
                    (got - w).abs() <= tol,
                    "{m}x{n}x{k} acc {acc} at {i}: {got} vs {w}"
                );
            }
        }
        // the twin: x's codes times W's exact values (step q + lo)
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for (bi, xb) in x[i * k..(i + 1) * k].chunks(BLOCK).enumerate() {
                    let (inv, back) = scales(absmax(xb));
                    for (p, &v) in xb.iter().enumerate() {
                        let q = codes[j * k + bi * BLOCK + p] as f64;
                        let w = step[j * nb + bi] as f64 * q + lo[j * nb + bi] as f64;
                        s += code(v, inv) as f64 * back as f64 * w;
                    }
                }
                let got = want[i * n + j] as f64;
                assert!(
                    (got - s).abs() <= 1e-5 * (1.0 + s.abs()),
                    "twin {i},{j}: {got} vs {s}"
                );
            }
        }
    }
    x86::EVEX.store(false, std::sync::atomic::Ordering::Relaxed);
}

/// The input gradient's `b = W` with each column's blocks of 32 rows coded again in 4 bits:
/// every nibble kernel equals the twin on those codes (shapes with partial tiles and several
/// k-panels; a row of x at +1 against a column of codes at 15, the largest 16-bit sums the
/// AVX2 kernel holds), and each code decodes within half a step of W.
#[test]
#[cfg(target_arch = "x86_64")]
fn coded_products_equal_the_twin_on_w_coded_by_column_blocks() {
    if Kind::nibbles_here().is_empty() {
        eprintln!("skipped: no AVX2");
        return;
    }
    for kind in Kind::nibbles_here() {
        for &(m, n, k) in &[(1, 1, 32), (7, 50, 96), (13, 97, 4160), (6, 16, 256)] {
            let mut x = data(m * k, 21);
            x[..k].fill(1.0);
            let mut w = data(k * n, 22);
            let j = 5 % n;
            for p in 0..BLOCK {
                w[p * n + j] = if p == 0 { -1.0 } else { 1.5 };
            }
            let nb = k / BLOCK;
            let (mut codes, mut step, mut lo) =
                (vec![0u8; n * k], vec![0f32; n * nb], vec![0f32; n * nb]);
            for j in 0..n {
                for b in 0..nb {
                    let col: Vec<f32> =
                        (b * BLOCK..(b + 1) * BLOCK).map(|p| w[p * n + j]).collect();
                    let q = &mut codes[j * k + b * BLOCK..j * k + (b + 1) * BLOCK];
                    let (s, l) = nibbles::code4(&col, q);
                    for (&q, &v) in q.iter().zip(&col) {
                        let u = s * q as f32 + l;
                        assert!(q < 16 && (u - v).abs() <= s * 0.5001 + 1e-6, "{v} as {u}");
                    }
                    (step[j * nb + b], lo[j * nb + b]) = (s, l);
                }
            }
            let want = mm_nibbles_reference(&x, &codes, &step, &lo, m, n, k);
            let pa = PackedA::new(kind, rows(&x, k), m, k);
            let pb = PackedB::from_rows_coded(kind, k, n, Vec::new(), |i, out| {
                out.copy_from_slice(&w[i * n..(i + 1) * n])
            });
            for acc in [false, true] {
                let base = data(m * n, 23);
                let mut y = if acc {
                    base.clone()
                } else {
                    vec![f32::NAN; m * n]
                };
                let out = crate::bf16::Out {
                    c: &mut y,
                    ldc: n,
                    c0: 0,
                };
                mm_int8_packed(out, acc, &pa, &pb);
                for (i, (got, w)) in y.iter().zip(&want).enumerate() {
                    let w = if acc { w + base[i] } else { *w };
                    let tol = 1e-5 * (1.0 + w.abs()) * (k as f32).sqrt();
                    assert!(
                        (got - w).abs() <= tol,
                        "{kind:?} {m}x{n}x{k} acc {acc} at {i}: {got} vs {w}"
                    );
                }
            }
        }
    }
}
