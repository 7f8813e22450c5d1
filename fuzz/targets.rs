//! The fuzz targets: each reads bytes as a file a user hands petal (a GGUF model, an adapter's
//! safetensors, adapter_config.json, a model's config.json, JSONL training data) through the
//! same code the commands use. A target may meet an error (it returns whether the input was
//! read through); it must not panic, abort or allocate far past its input. Shared by the cargo-fuzz binaries (`fuzz/fuzz_targets/`) and
//! petal-io's `tests/fuzz_corpus.rs`, which replays the saved corpus and regressions on stable.

#![allow(dead_code)]

use candle_core::{DType, Device};
use petal_core::{AdapterConfig, MemoryLimit};
use petal_models::WeightSource;
use std::path::{Path, PathBuf};

/// The targets by name, as the corpus folders are named.
pub const TARGETS: [(&str, fn(&[u8]) -> bool); 5] = [
    ("gguf", gguf),
    ("adapter_safetensors", adapter_safetensors),
    ("adapter_config", adapter_config),
    ("model_config", model_config),
    ("jsonl_data", jsonl_data),
];

/// A memory limit far below the machine's: a fuzzed config must be refused, not allocated.
fn limit() -> MemoryLimit {
    MemoryLimit::bytes(64 << 20)
}

/// The tiny golden Llama (2 layers, hidden 32) the adapter targets attach to.
fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|p| p.join("tests/fixtures/golden/llama").exists())
        .expect("the petal repository")
        .join("tests/fixtures/golden")
}

fn tiny_model() -> petal_models::Llama {
    let dir = golden().join("llama");
    petal_io::load_model(dir.to_str().unwrap_or_default(), DType::F32, &Device::Cpu)
        .expect("the golden llama loads")
        .model
}

/// `data` as file `name` in a fresh temp folder.
fn as_file(data: &[u8], name: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("temp folder");
    let p = d.path().join(name);
    std::fs::write(&p, data).expect("temp file");
    (d, p)
}

/// A GGUF model file: header, metadata, tensor table, the model config and tokenizer from its
/// metadata, and the model itself when its config is small.
pub fn gguf(data: &[u8]) -> bool {
    let (_d, p) = as_file(data, "m.gguf");
    // the quantized reading (raw blocks kept) must refuse or succeed as cleanly
    let _ = petal_io::gguf::read(&p, true);
    let Ok(g) = petal_io::gguf::read(&p, false) else {
        return false;
    };
    let tied = !g.weights.contains("lm_head.weight");
    let Ok(cfg) = petal_io::llama_config(&g.metadata, tied, false) else {
        return false;
    };
    let _ = petal_io::gguf_tokenizer(&g.metadata);
    let small = (cfg.hidden_size as u64).saturating_mul(cfg.vocab_size as u64) < 1 << 20;
    small
        && cfg.num_hidden_layers < 8
        && petal_models::Llama::load(cfg, &g.weights, DType::F32, &Device::Cpu).is_ok()
}

/// An adapter folder whose weights file is `data`, next to a valid LoRA config, attached to
/// the tiny model.
pub fn adapter_safetensors(data: &[u8]) -> bool {
    let (d, p) = as_file(data, "adapter_model.safetensors");
    let src = golden().join("adapters/llama_lora_qv/adapter_config.json");
    std::fs::copy(src, p.with_file_name("adapter_config.json")).expect("config copy");
    let mut m = tiny_model();
    let opts = petal_io::AttachOptions {
        allow_nonfinite: false,
        limit: limit(),
    };
    petal_io::attach_adapter_with(&mut m, d.path(), "default", &opts).is_ok()
}

/// adapter_config.json: parsed, validated, counted and (under a small limit) attached.
pub fn adapter_config(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let Ok(cfg) = AdapterConfig::from_json(&text, "adapter_config.json") else {
        return false;
    };
    let mut m = tiny_model();
    petal_core::inject_adapter_within(&mut m, "default", &cfg, 0, &limit()).is_ok()
}

/// A model's config.json: parsed and validated, its RoPE frequencies computed.
pub fn model_config(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    match petal_models::LlamaConfig::from_hf_json(&text, "config.json") {
        Ok(cfg) => !cfg.inv_freq().is_empty(),
        Err(_) => false,
    }
}

/// JSONL training data (plain text, prompt/completion, chat messages) through the tiny
/// model's tokenizer and chat template.
pub fn jsonl_data(data: &[u8]) -> bool {
    let (_d, p) = as_file(data, "train.jsonl");
    let mut tok =
        petal_data::Tokenizer::from_hf_folder(&golden().join("llama")).expect("tokenizer");
    // ChatML, as SmolLM2 and Qwen2.5 write it, so chat examples reach the template
    let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
                  {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    tok.chat_template = petal_data::ChatTemplate::new(chatml, String::new(), String::new()).ok();
    [false, true].into_iter().all(|pack| {
        let opts = petal_data::DataOptions {
            max_seq_len: 16,
            pack,
        };
        petal_data::load_examples(&p, &tok, &opts).is_ok()
    })
}
