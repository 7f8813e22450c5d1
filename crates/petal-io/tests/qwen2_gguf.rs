//! A qwen2-architecture GGUF (tools/golden/make_qwen2_gguf.py: the tiny random Qwen2 fixture
//! laid out as llama.cpp's converter writes it, checked there to give transformers the HF
//! folder's logits exactly): petal reads it into the same model as the HF folder, q/k/v biases
//! and unpermuted q/k rows included, with its tokenizer and chat template from the metadata.

use candle_core::{DType, Device, Tensor};
use petal_core::Ctx;
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

#[test]
fn a_qwen2_gguf_gives_the_hf_folder_s_logits() {
    let load =
        |p: PathBuf| petal_io::load_model(p.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let gguf = load(golden().join("qwen2.gguf"));
    let folder = load(golden().join("qwen2"));
    assert_eq!(gguf.model.cfg.model_type, "qwen2");
    assert!(gguf.model.cfg.attention_bias, "q/k/v biases");
    let ids = Tensor::new(&[[1u32, 5, 9, 14, 20, 33, 2, 71]], &Device::Cpu).unwrap();
    let a = gguf.model.forward(&ids, None, &Ctx::eval()).unwrap();
    let b = folder.model.forward(&ids, None, &Ctx::eval()).unwrap();
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "{d}");
    let tok = &gguf.tokenizer;
    assert_eq!((tok.bos_id, tok.eos_id), (Some(1), Some(2)));
    assert!(
        tok.chat_template.is_some(),
        "chat template from the metadata"
    );
    // the toy vocabulary has no merges, so only decoding shows the tokens came through
    assert_eq!(tok.decode(&[5, 17], false).unwrap(), "w5w17");
}

/// The same weights with rope θ 1e6 and a context of 128 (tools/golden/make_qwen2_gguf.py's
/// `theta_variant`; a reader that dropped either key would fall back to 10000 and 2048): petal
/// reads both and gives the logits transformers gives for that file.
#[test]
fn a_gguf_s_rope_theta_and_context_length_are_read() {
    let lm = petal_io::load_model(
        golden().join("qwen2_theta.gguf").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(lm.model.cfg.rope_theta, 1e6);
    assert_eq!(lm.model.cfg.max_position_embeddings, 128);
    let want = candle_core::safetensors::load(
        golden().join("qwen2_theta_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = want["input_ids"].to_dtype(DType::U32).unwrap();
    let got = lm.model.forward(&ids, None, &Ctx::eval()).unwrap();
    let e = petal_ops::testing::max_rel(&got, &want["logits"]);
    assert!(e < 1e-4, "relative error {e:e}");
}
