//! `petal quantize`: GPTQ and round-to-nearest folders of a tiny dense Llama (the dequantized
//! GPTQ golden, hidden 128), read back by petal's GPTQ reader (itself checked against
//! AutoGPTQ's layout in petal-io's tests).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{golden, petal, stderr};
use petal_core::Ctx;
use std::path::Path;

fn logits(model: &Path, quantize: &str) -> Tensor {
    let mut p: petal_models::Precision = DType::F32.into();
    if !quantize.is_empty() {
        // f32 products over the kept int4 rows (not this CPU's bf16 or 8-bit ones)
        p.quantize = Some(petal_ops::quant::quantizer(quantize).unwrap());
        p.kernels = petal_ops::Kernels::REFERENCE;
    }
    let m = petal_io::load_model(model.to_str().unwrap(), p, &Device::Cpu).unwrap();
    // held-out text of the calibration text's kind
    let ids = m.tokenizer.encode(&text(4000..4064), false).unwrap();
    let ids = Tensor::from_vec(ids, (2, 32), &Device::Cpu).unwrap();
    m.model.forward(&ids, None, &Ctx::eval()).unwrap()
}

fn mean_sq(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The golden's linears are 4-bit values already (of groups of 128): move them off any grid
/// with a fixed pseudo-random perturbation, so the folder is an ordinary dense model.
fn off_the_grid(file: &Path) {
    let mut t = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    for (name, w) in t.iter_mut() {
        if name.starts_with("model.layers.") && w.rank() == 2 {
            let n = w.elem_count();
            let noise: Vec<f32> = (0..n)
                .map(|i| 0.01 * ((i as f32 * 12.9898).sin() * 43758.547).fract())
                .collect();
            let noise = Tensor::from_vec(noise, w.shape(), &Device::Cpu).unwrap();
            *w = (&*w + noise).unwrap();
        }
    }
    candle_core::safetensors::save(&t, file).unwrap();
}

/// Words `i` of a fixed text over the tiny tokenizer's words `w0`..`w95`.
fn text(words: std::ops::Range<u64>) -> String {
    let w: Vec<String> = words
        .map(|i| format!("w{}", (i * i * 13 + i * 5 + 1) % 96))
        .collect();
    w.join(" ")
}

fn calibration_text(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("calib.txt");
    std::fs::write(&p, text(0..3000)).unwrap();
    p
}

#[test]
fn gptq_and_rtn_folders_load_back_and_gptq_stays_closer_to_the_dense_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = tmp.path().join("dense");
    let o = petal(&[
        "merge",
        "--model",
        golden().join("llama_gptq").to_str().unwrap(),
        "--out",
        dense.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    off_the_grid(&dense.join("model.safetensors"));
    let calib = calibration_text(tmp.path());
    let quantize = |method: &str, extra: &[&str], out: &str| {
        let out = tmp.path().join(out);
        let mut args = vec![
            "quantize",
            "--model",
            dense.to_str().unwrap(),
            "--method",
            method,
            "--group",
            "32",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = petal(&args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        out
    };
    let rtn = quantize("rtn", &[], "rtn");
    let gptq_args = [
        "--calibration",
        calib.to_str().unwrap(),
        "--samples",
        "24",
        "--seq-len",
        "32",
        "--act-order",
    ];
    let gptq = quantize("gptq", &gptq_args, "gptq");

    // round to nearest, written and read back, is `--quantize int4_g32` at load
    let base = logits(&dense, "");
    let at_load = logits(&dense, "int4_g32");
    let d = petal_ops::testing::max_rel(&logits(&rtn, ""), &at_load);
    assert!(d < 1e-4, "rtn folder vs int4_g32 at load: {d}");
    // the act-order folder keeps its linears in act-order int4 and reads the same both ways
    let m = petal_io::load_model(
        gptq.to_str().unwrap(),
        petal_models::Precision {
            quantized: true,
            ..DType::F32.into()
        },
        &Device::Cpu,
    )
    .unwrap();
    use petal_core::Adaptable;
    let kept: Vec<String> = m
        .model
        .linears()
        .iter()
        .filter_map(|l| l.quant().map(|f| f.name()))
        .collect();
    assert_eq!(kept.len(), 14);
    assert!(kept.iter().all(|k| k == "int4_g32_act"), "{kept:?}");
    let g = logits(&gptq, "");
    let (e_gptq, e_rtn) = (mean_sq(&g, &base), mean_sq(&at_load, &base));
    eprintln!("logits squared error to the dense model: GPTQ {e_gptq}, RTN {e_rtn}");
    assert!(
        e_gptq < 0.8 * e_rtn,
        "logits' squared error to the dense model: GPTQ {e_gptq} vs RTN {e_rtn}"
    );
}

#[test]
fn bad_quantize_requests_fail_in_one_line_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let model = golden().join("llama");
    let m = model.to_str().unwrap();
    let o = out.to_str().unwrap();
    for (args, want) in [
        (vec!["--method", "gptq"], "--calibration"),
        (vec!["--method", "awq"], "--method `awq`"),
        (vec!["--method", "rtn", "--group", "48"], "--group 48"),
        // the tiny Llama's MLP has 48 inputs: not whole groups of 32
        (
            vec!["--method", "rtn", "--group", "32"],
            "down_proj: 48 inputs",
        ),
        (vec!["--method", "rtn", "--act-order"], "--act-order"),
    ] {
        let mut all = vec!["quantize", "--model", m, "--out", o];
        all.extend(args);
        let r = petal(&all);
        let e = stderr(&r);
        assert!(!r.status.success(), "{all:?}");
        assert!(e.contains(want), "{all:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        assert!(!out.exists());
    }
    let quantized = golden().join("llama_gptq");
    let r = petal(&[
        "quantize",
        "--model",
        quantized.to_str().unwrap(),
        "--method",
        "rtn",
        "--out",
        o,
    ]);
    assert!(stderr(&r).contains("already quantized"), "{}", stderr(&r));
}
