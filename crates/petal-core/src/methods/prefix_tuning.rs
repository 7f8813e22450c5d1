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
//! prompt tuning, at the top level. `prefix_projection`: the prefix is trained through a
//! two-layer tanh MLP over `(n, kv)` embeddings (`encoder_hidden_size` wide) and saved, as PEFT
//! does, as the MLP's output with `inference_mode`; checkpoints keep the MLP. Cannot be merged
//! into weights.

use crate::adapter::{AdapterMethod, Flag, InputAdapter, InputShape, NamedTensor, NewAdapter};
use crate::config::{spec, AdapterConfig, InitWeights, Spec};
use crate::methods::normal;
use crate::methods::prompt_tuning::{prepare_prompt, PromptShape, EMBEDDINGS};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;

pub struct PrefixTuning;

crate::method_options! {
    /// Prefix tuning's options (PEFT `PrefixTuningConfig`).
    pub struct PrefixTuningOptions {
        flatten shape: PromptShape;
        /// Hidden width of the projection MLP
        pub encoder_hidden_size: Option<usize> = None,
        /// Train the prefix through PEFT's two-layer tanh projection
        pub prefix_projection: bool = false,
        /// null: N(0, 1); "zero": zeros
        pub init_weights: Option<InitWeights> = None,
    }
}

#[derive(Debug)]
pub struct Prefix {
    kv: Var, // (n, 2 L kv)
}

impl AdapterMethod for PrefixTuning {
    fn input_values(&self, cfg: &AdapterConfig, shape: &InputShape) -> Result<u64> {
        let o: PrefixTuningOptions = cfg.options()?;
        let n = o.shape.num_virtual_tokens.unwrap_or(0) as u64;
        let kv = (shape.kv_heads * shape.head_dim) as u64;
        let width = 2 * shape.layers as u64 * kv;
        // keys and values of every layer, or the projection's embeddings and MLP
        let h = o.encoder_hidden_size.unwrap_or(kv as usize) as u64;
        let projected = match o.prefix_projection {
            true => n.saturating_mul(kv) + h.saturating_mul(kv + width + 1),
            false => 0,
        };
        Ok(n.saturating_mul(width).saturating_add(projected))
    }
    fn peft_type(&self) -> &'static str {
        "PREFIX_TUNING"
    }

    fn options(&self) -> Spec {
        spec::<PrefixTuningOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        match cfg.options::<PrefixTuningOptions>()?.init_weights {
            Some(InitWeights::Named(n)) if n != "zero" => {
                Err(crate::config::unsupported("init_weights", format!("{n:?}")))
            }
            _ => Ok(()),
        }
    }

    fn flags(&self) -> Vec<Flag> {
        vec![
            Flag::new("num-virtual-tokens", "num_virtual_tokens"),
            Flag::new("prefix-projection", "prefix_projection"),
            Flag::new("encoder-hidden-size", "encoder_hidden_size"),
        ]
    }

    fn default_targets(&self) -> Option<&'static str> {
        None
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        // keys and values: with grouped-query attention the prefix is kv_heads wide
        let kv = new.shape.kv_heads * new.shape.head_dim;
        prepare_prompt(cfg, new, kv, new.shape.kv_heads)?;
        if !new.given("encoder_hidden_size") {
            cfg.set("encoder_hidden_size", kv)?;
        }
        Ok(())
    }

    fn build_input(
        &self,
        cfg: &AdapterConfig,
        shape: &InputShape,
        seed: u64,
        dev: &Device,
    ) -> Result<Option<Box<dyn InputAdapter>>> {
        let bad = |k: &str, m: String| Err(Error::config("adapter config", k, m));
        let o: PrefixTuningOptions = cfg.options()?;
        let n = o.shape.num_virtual_tokens.unwrap_or(0);
        if n == 0 {
            return bad("num_virtual_tokens", "must be at least 1".into());
        }
        let kv = shape.kv_heads * shape.head_dim;
        let checks = [
            (
                "token_dim",
                o.shape.token_dim,
                kv,
                "the model's key/value width",
            ),
            (
                "num_layers",
                o.shape.num_layers,
                shape.layers,
                "the model's layer count",
            ),
            (
                "num_attention_heads",
                o.shape.num_attention_heads,
                shape.kv_heads,
                "the model's key/value heads",
            ),
        ];
        for (k, got, want, what) in checks {
            if let Some(g) = got.filter(|&g| g != want) {
                return bad(k, format!("is {g}, but {what} is {want}"));
            }
        }
        if o.shape.num_transformer_submodules != 1 {
            return bad(
                "num_transformer_submodules",
                "must be 1 (decoder-only models)".into(),
            );
        }
        let zero = matches!(&o.init_weights, Some(InitWeights::Named(z)) if z == "zero");
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let width = 2 * shape.layers * kv;
        if o.prefix_projection && !cfg.inference_mode {
            // PEFT's PrefixEncoder with projection: Embedding(n, kv) -> Linear(kv, h) -> tanh
            // -> Linear(h, 2 L kv); its output is what gets saved
            let h = o.encoder_hidden_size.unwrap_or(kv);
            let emb = normal((n, kv), 1.0, &mut g, dev)?;
            let mut mlp = Vec::new();
            for (i, (inp, out)) in [(kv, h), (h, width)].into_iter().enumerate() {
                let last_zero = zero && i == 1;
                let w = crate::methods::param((out, inp), last_zero, &mut g, dev)?;
                let b = crate::methods::param((out, inp), last_zero, &mut g, dev)?
                    .as_tensor()
                    .narrow(1, 0, 1)?
                    .flatten_all()?;
                mlp.push((w, Var::from_tensor(&b)?));
            }
            return Ok(Some(Box::new(ProjectedPrefix {
                emb: Var::from_tensor(&emb)?,
                mlp,
            })));
        }
        let t = if zero {
            Tensor::zeros((n, width), DType::F32, dev)?
        } else {
            normal((n, width), 1.0, &mut g, dev)?
        };
        Ok(Some(Box::new(Prefix {
            kv: Var::from_tensor(&t)?,
        })))
    }
}

/// Prefix tuning through PEFT's projection (training only): `MLP(E)` gives the prefix.
#[derive(Debug)]
pub struct ProjectedPrefix {
    emb: Var,
    mlp: Vec<(Var, Var)>,
}

const PROJECTED: [&str; 5] = [
    "prompt_encoder.embedding.weight",
    "prompt_encoder.transform.0.weight",
    "prompt_encoder.transform.0.bias",
    "prompt_encoder.transform.2.weight",
    "prompt_encoder.transform.2.bias",
];

impl ProjectedPrefix {
    fn encode(&self) -> Result<Tensor> {
        let (w1, b1) = &self.mlp[0];
        let (w2, b2) = &self.mlp[1];
        let h = self
            .emb
            .as_tensor()
            .matmul(&w1.as_tensor().t()?)?
            .broadcast_add(b1.as_tensor())?
            .tanh()?;
        Ok(h.matmul(&w2.as_tensor().t()?)?
            .broadcast_add(b2.as_tensor())?)
    }
}

impl InputAdapter for ProjectedPrefix {
    fn key_values(&self) -> Result<Option<Tensor>> {
        Ok(Some(self.encode()?))
    }

    fn produces_positions(&self) -> bool {
        false
    }

    fn num_virtual_tokens(&self) -> usize {
        self.emb.as_tensor().dims()[0]
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let vars = [
            &self.emb,
            &self.mlp[0].0,
            &self.mlp[0].1,
            &self.mlp[1].0,
            &self.mlp[1].1,
        ];
        PROJECTED
            .iter()
            .zip(vars)
            .map(|(name, var)| NamedTensor { name, var })
            .collect()
    }

    fn export(&self) -> Result<Option<Vec<(&'static str, Tensor)>>> {
        Ok(Some(vec![(EMBEDDINGS, self.encode()?.detach())]))
    }

    fn set_prefix(&self, _t: &Tensor) -> Result<()> {
        Err(Error::Unsupported(
            "a projected prefix comes from its encoder; it cannot be set directly".into(),
        ))
    }
}

impl InputAdapter for Prefix {
    fn key_values(&self) -> Result<Option<Tensor>> {
        Ok(Some(self.kv.as_tensor().clone()))
    }

    fn produces_positions(&self) -> bool {
        false
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
        crate::methods::set_var(&self.kv, EMBEDDINGS, t)
    }
}
