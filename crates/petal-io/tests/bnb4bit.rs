//! A QLoRA checkpoint (tools/golden/make_bnb4bit.py: a tiny random Llama loaded by transformers
//! with bitsandbytes NF4 and double quantization, saved with `save_pretrained`): petal reads
//! its packed codes and quant states into NF4 rows and gives the 4-bit model's own logits, kept
//! quantized (`--dtype quantized`) or dequantized at load (`--dtype f32`).

use candle_core::{DType, Device, Tensor};
use petal_core::{Adaptable, Ctx};
use petal_models::Precision;
use std::path::PathBuf;

fn folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/llama_bnb4bit")
}

fn logits_of(p: Precision) -> (Tensor, Tensor, usize) {
    let golden =
        candle_core::safetensors::load(folder().join("logits.safetensors"), &Device::Cpu).unwrap();
    let m = petal_io::load_model(folder().to_str().unwrap(), p, &Device::Cpu).unwrap();
    let quantized = m
        .model
        .linears()
        .iter()
        .filter(|l| l.quant().is_some())
        .count();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let got = m.model.forward(&ids, None, &Ctx::eval()).unwrap();
    (got, golden["logits"].clone(), quantized)
}

#[test]
fn a_bitsandbytes_nf4_folder_gives_the_4bit_models_logits() {
    // 2 layers x 7 linears are NF4 in the file; the head stays f32
    let reference = Precision {
        quantized: true,
        kernels: petal_ops::Kernels::REFERENCE,
        ..DType::F32.into()
    };
    let (got, want, n) = logits_of(reference);
    assert_eq!(n, 14);
    let d = petal_ops::testing::max_rel(&got, &want);
    assert!(d < 1e-5, "kept quantized: {d}");
    let (got, want, n) = logits_of(DType::F32.into());
    assert_eq!(n, 0);
    let d = petal_ops::testing::max_rel(&got, &want);
    assert!(d < 1e-5, "dequantized at load: {d}");
}

#[test]
fn a_bitsandbytes_folder_refuses_quantizing_again_and_other_bnb_formats_by_key() {
    let p = Precision {
        quantize: Some(&petal_ops::quant::NF4),
        ..DType::F32.into()
    };
    let e = petal_io::load_model(folder().to_str().unwrap(), p, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("already quantized") && e.contains("--dtype quantized"),
        "{e}"
    );
    // an 8-bit config names its key
    let cfg: serde_json::Value = serde_json::json!({"quantization_config": {
        "quant_method": "bitsandbytes", "load_in_8bit": true, "load_in_4bit": false}});
    let e = petal_io::bnb::bnb_config(&cfg, std::path::Path::new("config.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("load_in_4bit") && e.contains("8-bit"), "{e}");
}
