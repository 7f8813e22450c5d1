//! GPTQ and AWQ checkpoints (tools/golden/make_gptq.py: a tiny random Llama's linears quantized
//! to 4 bits and packed as AutoGPTQ/GPTQModel's `gptq` format, in groups of 128, and with
//! act-order in groups of 32; and as AutoAWQ's GEMM layout in groups of 64): petal reads
//! `qweight`/`qzeros`/`scales`/`g_idx` into its int4 rows and gives the logits of the weights
//! unpacked by the generator's own dequantization, kept in int4 or dequantized.

use candle_core::{DType, Device};
use petal_core::{Adaptable, Ctx};
use petal_models::Precision;
use std::path::PathBuf;

fn folder(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden")
        .join(name)
}

#[test]
fn a_gptq_folder_gives_the_dequantized_models_logits() {
    same_logits(folder("llama_gptq"), "int4");
}

#[test]
fn an_act_order_gptq_folder_gives_the_dequantized_models_logits() {
    same_logits(folder("llama_gptq_act"), "int4_g32_act");
}

#[test]
fn an_awq_folder_gives_the_dequantized_models_logits() {
    same_logits(folder("llama_awq"), "int4_g64");
}

fn same_logits(folder: PathBuf, kept_as: &str) {
    let golden =
        candle_core::safetensors::load(folder.join("logits.safetensors"), &Device::Cpu).unwrap();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let reference = Precision {
        quantized: true,
        kernels: petal_ops::Kernels::REFERENCE,
        ..DType::F32.into()
    };
    for (p, kept) in [(reference, 14), (DType::F32.into(), 0)] {
        let m = petal_io::load_model(folder.to_str().unwrap(), p, &Device::Cpu).unwrap();
        let formats: Vec<String> = m
            .model
            .linears()
            .iter()
            .filter_map(|l| l.quant().map(|f| f.name()))
            .collect();
        assert_eq!(formats.len(), kept, "linears kept in int4");
        assert!(formats.iter().all(|f| f == kept_as), "{formats:?}");
        let got = m.model.forward(&ids, None, &Ctx::eval()).unwrap();
        let d = petal_ops::testing::max_rel(&got, &golden["logits"]);
        assert!(d < 1e-5, "kept {kept}: {d}");
    }
}

#[test]
fn other_widths_and_layouts_are_refused_naming_the_key() {
    let at = std::path::Path::new("config.json");
    for (q, key) in [
        (
            serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}),
            "version",
        ),
        (
            serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": false}),
            "zero_point",
        ),
        (
            serde_json::json!({"quant_method": "awq", "bits": 8, "group_size": 128}),
            "bits",
        ),
        (
            serde_json::json!({"quant_method": "gptq", "bits": 3, "group_size": 128}),
            "bits",
        ),
        (
            serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": -1}),
            "group_size",
        ),
    ] {
        let e = petal_io::gptq::gptq_config(&serde_json::json!({"quantization_config": q}), at)
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{e}");
    }
}
