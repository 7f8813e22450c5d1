//! RoPE scaling types other than llama3 (`linear`, `dynamic`, `yarn`, `longrope`) against
//! transformers 5.24.0 (`tools/golden/make_rope_scaling.py`: its own rope initialisation, and the
//! tiny Qwen2 of the golden fixtures loaded with each scaling): the inverse frequencies, the
//! attention factor and the logits of a 40-token sequence; then each written as GGUF and read
//! back. LongRoPE also within its original context and through a KV cache that crosses it.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{golden, plain_bpe};
use petal_core::Ctx;
use petal_io::gguf_out::write_model;
use petal_models::LlamaConfig;
use petal_ops::quant::GgmlDType;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(golden().join("rope_scaling.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

/// A case's top-level config keys besides the scaling (Phi-3's original_max_position_embeddings).
fn extra(case: &Value) -> serde_json::Map<String, Value> {
    case.get("config_extra")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// The tiny Qwen2's folder with `rope_parameters` replaced and `extra` top-level keys, in `dir`.
fn qwen2_with(dir: &Path, rope: &Value, extra: serde_json::Map<String, Value>) -> PathBuf {
    let out = dir.join("model");
    std::fs::create_dir_all(&out).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(golden().join("qwen2").join(f), out.join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(golden().join("qwen2/config.json")).unwrap())
            .unwrap();
    cfg["rope_parameters"] = rope.clone();
    cfg.as_object_mut().unwrap().extend(extra);
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    out
}

fn load(p: &Path) -> petal_io::LoadedModel {
    petal_io::load_model(p.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap()
}

fn logits(m: &petal_models::Llama, ids: &Tensor) -> Tensor {
    m.forward(ids, None, &Ctx::eval())
        .unwrap()
        .squeeze(0)
        .unwrap()
}

#[test]
fn linear_and_yarn_frequencies_and_attention_factor_equal_transformers() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let head_dim = case["head_dim"].as_u64().unwrap() as usize;
        let mut cfg = serde_json::json!({"model_type": "qwen2", "vocab_size": 96,
            "hidden_size": head_dim * 4, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 4, "head_dim": head_dim,
            "max_position_embeddings": case["max_position_embeddings"],
            "rope_parameters": case["rope_parameters"]});
        cfg.as_object_mut().unwrap().extend(extra(&case));
        let c = LlamaConfig::from_hf_json(&cfg.to_string(), name).unwrap();
        let want: Vec<f32> = serde_json::from_value(case["inv_freq"].clone()).unwrap();
        let got = c.inv_freq();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                ((g - w) / w).abs() < 1e-6,
                "{name}: inv_freq[{i}] {g} vs transformers' {w}"
            );
        }
        // LongRoPE: the long factors' frequencies, taken past the original context
        match (case.get("long_inv_freq"), c.long_inv_freq()) {
            (Some(w), Some((got, original))) => {
                let want: Vec<f32> = serde_json::from_value(w.clone()).unwrap();
                let key = "original_max_position_embeddings";
                let given = extra(&case).get(key).cloned();
                let given = given.unwrap_or_else(|| case["rope_parameters"][key].clone());
                assert_eq!(Some(original as u64), given.as_u64(), "{name}");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        ((g - w) / w).abs() < 1e-6,
                        "{name}: long inv_freq[{i}] {g} vs transformers' {w}"
                    );
                }
            }
            (None, None) => {}
            (w, g) => panic!("{name}: long frequencies {w:?} vs petal's {g:?}"),
        }
        let a = case["attention_factor"].as_f64().unwrap();
        assert!(
            (c.rope_attention_factor() - a).abs() < 1e-9,
            "{name}: attention factor {} vs {a}",
            c.rope_attention_factor()
        );
        // the scaling survives petal's own config.json (a merged model's)
        let back = LlamaConfig::from_hf_json(&c.to_hf_json("float32").to_string(), name).unwrap();
        assert_eq!(back.inv_freq(), got, "{name}");
        let (a, b) = (back.rope_attention_factor(), c.rope_attention_factor());
        assert!((a - b).abs() < 1e-12, "{name}: {a} vs {b}"); // JSON's last digit
        assert_eq!(
            back.rope_scaling.map(|s| s.rope_type),
            c.rope_scaling.map(|s| s.rope_type)
        );
    }
}

#[test]
fn a_qwen2_with_each_rope_scaling_gives_transformers_logits_and_round_trips_gguf() {
    let want =
        candle_core::safetensors::load(golden().join("rope_scaling.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = want["input_ids"].to_dtype(DType::U32).unwrap();
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = load(&qwen2_with(
        plain_dir.path(),
        &serde_json::json!({"rope_theta": 10000.0, "rope_type": "default"}),
        Default::default(),
    ));
    let plain = logits(&plain.model, &ids);
    for case in cases()
        .iter()
        .filter(|c| c["logits"].as_bool() == Some(true))
    {
        let name = case["name"].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let lm = load(&qwen2_with(
            dir.path(),
            &case["rope_parameters"],
            extra(case),
        ));
        let got = logits(&lm.model, &ids);
        let w = &want[&format!("{name}.logits")];
        let d = petal_ops::testing::max_rel(&got, w);
        assert!(d < 1e-4, "{name}: logits differ from transformers' by {d}");
        let shows = petal_ops::testing::max_rel(&plain, w);
        let dynamic = case["rope_parameters"]["rope_type"] == "dynamic";
        // dynamic NTK changes nothing within the context length; the others show
        assert!(
            (shows > 1e-3) != dynamic,
            "{name}: the scaling changes the logits by {shows}"
        );
        // GGUF: llama.cpp's keys, read back to the same model (yarn with a non-default
        // attention factor or no truncation has no key llama.cpp reads one way: refused)
        let path = dir.path().join("m.gguf");
        let tensors = lm.model.named_base_tensors().unwrap();
        let written = write_model(
            &path,
            &lm.model.cfg,
            tensors,
            Default::default(),
            &plain_bpe(lm.model.cfg.vocab_size),
            GgmlDType::F32,
        );
        let rope = &case["rope_parameters"];
        let longrope = rope["rope_type"] == "longrope";
        let expressible = rope.get("attention_factor").is_none()
            && rope.get("mscale").is_none()
            && rope.get("truncate") != Some(&Value::Bool(false))
            && !longrope;
        match written {
            Ok(_) => {
                assert!(expressible, "{name}: written");
                let back = load(&path);
                if !dynamic {
                    assert_eq!(
                        back.model.cfg.rope_scaling, lm.model.cfg.rope_scaling,
                        "{name}"
                    );
                }
                let d = petal_ops::testing::max_rel(&logits(&back.model, &ids), &got);
                assert!(d < 1e-5, "{name}: GGUF read back differs by {d}");
            }
            Err(e) => {
                assert!(!expressible, "{name}: {e}");
                let why = if longrope { "LongRoPE" } else { "YaRN" };
                assert!(e.to_string().contains(why), "{name}: {e}");
                assert!(!path.exists(), "{name}: a refused GGUF was left behind");
            }
        }
    }
}

#[test]
fn longrope_takes_its_short_factors_within_the_original_context_and_switches_in_a_cache_as_transformers_does(
) {
    let want =
        candle_core::safetensors::load(golden().join("rope_scaling.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = want["input_ids"].to_dtype(DType::U32).unwrap();
    let short = 12; // make_rope_scaling.py's SHORT
    for case in cases()
        .iter()
        .filter(|c| c["rope_parameters"]["rope_type"] == "longrope" && c["logits"] == true)
    {
        let name = case["name"].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let m = load(&qwen2_with(
            dir.path(),
            &case["rope_parameters"],
            extra(case),
        ))
        .model;
        // the first tokens alone stay within the original context: the short factors
        let got = logits(&m, &ids.narrow(1, 0, short).unwrap());
        let w = &want[&format!("{name}.logits_short")];
        let d = petal_ops::testing::max_rel(&got, w);
        assert!(
            d < 1e-4,
            "{name}: short logits differ from transformers' by {d}"
        );
        let long = want[&format!("{name}.logits")].narrow(0, 0, short).unwrap();
        let shows = petal_ops::testing::max_rel(&long, w);
        assert!(
            shows > 1e-3,
            "{name}: short and long factors differ by only {shows}"
        );
        // a cache filled within the context, then one token at a time past it: the new
        // tokens take the long factors, the cached keys keep their rotation
        let mut cache = m.new_cache();
        let mut steps = vec![m
            .forward(
                &ids.narrow(1, 0, short).unwrap(),
                Some(&mut cache),
                &Ctx::eval(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap()];
        for i in short..ids.dim(1).unwrap() {
            let step = ids.narrow(1, i, 1).unwrap();
            let l = m.forward(&step, Some(&mut cache), &Ctx::eval()).unwrap();
            steps.push(l.squeeze(0).unwrap());
        }
        let got = Tensor::cat(&steps, 0).unwrap();
        let w = &want[&format!("{name}.logits_decode")];
        let d = petal_ops::testing::max_rel(&got, w);
        assert!(
            d < 1e-4,
            "{name}: cached decoding differs from transformers' by {d}"
        );
        // a prompt read in two parts (a server's chunked prefill) rotates as one pass over it
        let n = ids.dim(1).unwrap();
        let mut cache = m.new_cache();
        cache.set_rope_span(n);
        let parts: Vec<Tensor> = [(0, short), (short, n - short)]
            .iter()
            .map(|&(at, len)| {
                let part = ids.narrow(1, at, len).unwrap();
                let l = m.forward(&part, Some(&mut cache), &Ctx::eval()).unwrap();
                l.squeeze(0).unwrap()
            })
            .collect();
        let got = Tensor::cat(&parts, 0).unwrap();
        let d = petal_ops::testing::max_rel(&got, &want[&format!("{name}.logits")]);
        assert!(
            d < 1e-4,
            "{name}: a prompt read in parts differs from one pass by {d}"
        );
    }
}

#[test]
fn an_unknown_or_incomplete_rope_scaling_is_refused_naming_the_key() {
    let base = serde_json::json!({"model_type": "qwen2", "vocab_size": 96, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4});
    for (rope, key) in [
        (
            serde_json::json!({"rope_type": "mrope", "factor": 2.0}),
            "rope_type",
        ),
        (
            serde_json::json!({"rope_type": "longrope", "factor": 2.0,
                "original_max_position_embeddings": 16, "long_factor": [1.0, 2.0, 3.0, 4.0]}),
            "short_factor",
        ),
        (
            // head_dim 8: four factors, one per frequency
            serde_json::json!({"rope_type": "longrope", "original_max_position_embeddings": 16,
                "short_factor": [1.0, 1.0, 1.0, 1.0], "long_factor": [1.0, 2.0, 3.0]}),
            "long_factor",
        ),
        (
            serde_json::json!({"rope_type": "longrope", "original_max_position_embeddings": 16,
                "short_factor": [1.0, 1.0, 1.0, 1.0], "long_factor": [1.0, 2.0, 3.0, -4.0]}),
            "long_factor",
        ),
        (
            serde_json::json!({"rope_type": "linear", "factor": 0.0}),
            "factor",
        ),
        (serde_json::json!({"rope_type": "linear"}), "factor"),
    ] {
        let mut c = base.clone();
        c["rope_scaling"] = rope.clone();
        let e = LlamaConfig::from_hf_json(&c.to_string(), "config.json")
            .expect_err(&rope.to_string())
            .to_string();
        assert!(e.contains("config.json") && e.contains(key), "{rope}: {e}");
    }
}
