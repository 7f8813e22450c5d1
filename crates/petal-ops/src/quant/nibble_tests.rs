//! The nibble mode's products against their twins: the forward on a 4-bit weight's own
//! codes, the input gradient on W's columns coded again.

use super::product::*;
use super::*;
use crate::testing::{max_rel, rand};
use crate::Kernels;
use candle_core::Device;

#[test]
fn nibble_forward_reads_4_bit_codes_exactly_and_the_input_gradient_codes_columns_again() {
    // the codes and grids are the decoded values (the decoders are held to gguf-py); the
    // forward equals the nibble twin (x in 8-bit codes, W exact), the other formats' forward
    // is an f32 product of the decoded weight; every input gradient equals the twin on W's
    // columns coded again in 4 bits per block of 32 rows (g in 8-bit codes)
    if crate::int8::Kind::nibbles().is_none() {
        return eprintln!("skipped: no AVX2");
    }
    let kn = Kernels::FUSED.with_frozen(crate::Frozen::Nibbles);
    // 608 rows: the input gradient's tiles of whole blocks of 32 rows, the last one shorter
    let (rows, cols, m) = (608, 512, 37);
    let (x, g) = (rand(&[m, cols], 5), rand(&[m, rows], 6));
    let gv: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
    for name in ["q4_0", "q4_1", "q4_k", "int4_g32", "int4", "q6_k", "q8_0"] {
        let (q, fmt) = quantize_with(&rand(&[rows, cols], 3), quantizer(name).unwrap()).unwrap();
        let w = dequantize(&q, fmt).unwrap();
        let y = quant_linear(kn, &x, &q, fmt, None).unwrap();
        let dx = quant_input_grad(kn, &g, &q, fmt).unwrap();
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let nb = rows / 32;
        let (mut codes, mut step, mut lo) = (
            vec![0u8; rows * cols],
            vec![0f32; cols * nb],
            vec![0f32; cols * nb],
        );
        for j in 0..cols {
            for b in 0..nb {
                let col: Vec<f32> = (b * 32..(b + 1) * 32).map(|i| wv[i * cols + j]).collect();
                let q = &mut codes[j * rows + b * 32..j * rows + (b + 1) * 32];
                (step[j * nb + b], lo[j * nb + b]) = crate::int8::code4(&col, q);
            }
        }
        let want = crate::int8::mm_nibbles_reference(&gv, &codes, &step, &lo, m, cols, rows);
        let want = Tensor::from_vec(want, (m, cols), &Device::Cpu).unwrap();
        assert!(max_rel(&dx, &want) <= 1e-5, "{name} grad");
        // against the exact product: W rounded once more to 4 bits, an error of about 1/30 of
        // W's spread at each entry of dx (rms), a few times that at the largest of 37 x 512
        let d = max_rel(&dx, &g.matmul(&w).unwrap());
        assert!(d > 1e-3 && d < 0.15, "{name} grad: {d}");
        let exact = x.matmul(&w.t().unwrap()).unwrap();
        if !fmt.q.has_nibbles() {
            assert!(!name.starts_with("q4") && !name.starts_with("int4"));
            assert!(max_rel(&y, &exact) < 1e-5, "{name}");
            continue;
        }
        let bytes: Vec<u8> = q.flatten_all().unwrap().to_vec1().unwrap();
        let (mut codes, mut step, mut lo) = (
            vec![0u8; rows * cols],
            vec![0f32; rows * cols / 32],
            vec![0f32; rows * cols / 32],
        );
        fmt.q.nibbles(cols, &bytes, &mut codes, &mut step, &mut lo);
        for (i, (&c, &v)) in codes.iter().zip(&wv).enumerate() {
            let u = step[i / 32] * c as f32 + lo[i / 32];
            assert!(
                c < 16 && (u - v).abs() <= 1e-6 * (1.0 + v.abs()),
                "{name} {i}: {u} vs {v}"
            );
        }
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let want = crate::int8::mm_nibbles_reference(&xv, &codes, &step, &lo, m, rows, cols);
        let want = Tensor::from_vec(want, (m, rows), &Device::Cpu).unwrap();
        assert!(max_rel(&y, &want) <= 1e-5, "{name}");
        let d = max_rel(&y, &exact);
        assert!(d > 1e-4 && d < 2e-2, "{name}: {d}");
    }
}
