//! One entry point for a `--model` argument: HF folder, GGUF file or hub id -> model +
//! tokenizer. Reading files into a model is petal-io's job: petal-models builds models from
//! a `WeightSource`, which `Weights` implements here.

use crate::gguf::{self, meta_f64, meta_str, meta_u64, Value};
use crate::hub::{resolve, ModelSource};
use crate::Weights;
use candle_core::{DType, Device};
use petal_core::{Error, Result};
use petal_data::tokenizer::BpeParts;
use petal_data::Tokenizer;
use petal_models::{Llama, LlamaConfig, Precision, RopeScaling, WeightSource};
use std::collections::HashMap;

pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
}

/// The model and tokenizer of `spec`, with weights (and activations) as `precision` says (a
/// `DType`: activations as the weights, f32 for bf16 weights on the CPU).
pub fn load_model(
    spec: &str,
    precision: impl Into<Precision>,
    device: &Device,
) -> Result<LoadedModel> {
    let precision = precision.into();
    let source = resolve(spec)?;
    let (model, tokenizer) = match &source {
        ModelSource::HfFolder(dir) => {
            let cfg_path = dir.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let cfg = LlamaConfig::from_hf_json(&text, &cfg_path.display().to_string())?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::msg(format!("{}: not valid JSON: {e}", cfg_path.display())))?;
            let gptq = crate::gptq::gptq_config(&json, &cfg_path)?;
            let bnb = gptq.is_none() && crate::bnb::bnb_config(&json, &cfg_path)?.is_some();
            let held = match (bnb, gptq) {
                (true, _) => Some("bitsandbytes NF4"),
                (_, Some(g)) => Some(g.held()),
                _ => None,
            };
            if precision.quantized && held.is_none() {
                return Err(Error::Unsupported(format!(
                    "{}: --dtype quantized keeps a GGUF file's, a bitsandbytes, GPTQ or AWQ \
                     folder's quantized weights; this safetensors folder's are not quantized \
                     (load it with --dtype f32 or bf16, or quantize it with --quantize nf4)",
                    dir.display()
                )));
            }
            if let (Some(q), Some(held)) = (precision.quantize, held) {
                return Err(Error::Unsupported(format!(
                    "{}: --quantize {}: the folder's linears are already quantized ({held}); \
                     train over them with --dtype quantized",
                    dir.display(),
                    q.name()
                )));
            }
            let w = match (bnb, gptq) {
                (true, _) => crate::bnb::read(dir)?,
                (_, Some(g)) => crate::gptq::read(dir, g)?,
                _ => Weights::from_hf_folder(dir)?,
            };
            layers_match(&cfg, &w.names(), dir)?;
            let tok = Tokenizer::from_hf_folder(dir).map_err(|e| Error::msg(e.to_string()))?;
            (Llama::load(cfg, &w, precision, device)?, tok)
        }
        ModelSource::Gguf(path) => {
            let g = gguf::read(path, precision.quantized)?;
            if let (Some(q), Some(held)) = (precision.quantize, g.block_types.first()) {
                return Err(Error::Unsupported(format!(
                    "{}: --quantize {}: the file's weights are already quantized ({}); train \
                     over them with --dtype quantized",
                    path.display(),
                    q.name(),
                    petal_ops::quant::type_name(*held)
                )));
            }
            let tied = !g.weights.contains("lm_head.weight");
            let bias = g.weights.contains("model.layers.0.self_attn.q_proj.bias");
            let mut cfg = llama_config(&g.metadata, tied, bias)?;
            if let Some(f) = &g.rope_factors {
                let scaling = cfg.rope_scaling_from_factors(f).map_err(|e| {
                    Error::config(path.display().to_string(), "rope_freqs.weight", e)
                })?;
                cfg.rope_scaling = Some(scaling);
            }
            let tok = gguf_tokenizer(&g.metadata)
                .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
            (Llama::load(cfg, &g.weights, precision, device)?, tok)
        }
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        source,
    })
}

/// Refuses weights that hold a decoder layer past the config's `num_hidden_layers`: the
/// config does not describe the weights (loading would silently drop layers).
fn layers_match(cfg: &LlamaConfig, names: &[String], dir: &std::path::Path) -> Result<()> {
    let layer = |n: &String| {
        n.strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse::<usize>()
            .ok()
    };
    if let Some(top) = names.iter().filter_map(layer).max() {
        let want = cfg.num_hidden_layers;
        if top >= want {
            return Err(Error::config(
                dir.join("config.json").display().to_string(),
                "num_hidden_layers",
                format!("{want}, but the weights hold layer {top} (model.layers.{top}.*): the config does not describe these weights"),
            ));
        }
    }
    Ok(())
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Vec<String> {
    md.get(key)
        .and_then(|v| v.to_vec().ok())
        .map(|v| {
            v.iter()
                .filter_map(|x| x.to_string().ok().cloned())
                .collect()
        })
        .unwrap_or_default()
}

/// The tokenizer stored in GGUF metadata (`tokenizer.ggml.*`).
pub fn gguf_tokenizer(md: &HashMap<String, Value>) -> std::result::Result<Tokenizer, String> {
    let model = meta_str(md, "tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(format!(
            "GGUF tokenizer model `{model}` is not supported (petal reads gpt2-style BPE)"
        ));
    }
    let token_types = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
        .unwrap_or_default();
    let parts = BpeParts {
        tokens: strings(md, "tokenizer.ggml.tokens"),
        merges: strings(md, "tokenizer.ggml.merges"),
        token_types,
        bos_id: meta_u64(md, "tokenizer.ggml.bos_token_id").map(|x| x as u32),
        eos_id: meta_u64(md, "tokenizer.ggml.eos_token_id").map(|x| x as u32),
        add_bos: md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
        pre: meta_str(md, "tokenizer.ggml.pre")
            .unwrap_or("gpt2")
            .to_string(),
        chat_template: meta_str(md, "tokenizer.chat_template").map(String::from),
    };
    Tokenizer::from_bpe_parts(parts).map_err(|e| e.to_string())
}

/// Parse "f32" / "bf16" / "f16".
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::msg(format!(
            "dtype `{other}` is not one of f32, bf16, f16"
        ))),
    }
}

/// RoPE scaling from a GGUF file's metadata as llama.cpp writes it (`{arch}.rope.scaling.type`
/// `linear` or `yarn`, `.factor`, `.original_context_length`, `.yarn_beta_fast/slow`, or the
/// older `{arch}.rope.scale_linear`). Llama3's scaling comes as the `rope_freqs.weight` tensor
/// instead (see `load_model`). Keys that change YaRN's attention factor in ways llama.cpp
/// versions read differently are refused rather than guessed.
fn gguf_rope_scaling(md: &HashMap<String, Value>, arch: &str) -> Result<Option<RopeScaling>> {
    let key = |k: &str| format!("{arch}.{k}");
    let factor = || match meta_f64(md, &key("rope.scaling.factor")) {
        Some(f) if f > 0.0 && f.is_finite() => Ok(f),
        f => Err(Error::config(
            "gguf",
            key("rope.scaling.factor"),
            format!("{f:?}: a positive number is needed"),
        )),
    };
    let ty = meta_str(md, &key("rope.scaling.type"));
    Ok(match ty {
        None => match meta_f64(md, &key("rope.scale_linear")) {
            Some(f) if f != 1.0 && f > 0.0 => Some(RopeScaling::linear(f)),
            _ => None,
        },
        Some("none") => None,
        Some("linear") => Some(RopeScaling::linear(factor()?)),
        Some("yarn") => {
            for k in [
                "rope.scaling.attn_factor",
                "rope.scaling.yarn_attn_factor",
                "rope.scaling.yarn_log_multiplier",
                "rope.scaling.yarn_ext_factor",
            ] {
                if md.contains_key(&key(k)) {
                    return Err(Error::Unsupported(format!(
                        "gguf: {}: YaRN with this key is not supported (petal reads YaRN's \
                         factor, original_context_length and yarn_beta_fast/slow)",
                        key(k)
                    )));
                }
            }
            let original = meta_u64(md, &key("rope.scaling.original_context_length"))
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    Error::config(
                        "gguf",
                        key("rope.scaling.original_context_length"),
                        "missing (yarn needs the pretraining context)",
                    )
                })?;
            let beta = |k: &str, d: f64| meta_f64(md, &key(k)).filter(|b| *b != 0.0).unwrap_or(d);
            Some(RopeScaling::yarn(
                factor()?,
                original as usize,
                beta("rope.scaling.yarn_beta_fast", 32.0),
                beta("rope.scaling.yarn_beta_slow", 1.0),
                None,
            ))
        }
        Some(other) => {
            return Err(Error::config(
                "gguf",
                key("rope.scaling.type"),
                format!("`{other}` is not supported (none, linear, yarn)"),
            ))
        }
    })
}

/// A Llama config from llama-architecture GGUF metadata; `tied` says whether output.weight is
/// absent.
pub fn llama_config(
    md: &HashMap<String, Value>,
    tied: bool,
    has_qkv_bias: bool,
) -> Result<LlamaConfig> {
    let arch = meta_str(md, "general.architecture").unwrap_or("llama");
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| {
        meta_u64(md, &key(k))
            .ok_or_else(|| Error::config("gguf", key(k), "missing"))
            .map(|x| x as usize)
    };
    let heads = need("attention.head_count")?;
    let hidden = need("embedding_length")?;
    let vocab = match md.get("tokenizer.ggml.tokens") {
        Some(v) => v.to_vec().map(|t| t.len()).unwrap_or(0),
        None => 0,
    };
    let vocab = meta_u64(md, &key("vocab_size"))
        .map(|x| x as usize)
        .unwrap_or(vocab);
    let cfg = LlamaConfig {
        model_type: arch.into(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: need("feed_forward_length")?,
        num_hidden_layers: need("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: meta_u64(md, &key("attention.head_count_kv"))
            .map(|x| x as usize)
            .unwrap_or(heads),
        head_dim: meta_u64(md, &key("attention.key_length"))
            .map(|x| x as usize)
            .unwrap_or(hidden / heads),
        rms_norm_eps: meta_f64(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta_f64(md, &key("rope.freq_base")).unwrap_or(10000.0),
        rope_scaling: gguf_rope_scaling(md, arch)?,
        max_position_embeddings: need("context_length").unwrap_or(2048),
        tie_word_embeddings: tied,
        attention_bias: has_qkv_bias,
        mlp_bias: false,
        bos_token_id: meta_u64(md, "tokenizer.ggml.bos_token_id").map(|x| x as u32),
        eos_token_id: meta_u64(md, "tokenizer.ggml.eos_token_id").map(|x| x as u32),
    };
    cfg.validate("gguf")?;
    Ok(cfg)
}
