//! Mixed-adapter batches (each row through its own adapter, `petal_core::rows_ctx`)
//! against PEFT's `adapter_names` (tests/fixtures/golden/mixed_batch.*, made by
//! tools/golden/make_fixtures.py with PEFT 0.21.2), and against each adapter run alone for the
//! methods PEFT does not mix.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::{model, root};
use petal_core::inject::set_active;
use petal_core::Adaptable;
use petal_models::Llama;
use petal_ops::testing::max_rel;
use std::collections::HashMap;

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(root().join("mixed_batch.safetensors"), &Device::Cpu).unwrap()
}

fn ids() -> Tensor {
    golden()["input_ids"].to_dtype(DType::U32).unwrap()
}

fn attach(m: &mut Llama, name: &str, folder: &str) {
    petal_io::attach_adapter(m, &root().join("adapters").join(folder), name).unwrap();
}

/// `f` run with the context of a mixed batch whose row i goes through adapter `rows[i]`.
fn with_rows<T>(
    m: &Llama,
    rows: &[&str],
    f: impl FnOnce(&petal_core::Ctx) -> petal_core::Result<T>,
) -> petal_core::Result<T> {
    f(&petal_core::rows_ctx(m, rows)?)
}

fn mixed_logits(m: &Llama, ids: &Tensor, rows: &[&str]) -> Tensor {
    with_rows(m, rows, |c| m.forward(ids, None, c)).unwrap()
}

#[test]
fn mixed_adapter_batches_match_peft_adapter_names_with_lora_embeddings_and_head_copies() {
    let text = std::fs::read_to_string(root().join("mixed_batch.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = cases.as_object().unwrap();
    assert_eq!(cases.len(), 3);
    let golden = golden();
    for (case, c) in cases {
        let mut m = model(c["base"].as_str().unwrap());
        for (name, folder) in c["adapters"].as_object().unwrap() {
            attach(&mut m, name, folder.as_str().unwrap());
        }
        let rows: Vec<&str> = c["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        let got = mixed_logits(&m, &ids(), &rows);
        let want = &golden[case.as_str()];
        assert_eq!(got.dims(), want.dims());
        let e = max_rel(&got, want);
        assert!(e < 1e-4, "{case}: relative error {e:e}");
        // and the rows differ: each adapter changes the logits of its rows
        let base = with_rows(&m, &vec!["__base__"; rows.len()], |c| {
            m.forward(&ids(), None, c)
        })
        .unwrap();
        for (i, r) in rows.iter().enumerate() {
            let d = max_rel(&got.i(i).unwrap(), &base.i(i).unwrap());
            if *r == "__base__" {
                assert!(d == 0.0, "{case}: base row {i} moved by {d:e}");
            } else {
                assert!(d > 1e-3, "{case}: row {i} ({r}) equals the base model's");
            }
        }
    }
}

/// (name, golden adapter folder on the tiny Llama) for every method that acts on linears.
const METHODS: [(&str, &str); 9] = [
    ("lora", "llama_lora_qv"),
    ("dora", "llama_dora"),
    ("loha", "llama_loha_all_linear"),
    ("lokr", "llama_lokr_all_linear"),
    ("ia3", "llama_ia3"),
    ("oft", "llama_oft_neumann"),
    ("boft", "llama_boft"),
    ("road", "llama_road_1"),
    ("vera", "llama_vera"),
];

#[test]
fn every_row_of_a_mixed_batch_equals_its_adapter_run_alone_for_every_linear_method() {
    let mut m = model("llama");
    for (name, folder) in METHODS {
        attach(&mut m, name, folder);
    }
    // ten rows: each method once, then the base model, over the golden ids repeated
    let ids = ids();
    let ids = Tensor::cat(&[&ids, &ids], 0).unwrap();
    let mut rows: Vec<&str> = METHODS.iter().map(|(n, _)| *n).collect();
    rows.push("__base__");
    let got = mixed_logits(&m, &ids, &rows);
    for (i, name) in rows.iter().enumerate() {
        let alone = if *name == "__base__" {
            set_active(&mut m, &[]);
            m.forward(&ids, None, &petal_core::Ctx::eval()).unwrap()
        } else {
            set_active(&mut m, &[name]);
            m.forward(&ids, None, &petal_core::Ctx::eval()).unwrap()
        };
        let e = max_rel(&got.i(i).unwrap(), &alone.i(i).unwrap());
        assert!(e < 1e-5, "row {i} ({name}): relative error {e:e}");
    }
}

#[test]
fn a_mixed_batch_decoded_through_the_kv_cache_equals_its_full_forward() {
    let mut m = model("qwen2");
    attach(&mut m, "a", "qwen2_lora_all_linear");
    attach(&mut m, "c", "qwen2_lora_embedding_tied");
    let ids = ids().narrow(0, 0, 3).unwrap();
    let rows = ["c", "__base__", "a"];
    let full = mixed_logits(&m, &ids, &rows);
    let mut cache = m.new_cache();
    let step = |cache: &mut petal_models::KvCache, from: usize, n: usize| {
        let x = ids.narrow(1, from, n).unwrap();
        with_rows(&m, &rows, |c| m.forward(&x, Some(cache), c)).unwrap()
    };
    let first = step(&mut cache, 0, 5);
    let mut parts = vec![first];
    for t in 5..8 {
        parts.push(step(&mut cache, t, 1));
    }
    let cached = Tensor::cat(&parts, 1).unwrap();
    let e = max_rel(&cached, &full);
    assert!(e < 1e-4, "relative error {e:e}");
    // the cache keeps values, not the graph of the passes that made them (the adapters'
    // weights are variables: a graph kept there grew by every step's activations, ~270 MB/s
    // in a server decoding 16 mixed-adapter requests)
    for i in 0..m.cfg.num_hidden_layers {
        let (k, v) = cache.layer(i).unwrap();
        assert!(
            !k.track_op() && !v.track_op(),
            "layer {i}: the cache holds a graph"
        );
    }
}

#[test]
fn mixed_batches_refuse_unknown_names_wrong_row_counts_training_and_merged_adapters() {
    let mut m = model("llama");
    attach(&mut m, "q", "llama_lora_qv");
    let ids = ids().narrow(0, 0, 2).unwrap();
    let err = |r: petal_core::Result<Tensor>| r.unwrap_err().to_string();
    let e = err(with_rows(&m, &["q", "nope"], |c| m.forward(&ids, None, c)));
    assert!(e.contains("no adapter `nope`") && e.contains("q"), "{e}");
    let e = err(with_rows(&m, &["q"], |c| m.forward(&ids, None, c)));
    assert!(e.contains("1 adapter names for a batch of 2 rows"), "{e}");
    // a training pass cannot carry rows: `Ctx::train` has none, `rows_ctx` is inference only
    // the context ends with the call, even after an error: a plain forward afterwards is the
    // active adapter's
    set_active(&mut m, &["q"]);
    let plain = m.forward(&ids, None, &petal_core::Ctx::eval()).unwrap();
    let rows = with_rows(&m, &["q", "q"], |c| m.forward(&ids, None, c)).unwrap();
    assert!(max_rel(&plain, &rows) < 1e-6);
    for l in m.linears_mut() {
        if l.layer("q").is_some() {
            l.merge("q", true).unwrap();
        }
    }
    let e = err(with_rows(&m, &["q", "__base__"], |c| {
        m.forward(&ids, None, c)
    }));
    assert!(e.contains("merged") && e.contains("unmerge"), "{e}");
    let mut p = model("llama");
    attach(&mut p, "p", "llama_prompt_tuning");
    let e = err(with_rows(&p, &["p", "__base__"], |c| {
        p.forward(&ids, None, c)
    }));
    assert!(e.contains("prompt learning"), "{e}");
}

/// The mixtures (MoV, MoLoRA, SiRA), far from the identity, in one batch with the base model:
/// each row equals its adapter run alone (routing is per token, and SiRA's capacity binds in
/// training only, so a row does not depend on the others).
#[test]
fn every_row_of_a_mixed_batch_equals_its_mixture_of_experts_run_alone() {
    let mut m = model("llama");
    for name in ["mov", "molora", "sira"] {
        let mut cfg = petal_core::AdapterConfig::for_method(
            name,
            2,
            4.0,
            petal_core::config::Targets::Regex("all-linear".into()),
        );
        cfg.set_init_nonzero();
        if name == "mov" {
            cfg.set("feedforward_modules", ["down_proj"]).unwrap();
        }
        petal_core::inject_adapter(&mut m, name, &cfg, 7).unwrap();
    }
    let ids = ids();
    let rows = ["mov", "molora", "sira", "__base__", "molora"];
    assert_eq!(ids.dim(0).unwrap(), rows.len());
    let got = mixed_logits(&m, &ids, &rows);
    for (i, name) in rows.iter().enumerate() {
        let names: Vec<&str> = if *name == "__base__" {
            vec![]
        } else {
            vec![name]
        };
        set_active(&mut m, &names);
        let alone = m.forward(&ids, None, &petal_core::Ctx::eval()).unwrap();
        let e = max_rel(&got.i(i).unwrap(), &alone.i(i).unwrap());
        assert!(e < 1e-5, "row {i} ({name}): relative error {e:e}");
        if *name != "__base__" {
            set_active(&mut m, &[]);
            let base = m.forward(&ids, None, &petal_core::Ctx::eval()).unwrap();
            let d = max_rel(&got.i(i).unwrap(), &base.i(i).unwrap());
            assert!(d > 1e-3, "row {i} ({name}) equals the base model's");
        }
    }
}
