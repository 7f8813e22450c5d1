//! GGUF export read back by petal's own GGUF reader: a merged model (`write_model`) gives the
//! logits of the model with its adapter attached, and a LoRA in llama.cpp's layout
//! (`write_lora` / `read_lora`) attaches as the PEFT folder does. Both for qwen2 (rows as in
//! the HF model) and for the llama architecture (Mistral: q/k rows permuted in the file, and
//! back). llama.cpp itself reads the same files in `tools/gguf/check.sh` (not a test: it
//! builds llama.cpp).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{golden, plain_bpe};
use petal_core::config::Targets;
use petal_core::{inject, AdapterConfig, Ctx};
use petal_data::tokenizer::BpeParts;
use petal_io::gguf_out::{read_lora, write_lora, write_model};
use petal_ops::quant::GgmlDType;

fn logits(m: &petal_models::Llama) -> Tensor {
    let ids = Tensor::new(&[[1u32, 5, 9, 14, 20, 33, 2, 71]], &Device::Cpu).unwrap();
    m.forward(&ids, None, &Ctx::eval()).unwrap()
}

fn load(p: &std::path::Path) -> petal_io::LoadedModel {
    petal_io::load_model(p.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap()
}

/// The model with its adapter, merged and written as GGUF (f32, and q8_0), read back.
fn merged_round_trip(mut lm: petal_io::LoadedModel, tok: &BpeParts) {
    let want = logits(&lm.model);
    inject::merge_and_unload_all(&mut lm.model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (ty, tol) in [(GgmlDType::F32, 1e-5), (GgmlDType::Q8_0, 3e-2)] {
        let path = dir.path().join("m.gguf");
        let tensors = lm.model.named_base_tensors().unwrap();
        write_model(&path, &lm.model.cfg, tensors, Default::default(), tok, ty).unwrap();
        let back = load(&path);
        let d = petal_ops::testing::max_rel(&logits(&back.model), &want);
        assert!(d < tol, "{ty:?}: {d}");
        assert_eq!(back.tokenizer.eos_id, tok.eos_id);
    }
}

#[test]
fn a_merged_qwen2_gguf_gives_the_adapted_models_logits() {
    let mut lm = load(&golden().join("qwen2.gguf"));
    petal_io::attach_adapter(
        &mut lm.model,
        &golden().join("adapters/qwen2_lora_all_linear"),
        "a",
    )
    .unwrap();
    let tok = lm.tokenizer.to_bpe_parts().unwrap();
    merged_round_trip(lm, &tok);
}

#[test]
fn a_merged_llama_architecture_gguf_permutes_q_and_k_and_reads_back() {
    // Mistral is written as GGUF's `llama`: q/k rows permuted on the way out, undone on read
    let mut lm = load(&golden().join("mistral"));
    let mut cfg = AdapterConfig::lora(4, 8.0, Targets::Regex("all-linear".into()));
    cfg.set("init_lora_weights", false).unwrap(); // B not zero: the adapter shows
    inject::inject_adapter(&mut lm.model, "a", &cfg, 3).unwrap();
    let vocab = lm.model.cfg.vocab_size;
    merged_round_trip(lm, &plain_bpe(vocab));
}

#[test]
fn a_lora_in_llama_cpps_layout_attaches_as_the_peft_folder_does() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("qwen2.gguf", Some("adapters/qwen2_lora_all_linear"), false),
        ("mistral", None, false),
        ("mistral", None, true), // rsLoRA: its scale folded into B
    ];
    for (model, adapter, rslora) in cases {
        let mut lm = load(&golden().join(model));
        let cfg = match adapter {
            Some(a) => {
                petal_io::attach_adapter(&mut lm.model, &golden().join(a), "a")
                    .unwrap()
                    .0
            }
            None => {
                let mut cfg = AdapterConfig::lora(4, 8.0, Targets::Regex("all-linear".into()));
                cfg.set("init_lora_weights", false).unwrap();
                cfg.set("use_rslora", rslora).unwrap();
                inject::inject_adapter(&mut lm.model, "a", &cfg, 3).unwrap();
                cfg
            }
        };
        let want = logits(&lm.model);
        let tensors = petal_io::adapter_tensors(&lm.model, "a");
        let path = dir.path().join("lora.gguf");
        write_lora(&path, &lm.model.cfg, &cfg, &tensors, GgmlDType::F32).unwrap();
        let (read_cfg, read) = read_lora(&path, &Device::Cpu).unwrap();
        assert_eq!(read.len(), tensors.len(), "{model}");
        let mut base = load(&golden().join(model));
        petal_io::attach_adapter(&mut base.model, &path, "a").unwrap();
        let d = petal_ops::testing::max_rel(&logits(&base.model), &want);
        assert!(d < 1e-5, "{model} rslora {rslora}: {d} ({read_cfg:?})");
    }
}

#[test]
fn gguf_export_refuses_what_llama_cpp_has_no_form_for() {
    let lm = load(&golden().join("qwen2.gguf"));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AdapterConfig::lora(4, 8.0, Targets::Regex("all-linear".into()));
    cfg.set("use_dora", true).unwrap();
    let e = write_lora(
        &dir.path().join("x.gguf"),
        &lm.model.cfg,
        &cfg,
        &Default::default(),
        GgmlDType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("DoRA"), "{e}");
    let e = petal_io::gguf_out::out_type("nf4").unwrap_err().to_string();
    assert!(
        e.contains("nf4") && e.contains("q8_0") && e.contains("NF4"),
        "{e}"
    );
    assert!(!dir.path().join("x.gguf").exists(), "nothing written");
}

#[test]
fn an_l4q_model_is_written_as_its_own_q4_1_codes() {
    // L4Q at 4 bits in groups of 32: the merged weights are Q4_1 blocks value for value, so the
    // GGUF file holds the adapter's codes, steps and offsets (q/k rows permuted for `llama`)
    use petal_core::Adaptable;
    let mut lm = load(&golden().join("mistral"));
    // every linear whose 32 input features make one group (down_proj's 48 do not)
    let targets = Targets::List(
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
        ]
        .map(String::from)
        .to_vec(),
    );
    let mut cfg = AdapterConfig::for_method("l4q", 4, 8.0, targets);
    cfg.set("init_weights", false).unwrap();
    inject::inject_adapter(&mut lm.model, "a", &cfg, 5).unwrap();
    let mut grids = std::collections::HashMap::new();
    for l in lm.model.linears() {
        if let Some(g) = l.layer("a").and_then(|layer| layer.grid().unwrap()) {
            grids.insert(format!("{}.weight", l.path()), g);
        }
    }
    assert!(grids.len() >= 10, "{} grids", grids.len());
    inject::merge_and_unload_all(&mut lm.model).unwrap();
    let merged: std::collections::HashMap<String, Tensor> =
        lm.model.named_base_tensors().unwrap().into_iter().collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l4q.gguf");
    let tensors = lm.model.named_base_tensors().unwrap();
    let vocab = lm.model.cfg.vocab_size;
    write_model(
        &path,
        &lm.model.cfg,
        tensors,
        grids.clone(),
        &plain_bpe(vocab),
        GgmlDType::Q4_1,
    )
    .unwrap();
    let back = petal_io::gguf::read(&path, false).unwrap();
    use petal_models::weights::WeightSource;
    for name in grids.keys() {
        let want = &merged[name];
        let got = back
            .weights
            .get(name, None, DType::F32, &Device::Cpu)
            .unwrap();
        let d = petal_ops::testing::max_rel(&got, want);
        assert!(d < 1e-6, "{name}: {d}");
    }
}

#[test]
fn llama3_rope_scaling_is_written_as_llama_cpps_factors_and_read_back() {
    // the tiny Llama (head_dim 8: frequencies 1, 0.1, 0.01, 0.001) with llama3 scaling whose
    // thresholds put three frequencies on the ramp and one above it
    let dir = tempfile::tempdir().unwrap();
    let folder = |name: &str, rope: serde_json::Value| {
        let out = dir.path().join(name);
        std::fs::create_dir(&out).unwrap();
        for f in [
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::fs::copy(golden().join("llama").join(f), out.join(f)).unwrap();
        }
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(golden().join("llama/config.json")).unwrap(),
        )
        .unwrap();
        cfg["rope_parameters"] = rope;
        std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
        load(&out)
    };
    let lm = folder(
        "scaled",
        serde_json::json!({"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 200.0,
            "original_max_position_embeddings": 1000}),
    );
    let plain = folder(
        "plain",
        serde_json::json!({"rope_theta": 10000.0, "rope_type": "default"}),
    );
    let want = logits(&lm.model);
    let d = petal_ops::testing::max_rel(&want, &logits(&plain.model));
    assert!(d > 1e-3, "the scaling shows: {d}");
    let path = dir.path().join("m.gguf");
    let tensors = lm.model.named_base_tensors().unwrap();
    let vocab = lm.model.cfg.vocab_size;
    write_model(
        &path,
        &lm.model.cfg,
        tensors,
        Default::default(),
        &plain_bpe(vocab),
        GgmlDType::F32,
    )
    .unwrap();
    let back = load(&path);
    let s = back.model.cfg.rope_scaling.clone().unwrap();
    assert_eq!((s.factor, s.original_max_position_embeddings), (8.0, 1000));
    assert!((s.high_freq_factor - 200.0).abs() < 1e-3, "{s:?}");
    let d = petal_ops::testing::max_rel(&logits(&back.model), &want);
    assert!(d < 1e-5, "{d}");
}
