//! A GPTQ checkpoint (tools/golden/make_gptq.py: a tiny random Llama's linears quantized to
//! 4 bits in groups of 128 on GPTQ's asymmetric grid, packed as AutoGPTQ/GPTQModel's `gptq`
//! format): petal reads `qweight`/`qzeros`/`scales` into its int4 rows and gives the logits of
//! the weights unpacked by the generator's own dequantization, kept in int4 or dequantized.

use candle_core::{DType, Device};
use petal_core::{Adaptable, Ctx};
use petal_models::Precision;
use std::path::PathBuf;

fn folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/llama_gptq")
}

#[test]
fn a_gptq_folder_gives_the_dequantized_models_logits() {
    let golden =
        candle_core::safetensors::load(folder().join("logits.safetensors"), &Device::Cpu).unwrap();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let reference = Precision {
        quantized: true,
        kernels: petal_ops::Kernels::REFERENCE,
        ..DType::F32.into()
    };
    for (p, kept) in [(reference, 14), (DType::F32.into(), 0)] {
        let m = petal_io::load_model(folder().to_str().unwrap(), p, &Device::Cpu).unwrap();
        let n = m
            .model
            .linears()
            .iter()
            .filter(|l| l.quant().is_some())
            .count();
        assert_eq!(n, kept, "linears kept in int4");
        let got = m.model.forward(&ids, None, &Ctx::eval()).unwrap();
        let d = petal_ops::testing::max_rel(&got, &golden["logits"]);
        assert!(d < 1e-5, "kept {kept}: {d}");
    }
}

#[test]
fn act_order_and_other_widths_are_refused_naming_the_key() {
    let at = std::path::Path::new("config.json");
    for (q, key) in [
        (
            serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true}),
            "desc_act",
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
