//! The fuzz targets (`fuzz/targets.rs`) on stable Rust: every saved corpus input and every
//! regression (a crash the fuzzer found, kept after its fix) is read without a panic, and so
//! is each seed under a fixed set of truncations and byte changes. The coverage-guided runs
//! are `tools/fuzz.sh` (cargo-fuzz, libFuzzer).
//!
//! `cargo test -p petal-io --test fuzz_corpus -- --ignored write_seeds` rewrites the seed
//! inputs in `fuzz/corpus/*/seed-*` from the golden fixtures.

#[path = "../../../fuzz/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files under `fuzz/<kind>/<target>`, sorted.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else {
        return vec![];
    };
    let mut v: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn every_saved_fuzz_input_and_regression_is_read_without_a_panic() {
    for (name, target) in targets::TARGETS {
        let corpus = inputs("corpus", name);
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} has no seeds");
        for p in corpus.iter().chain(&inputs("regressions", name)) {
            let data = std::fs::read(p).unwrap();
            let read = target(&data);
            // a seed is a valid file: the mutants below start from a path read to its end
            let seed = p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-");
            assert!(read || !seed, "{}: the seed is refused", p.display());
        }
    }
}

/// A deterministic walk over one input's neighbours: cut at many lengths, single bytes set to
/// 0x00, 0xff and 0x7f, and runs of bytes overwritten with a large little-endian number (what
/// turns a length or a dimension absurd).
fn mutants(seed: &[u8], budget: usize) -> Vec<Vec<u8>> {
    let n = seed.len().max(1);
    let step = (n / (budget / 4).max(1)).max(1);
    let mut out = Vec::new();
    for at in (0..n).step_by(step) {
        out.push(seed[..at.min(seed.len())].to_vec());
        for b in [0x00u8, 0xff, 0x7f] {
            let mut m = seed.to_vec();
            if let Some(x) = m.get_mut(at) {
                *x = b;
            }
            out.push(m);
        }
        let mut m = seed.to_vec();
        for (i, b) in (u64::MAX / 3).to_le_bytes().iter().enumerate() {
            if let Some(x) = m.get_mut(at + i) {
                *x = *b;
            }
        }
        out.push(m);
    }
    out.truncate(budget);
    out
}

#[test]
fn seeds_with_bytes_cut_or_changed_are_refused_or_read_without_a_panic() {
    for (name, target) in targets::TARGETS {
        // the weights and GGUF targets load a model per input: fewer of them
        let budget = match name {
            "gguf" | "adapter_safetensors" | "adapter_config" => 150,
            _ => 400,
        };
        for seed in inputs("corpus", name).iter().filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
        }) {
            let data = std::fs::read(seed).unwrap();
            for m in mutants(&data, budget) {
                target(&m);
            }
        }
    }
}

#[test]
#[ignore = "writes the seed corpus; run when the fixtures change"]
fn write_seeds() {
    let golden = fuzz_dir().join("../tests/fixtures/golden");
    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };
    for m in ["llama", "qwen2", "mistral"] {
        put(
            "model_config",
            m,
            &std::fs::read(golden.join(m).join("config.json")).unwrap(),
        );
    }
    for a in [
        "llama_lora_qv",
        "llama_vera",
        "llama_prompt_tuning",
        "llama_prefix_tuning",
        "llama_p_tuning_lstm",
        "llama_boft",
        "llama_adalora_trained",
        "llama_lora_trainable_tokens",
    ] {
        let dir = golden.join("adapters").join(a);
        put(
            "adapter_config",
            a,
            &std::fs::read(dir.join("adapter_config.json")).unwrap(),
        );
    }
    let lora = golden.join("adapters/llama_lora_qv/adapter_model.safetensors");
    put(
        "adapter_safetensors",
        "llama_lora_qv",
        &std::fs::read(lora).unwrap(),
    );
    let lines = [
        r#"{"text": "w1 w2 w3 w4 w5 w6"}"#,
        r#"{"prompt": "w1 w2", "completion": "w3 w4"}"#,
        r#"{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2 w3"}]}"#,
    ];
    put("jsonl_data", "three_formats", lines.join("\n").as_bytes());
    put("gguf", "tiny_llama", &tiny_gguf(&golden.join("llama")));
}

/// The golden Llama's weights as a small llama GGUF (f32 tensors, llama.cpp names, the
/// metadata petal reads; rows not permuted: a seed needs the layout, not the values).
fn tiny_gguf(dir: &Path) -> Vec<u8> {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let w =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let gguf_name = |hf: &str| -> Option<String> {
        let fixed = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
            return Some(g.to_string());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (n, tail) = rest.split_once('.')?;
        let g = match tail {
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            _ => return None,
        };
        Some(format!("blk.{n}.{g}"))
    };
    let mut tensors: Vec<(String, QTensor)> = w
        .iter()
        .filter_map(|(k, t)| Some((gguf_name(k)?, QTensor::quantize(t, GgmlDType::F32).ok()?)))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let u = |k: &str| gguf_file::Value::U32(cfg[k].as_u64().unwrap() as u32);
    let meta = [
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.attention.head_count", u("num_attention_heads")),
        ("llama.attention.head_count_kv", u("num_key_value_heads")),
        ("llama.embedding_length", u("hidden_size")),
        ("llama.feed_forward_length", u("intermediate_size")),
        ("llama.block_count", u("num_hidden_layers")),
        ("llama.context_length", u("max_position_embeddings")),
        ("llama.vocab_size", u("vocab_size")),
        ("llama.attention.key_length", u("head_dim")),
        ("llama.rope.freq_base", gguf_file::Value::F32(10000.0)),
    ];
    let meta: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &meta, &refs).unwrap();
    buf.into_inner()
}
