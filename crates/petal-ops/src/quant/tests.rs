//! The quantized products against dequantize-then-f32, and the decoders against gguf-py.
use super::nf4::Nf4Parts;
use super::product::*;
use super::*;
use crate::testing::{max_abs, max_rel, rand};
use crate::Kernels;
use candle_core::{Device, Var};

const REF: Kernels = Kernels::REFERENCE;

#[test]
fn block_structs_are_as_large_as_ggml_says() {
    for &t in BLOCK_TYPES {
        let f = QFormat::new(t, t.block_size()).unwrap();
        let x = vec![0.5f32; t.block_size()];
        assert_eq!(quantize_rows(f, &x).len(), t.type_size(), "{t:?}");
    }
    assert_eq!(type_name(GgmlDType::Q4K), "q4_k");
    assert_eq!(type_name(GgmlDType::Q8_0), "q8_0");
}

#[test]
fn dequantize_equals_candles_qtensor_dequantize() {
    for &t in BLOCK_TYPES {
        let w = rand(&[5, 512], 7);
        let (q, fmt) = quantize(&w, t).unwrap();
        let ours = dequantize(&q, fmt).unwrap();
        let theirs = candle_core::quantized::QTensor::quantize(&w, t)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        assert_eq!(max_abs(&ours, &theirs), 0.0, "{t:?}");
        // and it is a quantization of w: relative RMS error about a grid step
        let bits = match t {
            GgmlDType::Q2K => 2,
            GgmlDType::Q3K => 3,
            GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => 5,
            GgmlDType::Q6K => 6,
            GgmlDType::Q8_0 => 8,
            _ => 4,
        };
        let rms = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        let rel = rms(&(&ours - &w).unwrap()) / rms(&w);
        assert!(rel < 2f32.powi(2 - bits), "{t:?}: {rel}");
    }
}

#[test]
fn dequantize_equals_gguf_py_on_random_blocks() {
    // tools/golden/make_quant_blocks.py: random blocks, decoded by llama.cpp's gguf-py
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/golden/quant_blocks.safetensors"
    );
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    for &ty in BLOCK_TYPES {
        let name = type_name(ty);
        let want = &t[&format!("{name}.values")];
        let fmt = QFormat::new(ty, want.dim(1).unwrap()).unwrap();
        let got = dequantize(&t[&format!("{name}.bytes")], fmt).unwrap();
        assert!(max_rel(&got, want) <= 1e-6, "{name}");
    }
}

#[test]
fn quant_linear_equals_dequantize_then_f32_in_value_and_input_gradient() {
    // rows of W spanning several tiles (tile_rows(512) = 64 under test: use 1100 rows for the
    // few-row path's chunks and a short last tile) and m across both paths
    for t in quantizers()
        .into_iter()
        .chain([act_order(512) as &dyn Quantizer])
    {
        let name = t.name();
        let (n, k) = (
            if name == "q4_k" || name == "nf4" {
                1100
            } else {
                40
            },
            512,
        );
        let (q, fmt) = quantize_with(&rand(&[n, k], 3), t).unwrap();
        let b = rand(&[n], 4);
        for m in [1, 5, 37] {
            let x = Var::from_tensor(&rand(&[m, k], 5)).unwrap();
            let fast = quant_linear(REF, x.as_tensor(), &q, fmt, Some(&b)).unwrap();
            let slow = quant_linear_reference(x.as_tensor(), &q, fmt, Some(&b)).unwrap();
            assert!(max_rel(&fast, &slow) <= 1e-5, "{t:?} m {m}");
            let dy = rand(&[m, n], 6);
            let g1 = (&fast * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (&slow * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (g1, g2) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
            assert!(max_rel(g1, g2) <= 1e-5, "{t:?} m {m} grad");
        }
    }
}

#[test]
fn bf16_tiles_equal_f32_products_of_bf16_rounded_operands() {
    // with AVX512-BF16 the fused kernels round W's tiles and the left operand to bf16 and
    // accumulate in f32: the same as f32 products of the rounded values (elsewhere the f32
    // path, equal to them within bf16's step)
    let round = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let tol = if crate::bf16::available() { 1e-5 } else { 1e-2 };
    let kb = Kernels::FUSED.with_frozen(crate::Frozen::Bf16);
    // GGUF's blocks: the input gradient in tiles of dx's columns; NF4: in tiles of W's rows
    for t in [GgmlDType::Q4_1, GgmlDType::Q6K]
        .map(|t| super::ggml(t).unwrap())
        .into_iter()
        .chain([&super::NF4 as &dyn Quantizer])
    {
        // 601 rows: the last tile has an odd row count (a half-filled k-pair backward)
        let (q, fmt) = quantize_with(&rand(&[601, 512], 3), t).unwrap();
        let wr = round(&dequantize(&q, fmt).unwrap());
        let (x, g) = (rand(&[37, 512], 5), rand(&[37, 601], 6));
        let y = quant_linear(kb, &x, &q, fmt, None).unwrap();
        let want = round(&x).matmul(&wr.t().unwrap()).unwrap();
        assert!(max_rel(&y, &want) <= tol, "{t:?}");
        let dx = quant_input_grad(kb, &g, &q, fmt).unwrap();
        let want = round(&g).matmul(&wr).unwrap();
        assert!(max_rel(&dx, &want) <= tol, "{t:?} grad");
    }
}

#[test]
fn int8_tiles_equal_the_8_bit_twin_forward_and_stay_within_8_bits_backward() {
    // the forward quantizes x per row and W per row (a column of W^T): tile by tile or at
    // once, the same codes, so it equals the twin; the input gradient quantizes g and W per
    // tile of W's rows, so it is checked against the exact product within 8-bit rounding
    // (formats without 4-bit codes: over those the 256-bit kernels take the nibble path)
    let k8 = Kernels::FUSED.with_frozen(crate::Frozen::Int8);
    for t in [GgmlDType::Q5_0, GgmlDType::Q6K] {
        let (q, fmt) = quantize(&rand(&[600, 512], 3), t).unwrap();
        let w = dequantize(&q, fmt).unwrap();
        let (x, g) = (rand(&[37, 512], 5), rand(&[37, 600], 6));
        let y = quant_linear(k8, &x, &q, fmt, None).unwrap();
        let wt: Vec<f32> = w
            .t()
            .unwrap()
            .contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let want = crate::int8::mm_int8_reference(&xv, &wt, 37, 600, 512);
        let want = Tensor::from_vec(want, (37, 600), &candle_core::Device::Cpu).unwrap();
        assert!(max_rel(&y, &want) <= 1e-5, "{t:?}");
        let exact = x.matmul(&w.t().unwrap()).unwrap();
        let d = max_rel(&y, &exact);
        assert!(d > 1e-4 && d < 3e-2, "{t:?}: {d}");
        let dx = quant_input_grad(k8, &g, &q, fmt).unwrap();
        let d = max_rel(&dx, &g.matmul(&w).unwrap());
        assert!(d > 1e-4 && d < 3e-2, "{t:?} grad: {d}");
    }
}

#[test]
fn few_rows_without_gradient_round_x_to_8_bits_and_stay_close() {
    for &t in BLOCK_TYPES {
        if t == GgmlDType::Q4_1 {
            continue; // x stays f32 there (the test below)
        }
        let (q, fmt) = quantize(&rand(&[70, 512], 3), t).unwrap();
        let x = rand(&[3, 512], 5);
        let fast = quant_linear(Kernels::FUSED, &x, &q, fmt, None).unwrap();
        let slow = quant_linear_reference(&x, &q, fmt, None).unwrap();
        let d = max_rel(&fast, &slow);
        assert!(d > 0.0 && d < 2e-2, "{t:?}: {d}");
    }
}

#[test]
fn few_rows_over_q4_1_keep_x_in_f32_and_equal_the_definition() {
    // decoding's product over Q4_1 decodes each block inside the dot product (AVX-512 or AVX2,
    // each this CPU has checked on its own), or decodes rows then dots them: either way x is
    // not rounded
    let simds = super::simd::Simd::all();
    for (k, m) in [(512, 1), (96, 3), (2048, 2)] {
        let (q, fmt) = quantize(&rand(&[70, k], 3), GgmlDType::Q4_1).unwrap();
        let x = rand(&[m, k], 5);
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<u8> = q.flatten_all().unwrap().to_vec1().unwrap();
        let want = super::q4_1_rows::rows_reference(&xs, m, k, &w, 70);
        let want = Tensor::from_vec(want, (m, 70), &Device::Cpu).unwrap();
        let fast = quant_linear(Kernels::FUSED, &x, &q, fmt, None).unwrap();
        let d = max_rel(&fast, &want);
        assert!(d < 1e-5, "k {k}, m {m}: {d}");
        for &simd in &simds {
            let y = super::q4_1_rows::few_rows_on(simd, &xs, m, k, &w, 70).unwrap();
            let d = max_rel(&Tensor::from_vec(y, (m, 70), &Device::Cpu).unwrap(), &want);
            assert!(d < 1e-5, "{simd:?}, k {k}, m {m}: {d}");
        }
    }
    if simds.len() < 2 {
        eprintln!(
            "this CPU runs only {simds:?} of the Q4_1 few-row kernels: the others not checked"
        );
    }
}

#[test]
fn few_rows_over_nf4_keep_x_in_f32_and_equal_the_decoded_rows() {
    // the NF4 table looked up inside the dot product (AVX-512), or rows decoded then dotted;
    // 70 x 1088 spans a second-level group boundary inside a row (17 blocks a row)
    for (k, m) in [(1088, 1), (128, 3)] {
        let (q, fmt) = quantize_with(&rand(&[70, k], 3), &super::nf4::NF4).unwrap();
        let x = rand(&[m, k], 5);
        let fast = quant_linear(Kernels::FUSED, &x, &q, fmt, None).unwrap();
        let want = x
            .matmul(&dequantize(&q, fmt).unwrap().t().unwrap())
            .unwrap();
        let d = max_rel(&fast, &want);
        assert!(d < 1e-5, "k {k}, m {m}: {d}");
        // each kernel this CPU has, on its own
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<u8> = q.flatten_all().unwrap().to_vec1().unwrap();
        let rb = w.len() / 70;
        for simd in super::simd::Simd::all() {
            let scales = |row: &[u8], out: &mut [f32]| super::nf4::block_scales(row, k, out);
            let y = super::nf4_rows::few_rows_on(
                simd,
                &xs,
                m,
                k,
                &w,
                70,
                rb,
                &super::nf4::CODE,
                scales,
            )
            .unwrap();
            let d = max_rel(&Tensor::from_vec(y, (m, 70), &Device::Cpu).unwrap(), &want);
            assert!(d < 1e-5, "{simd:?}, k {k}, m {m}: {d}");
        }
    }
}

#[test]
fn quant_lora_linear_equals_its_composed_twin_in_value_and_gradients() {
    let (q, fmt) = quantize(&rand(&[40, 256], 3), GgmlDType::Q5K).unwrap();
    let bias = rand(&[40], 8);
    for m in [3, 37] {
        crate::testing::same(
            &[rand(&[m, 256], 5), rand(&[m, 4], 6), rand(&[40, 4], 7)],
            |t| quant_lora_linear(REF, &t[0], &q, fmt, Some(&bias), &t[1], &t[2], 0.5).unwrap(),
            |t| {
                let base = quant_linear_reference(&t[0], &q, fmt, Some(&bias)).unwrap();
                let up = t[1].matmul(&t[2].t().unwrap()).unwrap();
                (base + (up * 0.5).unwrap()).unwrap()
            },
        );
    }
}

#[test]
fn lookup_decodes_only_the_rows_asked_for() {
    let w = rand(&[30, 64], 9);
    let (q, fmt) = quantize(&w, GgmlDType::Q8_0).unwrap();
    let ids = Tensor::new(&[[3u32, 29], [0, 3]], &Device::Cpu).unwrap();
    let got = lookup(&q, fmt, &ids).unwrap();
    let want = dequantize(&q, fmt)
        .unwrap()
        .index_select(&ids.flatten_all().unwrap(), 0)
        .unwrap();
    assert_eq!(got.dims(), &[2, 2, 64]);
    assert_eq!(max_abs(&got.reshape((4, 64)).unwrap(), &want), 0.0);
}

#[test]
fn unimplemented_types_and_partial_blocks_are_refused_by_name() {
    let e = QFormat::new(GgmlDType::Q8K, 256).unwrap_err();
    assert!(e.contains("q8_k") && e.contains("q4_k"), "{e}");
    let e = QFormat::new(GgmlDType::Q4K, 100).unwrap_err();
    assert!(e.contains("100") && e.contains("256"), "{e}");
}

fn nf4_golden() -> std::collections::HashMap<String, Tensor> {
    // tools/golden/make_nf4.py: bitsandbytes' NF4 and a transcription of GPTQ's int4 grid
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/golden/quant_nf4.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn vec<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1::<T>().unwrap()
}

#[test]
fn nf4_codes_are_bitsandbytes_codes() {
    let g = nf4_golden();
    assert_eq!(nf4_scale_code(), &vec::<f32>(&g["nested_code"])[..]);
    assert_eq!(nf4_code(), &vec::<f32>(&g["nf4_code"])[..]);
    // and the decoder gives them: each code in a block whose scale decodes to 1
    let codes: Vec<f32> = (0..16u8)
        .map(|q| {
            let row = NF4.encode(64, &[0.0; 64]);
            let mut row = row;
            row[..32].fill(q << 4 | q);
            // scale code of 1.0 in the dynamic code and a group scale of 1: absmax 1
            row[32] = 255;
            row[33..35].copy_from_slice(&0u16.to_le_bytes());
            row[35..39].copy_from_slice(&0f32.to_le_bytes());
            row[39..43].copy_from_slice(&1f32.to_le_bytes());
            let mut out = [0f32; 64];
            NF4.decode(64, &row, &mut out);
            out[0]
        })
        .collect();
    assert_eq!(codes, vec::<f32>(&g["nf4_code"]));
}

#[test]
fn nf4_decodes_bitsandbytes_state_bit_for_bit() {
    let g = nf4_golden();
    for name in ["rows", "wide"] {
        let want = &g[&format!("{name}.nf4")];
        let (n, cols) = want.dims2().unwrap();
        let parts = Nf4Parts {
            packed: &vec::<u8>(&g[&format!("{name}.packed")]),
            scale_codes: &vec::<u8>(&g[&format!("{name}.absmax")]),
            group_scales: &vec::<f32>(&g[&format!("{name}.nested_absmax")]),
            offset: vec::<f32>(&g[&format!("{name}.offset")])[0],
        };
        let rows = NF4.from_parts(cols, &parts).unwrap();
        let fmt = QFormat::of(&NF4, cols).unwrap();
        let q = Tensor::from_vec(rows, (n, fmt.row_bytes()), &Device::Cpu).unwrap();
        assert_eq!(max_abs(&dequantize(&q, fmt).unwrap(), want), 0.0, "{name}");
    }
}

#[test]
fn nf4_quantizes_as_bitsandbytes() {
    let g = nf4_golden();
    for name in ["rows", "wide"] {
        let want = &g[&format!("{name}.nf4")];
        let (q, fmt) = quantize_with(&g[&format!("{name}.weight")], &NF4).unwrap();
        let (cols, bpr) = (fmt.cols, fmt.cols / 64);
        let bytes = vec::<u8>(&q);
        let (mut packed, mut codes) = (vec![], vec![]);
        for row in bytes.chunks_exact(fmt.row_bytes()) {
            packed.extend_from_slice(&row[..cols / 2]);
            codes.extend_from_slice(&row[cols / 2..cols / 2 + bpr]);
        }
        assert_eq!(
            packed,
            vec::<u8>(&g[&format!("{name}.packed")]),
            "{name}: 4-bit codes"
        );
        // bitsandbytes' table search (BinSearch's Direct2) lands on the farther neighbour for
        // a few scales within a hair of a midpoint; petal keeps the nearest code there
        let theirs = vec::<u8>(&g[&format!("{name}.absmax")]);
        let differ = codes.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        assert!(
            differ * 100 <= codes.len(),
            "{name}: {differ} of {} scale codes",
            codes.len()
        );
        assert!(
            codes.iter().zip(&theirs).all(|(a, b)| a.abs_diff(*b) <= 1),
            "{name}"
        );
        let d = max_rel(&dequantize(&q, fmt).unwrap(), want);
        assert!(d <= 3e-3, "{name}: {d}");
    }
}

#[test]
fn int4_equals_gptqs_grid() {
    let g = nf4_golden();
    for name in ["rows", "wide"] {
        let (q, fmt) = quantize_with(&g[&format!("{name}.weight")], &INT4).unwrap();
        let got = dequantize(&q, fmt).unwrap();
        assert_eq!(max_abs(&got, &g[&format!("{name}.int4")]), 0.0, "{name}");
    }
}

/// A fixed scrambled order of `cols` columns.
fn scrambled(cols: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..cols as u32).collect();
    order.sort_by_key(|&c| (c.wrapping_mul(2654435761)) % 1009);
    order
}

/// An act-order int4 quantizer over `cols` columns in groups of 64, in the scrambled order.
fn act_order(cols: usize) -> &'static Int4Ordered {
    Int4Ordered::leak(64, scrambled(cols))
}

#[test]
fn act_order_int4_groups_the_columns_in_its_order_and_decodes_them_in_place() {
    let (n, k) = (7, 256);
    let q = act_order(k);
    let w = rand(&[n, k], 9);
    let (codes, fmt) = quantize_with(&w, q).unwrap();
    let got = vec::<f32>(&dequantize(&codes, fmt).unwrap());
    // the twin: plain int4 in groups of 64 over the columns taken in the order, put back
    let order: Vec<usize> = scrambled(k).into_iter().map(|c| c as usize).collect();
    let wv = vec::<f32>(&w);
    let gathered: Vec<f32> = wv
        .chunks(k)
        .flat_map(|r| order.iter().map(|&c| r[c]).collect::<Vec<_>>())
        .collect();
    let (plain, pf) = quantize_with(
        &Tensor::from_vec(gathered, (n, k), &Device::Cpu).unwrap(),
        &INT4_G64,
    )
    .unwrap();
    let plain = vec::<f32>(&dequantize(&plain, pf).unwrap());
    for r in 0..n {
        for (j, &c) in order.iter().enumerate() {
            assert_eq!(got[r * k + c], plain[r * k + j], "row {r} column {c}");
        }
    }
    // and the order matters: the same weight in plain groups decodes differently
    let (direct, df) = quantize_with(&w, &INT4_G64).unwrap();
    assert!(
        max_abs(
            &dequantize(&direct, df).unwrap(),
            &dequantize(&codes, fmt).unwrap()
        ) > 0.0
    );
}

#[test]
fn quantizers_are_found_by_name_and_unknown_names_listed() {
    assert_eq!(quantizer("nf4").unwrap().name(), "nf4");
    assert_eq!(quantizer("q4_k").unwrap().name(), "q4_k");
    let e = quantizer("nf3").unwrap_err();
    assert!(
        e.contains("nf4") && e.contains("int4") && e.contains("q8_0"),
        "{e}"
    );
}

fn gptq_golden() -> std::collections::HashMap<String, Tensor> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden/gptq_solver.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// `tr((Q - W) H (Q - W)^T)`: the layer's output error over the calibration inputs.
fn output_error(q: &[f32], w: &[f32], h: &[f64], cols: usize) -> f64 {
    q.chunks(cols)
        .zip(w.chunks(cols))
        .map(|(q, w)| {
            let d: Vec<f64> = q.iter().zip(w).map(|(a, b)| (*a - *b) as f64).collect();
            (0..cols)
                .map(|i| d[i] * (0..cols).map(|j| h[i * cols + j] * d[j]).sum::<f64>())
                .sum::<f64>()
        })
        .sum()
}

#[test]
fn gptq_equals_the_official_algorithm_and_beats_round_to_nearest() {
    let g = gptq_golden();
    let w = vec::<f32>(&g["w"]);
    let h = vec::<f64>(&g["h"]);
    let (rows, cols) = g["w"].dims2().unwrap();
    for (case, group, act_order) in [
        ("g64", 64, false),
        ("g64_act", 64, true),
        ("g128", 128, false),
    ] {
        let opts = gptq::GptqOptions {
            group,
            act_order,
            damp: 0.01,
        };
        let got = gptq::gptq(&w, rows, cols, &h, opts).unwrap();
        let want = |k: &str| g[&format!("{case}.{k}")].clone();
        assert_eq!(got.codes, vec::<u8>(&want("codes")), "{case} codes");
        assert_eq!(got.zeros, vec::<u8>(&want("zeros")), "{case} zeros");
        assert_eq!(got.scales, vec::<f32>(&want("scales")), "{case} scales");
        let g_idx: Vec<u32> = vec::<i64>(&want("g_idx"))
            .iter()
            .map(|&v| v as u32)
            .collect();
        assert_eq!(got.g_idx, g_idx, "{case} g_idx");
        let near = gptq::rtn(&w, rows, cols, group).unwrap();
        let (e_gptq, e_rtn) = (
            output_error(&got.dequantize(), &w, &h, cols),
            output_error(&near.dequantize(), &w, &h, cols),
        );
        assert!(e_gptq < 0.8 * e_rtn, "{case}: GPTQ {e_gptq} vs RTN {e_rtn}");
    }
    let e = gptq::gptq(
        &w,
        rows,
        cols,
        &h,
        gptq::GptqOptions {
            group: 100,
            act_order: false,
            damp: 0.01,
        },
    );
    assert!(e.unwrap_err().contains("groups of 100"));
}

#[test]
fn fused_quant_lora_equals_the_composed_form_in_value_and_every_gradient() {
    // f32 tile products, so the fused op and the composed one differ by summation order only
    let k = Kernels::FUSED.with_frozen(crate::Frozen::F32);
    for (dt, m) in [(GgmlDType::Q5K, 3), (GgmlDType::Q4_1, 37)] {
        let (q, fmt) = quantize(&rand(&[40, 256], 3), dt).unwrap();
        let bias = rand(&[40], 8);
        crate::testing::same(
            &[rand(&[m, 256], 5), rand(&[4, 256], 6), rand(&[40, 4], 7)],
            |t| crate::quant_lora(k, &t[0], &q, fmt, Some(&bias), &t[1], &t[2], 0.5).unwrap(),
            |t| {
                let base = quant_linear_reference(&t[0], &q, fmt, Some(&bias)).unwrap();
                let h = t[0].matmul(&t[1].t().unwrap()).unwrap();
                let up = h.matmul(&t[2].t().unwrap()).unwrap();
                (base + (up * 0.5).unwrap()).unwrap()
            },
        );
    }
}
