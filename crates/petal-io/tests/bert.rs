//! The BERT encoder against transformers (tools/golden/make_bert_fixtures.py): hidden states,
//! pooler and classification logits of the tiny random BERT in both file layouts, the
//! tokenizer's ids and token types, and PEFT's sequence-classification adapters (LoRA, IA3,
//! LoHa, each with its trained classifier) giving PEFT's logits.

use candle_core::{DType, Device, Tensor};
use petal_core::Ctx;
use petal_io::{attach_adapter, load_encoder, LoadedEncoder};
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

fn fixture() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(golden().join("bert_seqcls.safetensors"), &Device::Cpu).unwrap()
}

fn encoder(dir: &str) -> LoadedEncoder {
    let p = golden().join(dir);
    load_encoder(
        p.to_str().unwrap(),
        Some(3),
        0,
        DType::F32.into(),
        &Device::Cpu,
    )
    .unwrap()
}

/// ids, token types (from the ids) and mask of the fixture's batch.
fn inputs(e: &LoadedEncoder, t: &std::collections::HashMap<String, Tensor>) -> [Tensor; 3] {
    let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
    let rows: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    let types: Vec<u32> = rows
        .iter()
        .flat_map(|r| petal_models::segments(r, e.sep_id))
        .collect();
    let mask = t["attention_mask"].to_dtype(DType::F32).unwrap();
    let types = Tensor::from_vec(types, ids.dims(), &Device::Cpu).unwrap();
    [ids, types, mask]
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-12)) as f64
}

#[test]
fn hidden_states_pooler_and_logits_equal_transformers_in_both_file_layouts() {
    let t = fixture();
    for dir in ["bert", "bert_minilm_names"] {
        let e = encoder(dir);
        let [ids, types, mask] = inputs(&e, &t);
        let h = e
            .model
            .hidden_states(&ids, &types, &mask, &Ctx::eval())
            .unwrap();
        // padded positions differ by design (transformers' too): compare real tokens only
        let m = mask.unsqueeze(2).unwrap();
        let err = max_rel(
            &h.broadcast_mul(&m).unwrap(),
            &t["base.hidden"].broadcast_mul(&m).unwrap(),
        );
        assert!(err < 1e-5, "{dir}: hidden {err:e}");
        let pooled = e.model.pooled(&h, &Ctx::eval()).unwrap();
        assert!(max_rel(&pooled, &t["base.pooled"]) < 1e-5, "{dir}: pooled");
        if dir == "bert" {
            let logits = e.model.logits(&ids, &types, &mask, &Ctx::eval()).unwrap();
            let err = max_rel(&logits, &t["base.logits"]);
            assert!(err < 1e-5, "logits {err:e}");
        }
    }
}

#[test]
fn the_tokenizer_gives_transformers_ids_and_token_types() {
    let e = encoder("bert");
    let t = fixture();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden().join("bert_seqcls.json")).unwrap()).unwrap();
    let types: Vec<Vec<i64>> = t["token_type_ids"].to_vec2().unwrap();
    for (i, case) in json["texts"].as_array().unwrap().iter().enumerate() {
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let (ids, ty) = e
            .tokenizer
            .encode_classification(
                case["text"].as_str().unwrap(),
                case["text_pair"].as_str(),
                512,
            )
            .unwrap();
        assert_eq!(ids, want, "case {i}");
        let want_types: Vec<u32> = types[i][..ids.len()].iter().map(|&v| v as u32).collect();
        assert_eq!(ty, want_types, "case {i}: token types");
        assert_eq!(
            petal_models::segments(&ids, e.sep_id),
            ty,
            "case {i}: derived"
        );
    }
    // truncated pairs (tools/golden/make_bert_truncation.py): transformers' "longest_first"
    let cut: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(golden().join("bert_truncation.json")).unwrap())
            .unwrap();
    assert!(cut.iter().any(|c| c["text_pair"].is_string()));
    let ints = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for c in &cut {
        let n = c["max_length"].as_u64().unwrap() as usize;
        let (ids, ty) = e
            .tokenizer
            .encode_classification(c["text"].as_str().unwrap(), c["text_pair"].as_str(), n)
            .unwrap();
        assert_eq!(ids, ints(&c["ids"]), "{c}");
        assert_eq!(ty, ints(&c["token_type_ids"]), "{c}: token types");
    }
    // a length that leaves no room beside the special tokens is refused, naming the flag
    let e = e
        .tokenizer
        .encode_classification("a b", Some("c"), 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--seq-len") && e.contains("at least 4"), "{e}");
}

#[test]
fn peft_sequence_classification_adapters_give_peft_logits() {
    let t = fixture();
    for name in ["lora", "ia3", "loha"] {
        let mut e = encoder("bert");
        let [ids, types, mask] = inputs(&e, &t);
        let before = e.model.logits(&ids, &types, &mask, &Ctx::eval()).unwrap();
        attach_adapter(
            &mut e.model,
            &golden().join(format!("bert_{name}")),
            "default",
        )
        .unwrap();
        let got = e.model.logits(&ids, &types, &mask, &Ctx::eval()).unwrap();
        let want = &t[&format!("bert_{name}.logits")];
        let err = max_rel(&got, want);
        assert!(err < 1e-5, "{name}: {err:e}");
        assert!(max_rel(&before, want) > 1e-2, "{name}: the adapter matters");
    }
}

#[test]
fn a_decoder_folder_is_refused_naming_model_type() {
    let p = golden().join("llama");
    let e = load_encoder(
        p.to_str().unwrap(),
        None,
        0,
        DType::F32.into(),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("model_type") && e.contains("`llama`"), "{e}");
}
