//! Llama-family config from HF `config.json` (both dialects: `rope_theta`/`rope_scaling`/
//! `torch_dtype`, and transformers 5's `rope_parameters`/`dtype`) or from GGUF metadata.

pub use crate::rope::RopeScaling;
use petal_core::{Error, Result};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub model_type: String, // llama | qwen2 | mistral
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// Llama's `mlp_bias`: gate/up/down have biases.
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

const SUPPORTED: &[&str] = &["llama", "qwen2", "mistral"];

pub(crate) fn num(v: &Value, key: &str, file: &str) -> Result<f64> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| Error::config(file, key, "missing or not a number"))
}

/// A size: a whole number of at least 1.
pub(crate) fn count(v: &Value, key: &str, file: &str) -> Result<usize> {
    match v.get(key).and_then(Value::as_u64) {
        Some(n) if n >= 1 => Ok(n as usize),
        _ => Err(Error::config(
            file,
            key,
            format!(
                "{} is not a whole number of at least 1",
                v.get(key).unwrap_or(&Value::Null)
            ),
        )),
    }
}

fn first_id(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first()?.as_u64().map(|x| x as u32),
        _ => None,
    }
}

impl LlamaConfig {
    pub fn from_hf_json(text: &str, file: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::config(file, "(json)", format!("not valid JSON: {e}")))?;
        let mt = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if !SUPPORTED.contains(&mt.as_str()) {
            return Err(Error::config(
                file,
                "model_type",
                format!(
                    "`{mt}` is not supported (petal supports {})",
                    SUPPORTED.join(", ")
                ),
            ));
        }
        let heads = count(&v, "num_attention_heads", file)?;
        let hidden = count(&v, "hidden_size", file)?;
        let rp = v.get("rope_parameters").filter(|x| x.is_object());
        let rs = v.get("rope_scaling").filter(|x| x.is_object()).or(rp);
        let rope_theta = rp
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let rope_scaling = match rs {
            None => None,
            Some(s) => RopeScaling::from_hf(s, &v, file)?,
        };
        let tie_default = false;
        let cfg = LlamaConfig {
            vocab_size: count(&v, "vocab_size", file)?,
            hidden_size: hidden,
            intermediate_size: count(&v, "intermediate_size", file)?,
            num_hidden_layers: count(&v, "num_hidden_layers", file)?,
            num_attention_heads: heads,
            num_key_value_heads: v
                .get("num_key_value_heads")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(heads),
            head_dim: v
                .get("head_dim")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(hidden / heads),
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(tie_default),
            attention_bias: mt == "qwen2"
                || v.get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: first_id(v.get("bos_token_id")),
            eos_token_id: first_id(v.get("eos_token_id")),
            model_type: mt,
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Refuse sizes and constants a model cannot be built or run with, naming the field: every
    /// size at least 1 and at most its bound (far above any released model's: a size past it
    /// is a corrupt or hostile file, which would otherwise size allocations), query heads a
    /// multiple of key/value heads, positive finite `rope_theta` and `rms_norm_eps`.
    pub fn validate(&self, file: &str) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 18),
            ("intermediate_size", self.intermediate_size, 1 << 21),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 12),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("num_key_value_heads", self.num_key_value_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 12),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 26,
            ),
        ];
        for (k, v, max) in sizes {
            if v == 0 {
                return Err(Error::config(file, k, "is 0; must be at least 1"));
            }
            if v > max {
                return Err(Error::config(
                    file,
                    k,
                    format!("{v} is out of range: at most {max}"),
                ));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(Error::config(
                file,
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads ({})",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        for (k, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id.filter(|&i| i as usize >= self.vocab_size) {
                let e = format!(
                    "{id} is out of range: below vocab_size ({})",
                    self.vocab_size
                );
                return Err(Error::config(file, k, e));
            }
        }
        for (k, v) in [
            ("rope_theta", self.rope_theta),
            ("rms_norm_eps", self.rms_norm_eps),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::config(
                    file,
                    k,
                    format!("{v} must be positive and finite"),
                ));
            }
        }
        Ok(())
    }

    /// HF config.json (transformers 4 dialect, which both 4.x and 5.x read).
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let mut v = serde_json::json!({
            "architectures": [match self.model_type.as_str() { "qwen2" => "Qwen2ForCausalLM", "mistral" => "MistralForCausalLM", _ => "LlamaForCausalLM" }],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        });
        if self.model_type == "llama" {
            v["attention_bias"] = Value::Bool(self.attention_bias);
            v["mlp_bias"] = Value::Bool(self.mlp_bias);
        }
        if let Some(s) = &self.rope_scaling {
            v["rope_scaling"] = s.to_hf_json();
            if s.rope_type == "longrope" {
                // transformers 4 reads LongRoPE's pretraining context at the top level only
                v["original_max_position_embeddings"] = s.original_max_position_embeddings.into();
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_or_negative_sizes_and_non_positive_constants_are_refused_naming_the_field() {
        let good = serde_json::json!({"model_type": "llama", "vocab_size": 96, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2});
        LlamaConfig::from_hf_json(&good.to_string(), "config.json").unwrap();
        for (key, bad) in [
            ("num_attention_heads", serde_json::json!(0)),
            ("num_hidden_layers", serde_json::json!(-1)),
            ("hidden_size", serde_json::json!(1.5)),
            ("num_key_value_heads", serde_json::json!(3)),
            ("rope_theta", serde_json::json!(0)),
            ("rms_norm_eps", serde_json::json!(-1e-6)),
            ("max_position_embeddings", serde_json::json!(0)),
            ("hidden_size", serde_json::json!(5_555_555_555_807u64)),
            ("head_dim", serde_json::json!(1 << 20)),
            ("vocab_size", serde_json::json!(1u64 << 40)),
            ("bos_token_id", serde_json::json!(96)),
            ("eos_token_id", serde_json::json!([999_999_999])),
        ] {
            let mut v = good.clone();
            v[key] = bad.clone();
            let e = LlamaConfig::from_hf_json(&v.to_string(), "config.json")
                .expect_err(&format!("{key} = {bad}"))
                .to_string();
            assert!(
                e.contains("config.json") && e.contains(key),
                "{key} = {bad}: {e}"
            );
        }
    }

    #[test]
    fn both_config_dialects_give_the_same_rope_theta_and_scaling() {
        let old = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
            "num_attention_heads":2,"rope_theta":500000.0,"torch_dtype":"bfloat16",
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let new = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
            "num_attention_heads":2,"dtype":"bfloat16",
            "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let a = LlamaConfig::from_hf_json(old, "a").unwrap();
        let b = LlamaConfig::from_hf_json(new, "b").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
    }

    #[test]
    fn an_unsupported_architecture_is_refused_naming_the_field() {
        let e = LlamaConfig::from_hf_json(r#"{"model_type":"gpt2"}"#, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config.json") && e.contains("model_type") && e.contains("gpt2"),
            "{e}"
        );
    }
}
