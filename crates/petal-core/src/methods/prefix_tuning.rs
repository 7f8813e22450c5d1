//! Prefix tuning (Li and Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
//! Generation"): `num_virtual_tokens` trained keys and values in front of every layer's
//! attention, as if that many positions were already in the cache. Mirrors PEFT
//! `tuners/prefix_tuning` (`PrefixEncoder`) and `PeftModelForCausalLM` (`get_prompt`).
//!
//! One tensor `prompt_embeddings (n, 2 L kv)` (kv = key/value width: with grouped-query
//! attention PEFT sets `token_dim = kv_heads head_dim` and `num_attention_heads = kv_heads`);
//! row t holds, for layer 0 key, layer 0 value, layer 1 key, …, kv values. The tokens' positions
//! start at n (RoPE included) and every token sees the whole prefix; only the tokens produce
//! logits. Init: N(0, 1) (`nn.Embedding`), or zeros with `init_weights = "zero"`. Saved like
//! prompt tuning, at the top level. `prefix_projection` (a two-layer tanh MLP over the
//! embeddings, used while training) is saved by PEFT as its output, so such files load; training
//! through the projection is not supported yet. Cannot be merged into weights.

use crate::adapter::{AdapterMethod, InputAdapter, InputShape, NamedTensor};
use crate::config::{AdapterConfig, InitWeights};
use crate::methods::normal;
use crate::methods::prompt_tuning::EMBEDDINGS;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;

pub struct PrefixTuning;

#[derive(Debug)]
pub struct Prefix {
    kv: Var, // (n, 2 L kv)
}

impl AdapterMethod for PrefixTuning {
    fn peft_type(&self) -> &'static str {
        "PREFIX_TUNING"
    }

    fn config_keys(&self) -> &'static [&'static str] {
        &[
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_attention_heads",
            "num_layers",
            "encoder_hidden_size",
            "prefix_projection",
            "init_weights",
        ]
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        _: &crate::adapter::BaseLinear,
        _: u64,
    ) -> Result<Box<dyn crate::AdapterLayer>> {
        Err(Error::Unsupported(format!(
            "{}: prefix tuning adapts attention's keys and values, not linear `{path}`",
            cfg.peft_type
        )))
    }

    fn build_input(
        &self,
        cfg: &AdapterConfig,
        shape: &InputShape,
        seed: u64,
        dev: &Device,
    ) -> Result<Option<Box<dyn InputAdapter>>> {
        let bad = |k: &str, m: String| Err(Error::config("adapter config", k, m));
        let n = cfg.num_virtual_tokens.unwrap_or(0);
        if n == 0 {
            return bad("num_virtual_tokens", "must be at least 1".into());
        }
        let kv = shape.kv_heads * shape.head_dim;
        let checks = [
            (
                "token_dim",
                cfg.token_dim,
                kv,
                "the model's key/value width",
            ),
            (
                "num_layers",
                cfg.num_layers,
                shape.layers,
                "the model's layer count",
            ),
            (
                "num_attention_heads",
                cfg.num_attention_heads,
                shape.kv_heads,
                "the model's key/value heads",
            ),
        ];
        for (k, got, want, what) in checks {
            if let Some(g) = got.filter(|&g| g != want) {
                return bad(k, format!("is {g}, but {what} is {want}"));
            }
        }
        if cfg.num_transformer_submodules.unwrap_or(1) != 1 {
            return bad(
                "num_transformer_submodules",
                "must be 1 (decoder-only models)".into(),
            );
        }
        if cfg.prefix_projection == Some(true) && !cfg.inference_mode {
            return Err(Error::Unsupported(
                "prefix tuning with prefix_projection = true cannot be trained by petal yet \
                 (saved adapters load: PEFT stores the projection's output)"
                    .into(),
            ));
        }
        let shape2 = (n, 2 * shape.layers * kv);
        let t = match &cfg.init_weights {
            Some(InitWeights::Named(z)) if z == "zero" => Tensor::zeros(shape2, DType::F32, dev)?,
            _ => normal(
                shape2,
                1.0,
                &mut rand::rngs::StdRng::seed_from_u64(seed),
                dev,
            )?,
        };
        Ok(Some(Box::new(Prefix {
            kv: Var::from_tensor(&t)?,
        })))
    }
}

impl InputAdapter for Prefix {
    fn key_values(&self) -> Option<&Tensor> {
        Some(self.kv.as_tensor())
    }

    fn num_virtual_tokens(&self) -> usize {
        self.kv.as_tensor().dims()[0]
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: EMBEDDINGS,
            var: &self.kv,
        }]
    }

    fn set_prefix(&self, t: &Tensor) -> Result<()> {
        let want = self.kv.as_tensor().dims();
        if t.dims() != want {
            return Err(Error::Shape {
                tensor: EMBEDDINGS.into(),
                expected: want.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(self.kv.set(&t.to_dtype(DType::F32)?)?)
    }
}
