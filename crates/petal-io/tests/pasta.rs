//! PASTA against tools/golden/pasta_oracle.py: the official mechanism (luka-group/PASTA,
//! `PASTA_modeling.py`) transcribed onto transformers' BERT and Llama through forward
//! pre-hooks on each layer. Slots, hidden states and logits, on the tiny BERT (occurrence and
//! token slots) and the tiny Llama (token slots, also decoding with a cache).

use candle_core::{DType, Device, Tensor};
use petal_core::config::AdapterConfig;
use petal_core::{inject_adapter, Adaptable, Ctx};
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

fn fixture(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(golden().join(name), &Device::Cpu).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-12)) as f64
}

fn pasta(special: &[u32], slots: &str, n: usize) -> AdapterConfig {
    let mut c = AdapterConfig::new("PASTA").unwrap();
    c.set("special_tokens", special).unwrap();
    c.set("slots", slots).unwrap();
    c.set("num_slots", n).unwrap();
    c
}

/// Each position's slot (-1: none) from the adapter's one-hot.
fn slot_ids(model: &dyn Adaptable, ids: &Tensor) -> Vec<i64> {
    let (_, a) = model.input_adapter().unwrap();
    let oh: Vec<Vec<f32>> = a.token_slots(ids, 0).unwrap().unwrap().to_vec2().unwrap();
    oh.iter()
        .map(|r| r.iter().position(|&v| v == 1.0).map_or(-1, |i| i as i64))
        .collect()
}

#[test]
fn bert_with_pasta_equals_the_official_mechanism_in_slots_hidden_states_and_logits() {
    let base = fixture("bert_seqcls.safetensors");
    let t = fixture("pasta.safetensors");
    for (key, special, slots, n) in [
        ("bert", vec![2u32, 3], "occurrence", 3),
        ("bert_token", vec![2u32, 3], "token", 2),
    ] {
        let p = golden().join("bert");
        let mut e = petal_io::load_encoder(
            p.to_str().unwrap(),
            Some(3),
            0,
            DType::F32.into(),
            &Device::Cpu,
        )
        .unwrap();
        inject_adapter(&mut e.model, "default", &pasta(&special, slots, n), 0).unwrap();
        let (_, a) = e.model.input_adapter().unwrap();
        a.set_prefix(&t[&format!("{key}.E")]).unwrap();
        let ids = base["input_ids"].to_dtype(DType::U32).unwrap();
        let want: Vec<i64> = t[&format!("{key}.slots")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(slot_ids(&e.model, &ids), want, "{key}: slots");
        let rows: Vec<Vec<u32>> = ids.to_vec2().unwrap();
        let types: Vec<u32> = rows
            .iter()
            .flat_map(|r| petal_models::segments(r, e.sep_id))
            .collect();
        let types = Tensor::from_vec(types, ids.dims(), &Device::Cpu).unwrap();
        let mask = base["attention_mask"].to_dtype(DType::F32).unwrap();
        let logits = e.model.logits(&ids, &types, &mask, &Ctx::eval()).unwrap();
        let err = max_rel(&logits, &t[&format!("{key}.logits")]);
        assert!(err < 1e-5, "{key}: logits {err:e}");
        assert!(
            max_rel(&logits, &base["base.logits"]) > 1e-2,
            "{key}: PASTA matters"
        );
    }
}

#[test]
fn llama_with_pasta_equals_the_official_mechanism_and_decodes_with_a_cache_alike() {
    let t = fixture("pasta.safetensors");
    let p = golden().join("llama");
    let mut m = petal_io::load_model(p.to_str().unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    inject_adapter(&mut m, "default", &pasta(&[1, 2], "token", 3), 0).unwrap();
    m.input_adapter()
        .unwrap()
        .1
        .set_prefix(&t["llama.E"])
        .unwrap();
    let ids = t["llama.ids"].to_dtype(DType::U32).unwrap();
    let want: Vec<i64> = t["llama.slots"].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(slot_ids(&m, &ids), want, "slots");
    let logits = m.forward(&ids, None, &Ctx::eval()).unwrap();
    let err = max_rel(&logits, &t["llama.logits"]);
    assert!(err < 1e-5, "logits {err:e}");
    // one token at a time through the cache: the same logits (token slots need no history)
    let mut cache = m.new_cache();
    let row = ids.narrow(0, 0, 1).unwrap();
    let mut steps = Vec::new();
    for i in 0..8 {
        let one = row.narrow(1, i, 1).unwrap();
        steps.push(m.forward(&one, Some(&mut cache), &Ctx::eval()).unwrap());
    }
    let stepped = Tensor::cat(&steps, 1).unwrap();
    let full = logits.narrow(0, 0, 1).unwrap();
    assert!(max_rel(&stepped, &full) < 1e-5, "cached decoding");
}
