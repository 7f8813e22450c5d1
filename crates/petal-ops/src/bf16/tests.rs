use super::*;
use crate::cpu::{cols, rows};

fn data(len: usize, seed: u64) -> Vec<f32> {
    crate::testing::rand(&[len], seed).to_vec1().unwrap()
}

/// A random bf16 `b (k, n)`, row-major, packed.
fn random_packed(k: usize, n: usize) -> PackedB {
    let b: Vec<u16> = data(k * n, 2).into_iter().map(to_bf16).collect();
    PackedB::new(
        k,
        n,
        BView {
            x: &b,
            rs: n,
            cs: 1,
        },
        true,
    )
}

fn check(m: usize, n: usize, k: usize, acc: bool, alpha: f32, transposed_b: bool, par: bool) {
    let a = data(m * k, 1);
    let b: Vec<u16> = data(k * n, 2).into_iter().map(to_bf16).collect();
    let c0 = data(m * n, 3);
    let want: Vec<f32> = mm_bf16_reference(&a, &b, m, n, k)
        .iter()
        .zip(&c0)
        .map(|(p, c)| if acc { c + p * alpha } else { p * alpha })
        .collect();
    // the same b (k, n), stored as given or as its transpose (n, k)
    let bt: Vec<u16> = (0..n * k).map(|t| b[(t % k) * n + t / k]).collect();
    let bv = if transposed_b {
        BView {
            x: &bt,
            rs: 1,
            cs: k,
        }
    } else {
        BView {
            x: &b,
            rs: n,
            cs: 1,
        }
    };
    let packed = PackedB::new(k, n, bv, par);
    for kernel in kernels_here() {
        let mut c = c0.clone();
        mm_bf16_packed_on(
            kernel,
            m,
            &mut c,
            acc,
            alpha,
            rows(&a, k).into(),
            &packed,
            par,
        );
        for (i, (g, w)) in c.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()) * (k as f32).sqrt(),
                "{kernel:?} ({m},{n},{k}) at {i}: {g} vs {w}"
            );
        }
    }
}

/// The kernels this CPU runs (AVX512-BF16's stands for the portable loop where it is missing).
fn kernels_here() -> Vec<Bf16Kernel> {
    let mut v = vec![Bf16Kernel::Avx512];
    if crate::amx::available() {
        v.push(Bf16Kernel::Amx);
    } else {
        eprintln!(
            "no AMX on this CPU (or the OS refuses its tiles): its kernel is not checked here"
        );
    }
    v
}

#[test]
fn bf16_matmul_equals_the_rounded_f64_reference_on_ragged_shapes() {
    // odd k, k past one block, m and n not multiples of the tile, both layouts of b
    check(13, 50, 7, false, 1.0, false, false);
    check(9, 97, 301, true, 1.0, true, true);
    check(17, 48, 256, false, 0.5, true, true);
    check(1, 3, 1, true, 2.0, false, false);
    // several 16-row AMX tiles, three k-blocks (the last padded to whole tile rows)
    check(40, 100, 601, true, 0.75, true, true);
    check(33, 144, 512, false, 1.0, false, true);
}

#[test]
fn bf16_matmul_reads_a_transposed_input_view() {
    let (m, n, k) = (5, 19, 11);
    let a = data(m * k, 4); // (m, k)
    let at: Vec<f32> = (0..k * m).map(|t| a[(t % m) * k + t / m]).collect(); // (k, m)
    let b: Vec<u16> = data(k * n, 5).into_iter().map(to_bf16).collect();
    let bv = BView {
        x: &b,
        rs: n,
        cs: 1,
    };
    let packed = PackedB::new(k, n, bv, false);
    let want = mm_bf16_reference(&a, &b, m, n, k);
    for kernel in kernels_here() {
        let mut c = vec![0f32; m * n];
        mm_bf16_packed_on(
            kernel,
            m,
            &mut c,
            false,
            1.0,
            cols(&at, m).into(),
            &packed,
            false,
        );
        for (g, w) in c.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{kernel:?}: {g} vs {w}");
        }
    }
}

#[test]
fn packing_rows_one_at_a_time_gives_the_words_of_packing_the_matrix() {
    // a (rows, cols) matrix, packed from its rows (as a quantized tile is decoded) and from
    // its view, both ways round; odd sizes leave half pairs and partial panels, 601 columns
    // several k-blocks
    for (rows_n, cols_n) in [(53, 37), (53, 601), (601, 37)] {
        packed_from_rows(rows_n, cols_n);
    }
}

fn packed_from_rows(rows_n: usize, cols_n: usize) {
    let w = data(rows_n * cols_n, 7);
    let bits: Vec<u16> = w.iter().map(|&x| to_bf16(x)).collect();
    let row = |i: usize, out: &mut [f32]| out.copy_from_slice(&w[i * cols_n..(i + 1) * cols_n]);
    for transposed in [true, false] {
        let view = if transposed {
            BView {
                x: &bits,
                rs: 1,
                cs: cols_n,
            } // (cols, rows) = W^T
        } else {
            BView {
                x: &bits,
                rs: cols_n,
                cs: 1,
            } // (rows, cols) = W
        };
        let (k, n) = if transposed {
            (cols_n, rows_n)
        } else {
            (rows_n, cols_n)
        };
        let want = PackedB::new(k, n, view, false);
        let got = PackedB::from_rows(rows_n, cols_n, transposed, vec![7; 3], row);
        assert_eq!(
            (got.k, got.n, got.kp, got.kc),
            (want.k, want.n, want.kp, want.kc)
        );
        assert!(got.words() == want.words(), "transposed {transposed}");
        assert_eq!(got.words().as_ptr() as usize % 64, 0);
    }
}

#[test]
#[ignore = "a rate, not a check: cargo test --release -p petal-ops --lib -- --ignored bf16_kernel_rate --nocapture"]
fn bf16_kernel_rate() {
    let (m, n, k) = (1024, 1024, 1024);
    let a = data(m * k, 1);
    let b: Vec<u16> = data(k * n, 2).into_iter().map(to_bf16).collect();
    let packed = PackedB::new(
        k,
        n,
        BView {
            x: &b,
            rs: n,
            cs: 1,
        },
        true,
    );
    let mut c = vec![0f32; m * n];
    for kernel in kernels_here() {
        let mut t = Vec::new();
        for _ in 0..7 {
            let s = std::time::Instant::now();
            mm_bf16_packed_on(
                kernel,
                m,
                &mut c,
                false,
                1.0,
                rows(&a, k).into(),
                &packed,
                true,
            );
            t.push(s.elapsed().as_secs_f64());
        }
        t.sort_by(f64::total_cmp);
        let s = std::time::Instant::now();
        let _ = PackedB::new(
            k,
            n,
            BView {
                x: &b,
                rs: n,
                cs: 1,
            },
            true,
        );
        let pack = s.elapsed().as_secs_f64();
        eprintln!(
            "{kernel:?}: {:.0} GFLOP/s (median of 7, B packed), packing B {:.2} ms",
            2.0 * (m * n * k) as f64 / t[3] / 1e9,
            pack * 1e3
        );
        // and the product it timed: the f32 product (candle's) of the bf16-rounded operands
        let dev = candle_core::Device::Cpu;
        let ar: Vec<f32> = a.iter().map(|&x| from_bf16(to_bf16(x))).collect();
        let bw: Vec<f32> = b.iter().map(|&x| from_bf16(x)).collect();
        let want = candle_core::Tensor::from_vec(ar, (m, k), &dev)
            .and_then(|a| a.matmul(&candle_core::Tensor::from_vec(bw, (k, n), &dev)?))
            .and_then(|w| w.flatten_all()?.to_vec1::<f32>())
            .unwrap();
        for (g, w) in c.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()) * (k as f32).sqrt(),
                "{kernel:?}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn a_product_into_a_tile_of_a_wider_output_from_a_left_operand_packed_once_equals_the_plain_one() {
    for kernel in kernels_here() {
        for (m, n, k) in [(37, 50, 70), (16, 96, 513)] {
            let (a, packed) = (data(m * k, 1), random_packed(k, n));
            let mut plain = vec![0f32; m * n];
            let av = rows(&a, k).into();
            mm_bf16_packed_on(kernel, m, &mut plain, false, 1.0, av, &packed, true);
            let pa = PackedA::new(kernel, av, m, k, true);
            let (ldc, c0) = (n + 13, 5);
            for acc in [false, true] {
                let mut wide = vec![7f32; m * ldc];
                let out = Out {
                    c: &mut wide,
                    ldc,
                    c0,
                };
                mm_bf16_into(kernel, m, out, acc, 1.0, Left::Packed(&pa), &packed, true);
                for (i, row) in wide.chunks(ldc).enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        let want = match (c0..c0 + n).contains(&j) {
                            true => plain[i * n + j - c0] + if acc { 7.0 } else { 0.0 },
                            false => 7.0, // outside the tile: untouched
                        };
                        // adding to c sums in another order: within rounding
                        let tol = if acc { 1e-6 * (1.0 + want.abs()) } else { 0.0 };
                        assert!(
                            (v - want).abs() <= tol,
                            "{kernel:?} ({m},{n},{k}) acc {acc} at ({i},{j}): {v} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
