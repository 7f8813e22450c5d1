//! Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt
//! Tuning"): `num_virtual_tokens` trainable embeddings prepended to every input sequence; the
//! model is untouched. Mirrors PEFT `tuners/prompt_tuning` (causal LM, one transformer
//! submodule). Logits come back for the virtual positions too (as PEFT returns them).
//! Init: "RANDOM" draws N(0, 1) (torch's nn.Embedding default); "TEXT" copies the word
//! embeddings of `prompt_tuning_init_text`, cut or repeated to the length (done by the caller,
//! who has the tokenizer). Saved as `prompt_embeddings` (n, token_dim), *without* the
//! `base_model.model.` prefix. Cannot be merged into weights.

use crate::adapter::{AdapterMethod, Flag, InputAdapter, InputShape, NamedTensor, NewAdapter};
use crate::config::{spec, AdapterConfig, Spec};
use crate::methods::normal;
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;

pub const EMBEDDINGS: &str = "prompt_embeddings";

pub struct PromptTuning;

crate::method_options! {
    /// The virtual positions of a prompt-learning method (prompt, prefix and P-tuning) and
    /// PEFT's record of the model's shape, shared by their options.
    pub struct PromptShape {
        /// Virtual tokens put in front of every sequence (petal's training default: 20)
        pub num_virtual_tokens: Option<usize> = None,
        /// Their width: the model's hidden size (prefix tuning: its key/value width)
        pub token_dim: Option<usize> = None,
        /// Transformer submodules (1: decoder-only)
        pub num_transformer_submodules: usize = 1,
        /// The model's attention heads (prefix tuning: its key/value heads)
        pub num_attention_heads: Option<usize> = None,
        /// The model's layers
        pub num_layers: Option<usize> = None,
    }
}

crate::method_options! {
    /// Prompt tuning's options (PEFT `PromptTuningConfig`).
    pub struct PromptTuningOptions {
        flatten shape: PromptShape;
        /// RANDOM | TEXT (the embeddings of prompt_tuning_init_text)
        [crate::config::parse_upper]
        pub prompt_tuning_init: String = "RANDOM".into(),
        /// Text whose embeddings start the virtual tokens (sets prompt_tuning_init = TEXT)
        pub prompt_tuning_init_text: Option<String> = None,
        /// Tokenizer of the text (PEFT's bookkeeping)
        pub tokenizer_name_or_path: Option<String> = None,
    }
}

/// The number of virtual tokens of an embedding-prefix config (prompt tuning, P-tuning),
/// checked against the model's hidden size `d`.
/// The values of the virtual tokens `cfg` asks for at width `d`, as the memory check counts
/// them (saturating: the count may come from an untrusted file).
pub(crate) fn prompt_values(cfg: &PromptShape, d: usize) -> u64 {
    (cfg.num_virtual_tokens.unwrap_or(0) as u64)
        .saturating_mul(cfg.num_transformer_submodules as u64)
        .saturating_mul(d as u64)
}

pub(crate) fn virtual_tokens(cfg: &PromptShape, d: usize) -> Result<usize> {
    let n = cfg.num_virtual_tokens.unwrap_or(0) * cfg.num_transformer_submodules;
    if n == 0 {
        return Err(Error::config(
            "adapter config",
            "num_virtual_tokens",
            "must be at least 1",
        ));
    }
    if let Some(t) = cfg.token_dim.filter(|&t| t != d) {
        return Err(Error::config(
            "adapter config",
            "token_dim",
            format!("is {t}, but the model's hidden size is {d}"),
        ));
    }
    Ok(n)
}

/// petal's defaults for a new prompt of width `token_dim` (20 virtual tokens) and PEFT's
/// bookkeeping of the model's shape.
pub(crate) fn prepare_prompt(
    cfg: &mut AdapterConfig,
    new: &NewAdapter,
    token_dim: usize,
    heads: usize,
) -> Result<()> {
    if !new.given("num_virtual_tokens") {
        cfg.set("num_virtual_tokens", 20)?;
    }
    cfg.set("token_dim", token_dim)?;
    cfg.set("num_layers", new.shape.layers)?;
    cfg.set("num_attention_heads", heads)?;
    cfg.target_modules = None;
    Ok(())
}

#[derive(Debug)]
pub struct PromptEmbedding {
    emb: Var, // (n, dim)
}

impl PromptEmbedding {
    pub fn new(t: &Tensor) -> Result<Self> {
        Ok(PromptEmbedding {
            emb: Var::from_tensor(t)?,
        })
    }

    /// Replace the embeddings (TEXT init, loading).
    pub fn set(&self, t: &Tensor) -> Result<()> {
        crate::methods::set_var(&self.emb, EMBEDDINGS, t)
    }
}

impl AdapterMethod for PromptTuning {
    fn input_values(&self, cfg: &AdapterConfig, shape: &InputShape) -> Result<u64> {
        let o: PromptTuningOptions = cfg.options()?;
        Ok(prompt_values(&o.shape, shape.hidden))
    }
    fn peft_type(&self) -> &'static str {
        "PROMPT_TUNING"
    }

    fn options(&self) -> Spec {
        spec::<PromptTuningOptions>()
    }

    fn flags(&self) -> Vec<Flag> {
        vec![
            Flag::new("num-virtual-tokens", "num_virtual_tokens"),
            Flag::new("prompt-init-text", "prompt_tuning_init_text"),
        ]
    }

    fn default_targets(&self) -> Option<&'static str> {
        None
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        prepare_prompt(cfg, new, new.shape.hidden, new.attention_heads)?;
        if new.given("prompt_tuning_init_text") && !new.given("prompt_tuning_init") {
            cfg.set("prompt_tuning_init", "TEXT")?;
        }
        Ok(())
    }

    fn build_input(
        &self,
        cfg: &AdapterConfig,
        shape: &crate::adapter::InputShape,
        seed: u64,
        dev: &Device,
    ) -> Result<Option<Box<dyn InputAdapter>>> {
        let token_dim = shape.hidden;
        let o: PromptTuningOptions = cfg.options()?;
        let n = virtual_tokens(&o.shape, token_dim)?;
        let t = normal(
            (n, token_dim),
            1.0,
            &mut rand::rngs::StdRng::seed_from_u64(seed),
            dev,
        )?;
        Ok(Some(Box::new(PromptEmbedding {
            emb: Var::from_tensor(&t)?,
        })))
    }
}

impl InputAdapter for PromptEmbedding {
    fn embeddings(&self) -> Result<Option<Tensor>> {
        Ok(Some(self.emb.as_tensor().clone()))
    }

    fn num_virtual_tokens(&self) -> usize {
        self.emb.as_tensor().dims()[0]
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: EMBEDDINGS,
            var: &self.emb,
        }]
    }

    fn set_prefix(&self, t: &Tensor) -> Result<()> {
        self.set(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Targets;

    #[test]
    fn random_init_draws_standard_normal_embeddings_of_the_configured_shape() {
        let mut cfg = AdapterConfig::for_method("PROMPT_TUNING", 1, 1.0, Targets::List(vec![]));
        cfg.set("num_virtual_tokens", 50).unwrap();
        let shape = crate::adapter::InputShape {
            hidden: 200,
            layers: 2,
            kv_heads: 1,
            head_dim: 4,
        };
        let a = PromptTuning
            .build_input(&cfg, &shape, 1, &Device::Cpu)
            .unwrap()
            .unwrap();
        let e = a.embeddings().unwrap().unwrap();
        let v = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(e.dims(), &[50, 200]);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
        cfg.set("token_dim", 64).unwrap();
        assert!(
            PromptTuning
                .build_input(&cfg, &shape, 1, &Device::Cpu)
                .is_err(),
            "token_dim must fit the model"
        );
    }
}
