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
