//! LoftQ and MiCA adapters saved by PEFT 0.21.2 over the tiny golden Llama
//! (tools/golden/make_lora_inits.py): petal loads them on the original model, rebuilding
//! LoftQ's quantized base from W, and gives PEFT's logits.

mod common;
use candle_core::{DType, Device, Tensor};
use common::{model, root};
use petal_core::Adaptable;
use petal_ops::testing::max_rel;
use std::collections::HashMap;

fn golden() -> HashMap<String, Tensor> {
    let path = root().join("lora_inits_logits.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn check(adapter: &str) {
    let g = golden();
    let mut m = model("llama");
    let dir = root().join("adapters").join(adapter);
    petal_io::attach_adapter(&mut m, &dir, "default").unwrap();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let got = m.forward(&ids, None, &petal_core::Ctx::eval()).unwrap();
    let e = max_rel(&got, &g[adapter]);
    assert!(e < 1e-4, "{adapter}: relative error {e:e}");
}

#[test]
fn a_peft_loftq_adapter_at_4_bits_rebuilds_its_nf4_base_from_w_and_matches_peft() {
    check("llama_loftq4");
}

#[test]
fn a_peft_loftq_adapter_at_8_bits_on_all_linears_matches_peft() {
    check("llama_loftq8");
}

#[test]
fn a_peft_mica_adapter_loads_its_frozen_b_and_matches_peft() {
    check("llama_mica");
    // only A counts as trained, as PEFT's requires_grad says
    let mut m = model("llama");
    let dir = root().join("adapters").join("llama_mica");
    petal_io::attach_adapter(&mut m, &dir, "default").unwrap();
    let trained: usize = m
        .linears()
        .iter()
        .filter_map(|l| l.layer("default"))
        .flat_map(|l| l.vars())
        .map(|v| v.elem_count())
        .sum();
    // k_proj (4 x 32) and up_proj (4 x 32) in each of the 2 layers
    assert_eq!(trained, 2 * (4 * 32 + 4 * 32));
}
