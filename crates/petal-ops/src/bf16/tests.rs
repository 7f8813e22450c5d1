use super::*;
use crate::cpu::{cols, rows};

fn data(len: usize, seed: u64) -> Vec<f32> {
    crate::testing::rand(&[len], seed).to_vec1().unwrap()
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
        mm_bf16_packed_on(kernel, m, &mut c, acc, alpha, rows(&a, k).into(), &packed, par);
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
        eprintln!("no AMX on this CPU (or the OS refuses its tiles): its kernel is not checked here");
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
        mm_bf16_packed_on(kernel, m, &mut c, false, 1.0, cols(&at, m).into(), &packed, false);
        for (g, w) in c.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{kernel:?}: {g} vs {w}");
        }
    }
}
