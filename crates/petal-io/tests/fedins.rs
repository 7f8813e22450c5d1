//! FedIns against tools/golden/fedins_oracle.py: the official code's mechanism (frozen query
//! pass, cosine top-k over shared keys, the mean of the chosen SSF entries after every linear,
//! the key surrogate) transcribed onto transformers' tiny BERT classifier. Logits, the
//! surrogate, and the gradients of every pool tensor and the keys; then the adapter saved and
//! loaded back gives the same logits.

use candle_core::{DType, Device, Tensor};
use petal_core::config::{AdapterConfig, Targets};
use petal_core::methods::fedins;
use petal_core::{inject_adapter, Ctx};
use petal_io::{load_encoder, LoadedEncoder};
use std::collections::HashMap;
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

fn fixture(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden().join(name), &Device::Cpu).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-12)) as f64
}

fn encoder() -> LoadedEncoder {
    let p = golden().join("bert");
    load_encoder(
        p.to_str().unwrap(),
        Some(3),
        0,
        DType::F32.into(),
        &Device::Cpu,
    )
    .unwrap()
}

fn config() -> AdapterConfig {
    let mut c = AdapterConfig::new("FEDINS").unwrap();
    c.target_modules = Some(Targets::Regex("all-linear".into()));
    c.set("pool_size", 4).unwrap();
    c.set("top_k", 2).unwrap();
    c.set("query_dim", 32).unwrap();
    c
}

/// The fixture's pool and keys under petal's module-relative names.
fn adapter(t: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    t.iter()
        .filter(|(k, _)| k.contains(".fedins_") && !k.starts_with("grad."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain([(
            "base_model.fedins_keys".to_string(),
            t["fedins_keys"].clone(),
        )])
        .collect()
}

fn inputs(e: &LoadedEncoder) -> [Tensor; 3] {
    let base = fixture("bert_seqcls.safetensors");
    let ids = base["input_ids"].to_dtype(DType::U32).unwrap();
    let rows: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    let types: Vec<u32> = rows
        .iter()
        .flat_map(|r| petal_models::segments(r, e.sep_id))
        .collect();
    let types = Tensor::from_vec(types, ids.dims(), &Device::Cpu).unwrap();
    [
        ids,
        types,
        base["attention_mask"].to_dtype(DType::F32).unwrap(),
    ]
}

/// Mean cross-entropy of `logits` (b, c) against `labels`.
fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Tensor {
    let lse = logits.exp().unwrap().sum(1).unwrap().log().unwrap();
    let idx = Tensor::from_vec(labels.to_vec(), (labels.len(), 1), &Device::Cpu).unwrap();
    let picked = logits.gather(&idx, 1).unwrap().squeeze(1).unwrap();
    (lse - picked).unwrap().mean_all().unwrap()
}

#[test]
fn bert_with_fedins_equals_the_official_mechanism_in_logits_surrogate_and_gradients() {
    // each row its own entries; the head left as it is
    let mut c = config();
    c.set("pool_heads", false).unwrap();
    check_against("fedins.safetensors", &c, 2 * 13 + 1);
}

#[test]
fn with_the_official_batch_mixing_and_head_pool_fedins_equals_the_official_code() {
    // the official code's get_top_ssf and forward_head: the batch's chosen entries averaged,
    // the classifier replaced by the mean of the chosen heads
    let mut c = config();
    c.set("mix", "batch").unwrap();
    c.modules_to_save = Some(vec!["classifier".into()]);
    check_against("fedins_heads.safetensors", &c, 2 * 13 + 2 + 1);
}

/// FedIns by `cfg` on the tiny BERT classifier with the pool and keys of the fixture `name`:
/// logits, surrogate and the gradients of its `tensors` adapter tensors equal the fixture's;
/// saved and loaded back, the same logits.
fn check_against(name: &str, cfg: &AdapterConfig, tensors: usize) {
    let t = fixture(name);
    let mut e = encoder();
    inject_adapter(&mut e.model, "default", cfg, 0).unwrap();
    // every tensor of the transcription lands on a module petal targets, and back
    petal_io::load_into(&e.model, "default", adapter(&t), &golden().join(name)).unwrap();
    let [ids, types, mask] = inputs(&e);
    let logits = e.model.logits(&ids, &types, &mask, &Ctx::train(0)).unwrap();
    let err = max_rel(&logits, &t["logits"]);
    assert!(err < 1e-5, "logits {err:e}");
    let labels: Vec<u32> = t["labels"]
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as u32)
        .collect();
    let s = fedins::surrogate(&e.model, "default", 0.1)
        .unwrap()
        .unwrap();
    let err = max_rel(&s, &t["surrogate"].squeeze(0).unwrap());
    assert!(err < 1e-5, "surrogate {err:e}");
    let total = (cross_entropy(&logits, &labels) + &s).unwrap();
    let grads = total.backward().unwrap();
    let largest = t
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .map(|(_, g)| {
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .fold(0.0, f64::max);
    let mut checked = 0;
    for at in petal_core::walk::adapter_tensors(&e.model, "default") {
        let want_key = format!("grad.{}", at.key.trim_start_matches("base_model."));
        let got = grads
            .get(at.var.as_tensor())
            .expect("a gradient for every tensor");
        // relative to the largest gradient entry of any tensor: the key projection's shift
        // moves every key alike, which the softmax ignores, so its gradient is rounding alone
        let d = (got - &t[&want_key])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        let err = d.to_scalar::<f32>().unwrap() as f64 / largest;
        assert!(err < 1e-5, "{}: gradient {err:e}", at.key);
        checked += 1;
    }
    assert_eq!(
        checked, tensors,
        "13 linears' pools, the keys (and the heads' pool)"
    );

    // saved and loaded back: the same logits
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    petal_io::save_model_adapter(&e.model, "default", cfg, &out).unwrap();
    let mut back = encoder();
    petal_io::attach_adapter(&mut back.model, &out, "default").unwrap();
    let again = back
        .model
        .logits(&ids, &types, &mask, &Ctx::eval())
        .unwrap();
    assert_eq!(max_rel(&again, &logits), 0.0);
}

#[test]
fn a_causal_model_with_fedins_is_refused_naming_the_task_type() {
    let p = golden().join("llama");
    let mut m = petal_io::load_model(p.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let mut c = config();
    c.set("query_dim", m.model.cfg.hidden_size).unwrap();
    inject_adapter(&mut m.model, "default", &c, 0).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let e = m
        .model
        .forward(&ids, None, &Ctx::eval())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--task-type seq-cls") && !e.contains('\n'),
        "{e}"
    );
}
