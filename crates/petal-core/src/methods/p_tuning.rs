//! P-tuning (Liu et al., 2021, "GPT Understands, Too"): virtual token embeddings produced by a
//! small trained encoder, prepended like prompt tuning. Mirrors PEFT `tuners/p_tuning`
//! (`PromptEncoder`, MLP reparameterisation).
//!
//! Training: `E (n, d)` and an MLP `Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d)`
//! (`h = encoder_hidden_size`, PEFT's default d); the prefix is `MLP(E)`. PEFT saves only that
//! output, as `prompt_embeddings (n, d)` at the top level with `inference_mode = true`, and an
//! adapter loaded that way is a fixed prefix (as in PEFT). petal's checkpoints keep E and the
//! MLP (under PEFT's module names) so a resumed run continues exactly. Init as torch's:
//! E ~ N(0, 1), linear weights and biases U(±1/sqrt(fan_in)). The LSTM reparameterisation is
//! refused. Cannot be merged into weights.

use crate::adapter::{AdapterMethod, InputAdapter, InputShape, NamedTensor};
use crate::config::AdapterConfig;
use crate::methods::prompt_tuning::{virtual_tokens, PromptEmbedding, EMBEDDINGS};
use crate::methods::{kaiming_uniform, normal};
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;

pub struct PTuning;

#[derive(Debug)]
pub struct PromptEncoder {
    emb: Var,
    /// (weight (out, in), bias (out)) of the MLP's three linears.
    mlp: Vec<(Var, Var)>,
}

const NAMES: [&str; 7] = [
    "prompt_encoder.embedding.weight",
    "prompt_encoder.mlp_head.0.weight",
    "prompt_encoder.mlp_head.0.bias",
    "prompt_encoder.mlp_head.2.weight",
    "prompt_encoder.mlp_head.2.bias",
    "prompt_encoder.mlp_head.4.weight",
    "prompt_encoder.mlp_head.4.bias",
];

impl AdapterMethod for PTuning {
    fn peft_type(&self) -> &'static str {
        "P_TUNING"
    }

    fn config_keys(&self) -> &'static [&'static str] {
        &[
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_attention_heads",
            "num_layers",
            "encoder_reparameterization_type",
            "encoder_hidden_size",
            "encoder_num_layers",
            "encoder_dropout",
        ]
    }

    fn build_input(
        &self,
        cfg: &AdapterConfig,
        shape: &InputShape,
        seed: u64,
        dev: &Device,
    ) -> Result<Option<Box<dyn InputAdapter>>> {
        let d = shape.hidden;
        let n = virtual_tokens(cfg, d)?;
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let emb = normal((n, d), 1.0, &mut g, dev)?;
        if cfg.inference_mode {
            // a saved adapter: the encoder's output, used as it is
            return Ok(Some(Box::new(PromptEmbedding::new(&emb)?)));
        }
        if let Some(t) = cfg
            .encoder_reparameterization_type
            .as_deref()
            .filter(|t| *t != "MLP")
        {
            return Err(Error::Unsupported(format!(
                "P-tuning encoder_reparameterization_type {t:?}: petal trains the MLP encoder only"
            )));
        }
        let h = cfg.encoder_hidden_size.unwrap_or(d);
        let mut mlp = Vec::new();
        for (inp, out) in [(d, h), (h, h), (h, d)] {
            let w = kaiming_uniform((out, inp), &mut g, dev)?;
            // bias: `out` draws of U(±1/sqrt(in)), nn.Linear's default
            let b = kaiming_uniform((out, inp), &mut g, dev)?
                .narrow(1, 0, 1)?
                .flatten_all()?;
            mlp.push((Var::from_tensor(&w)?, Var::from_tensor(&b)?));
        }
        Ok(Some(Box::new(PromptEncoder {
            emb: Var::from_tensor(&emb)?,
            mlp,
        })))
    }
}

impl PromptEncoder {
    fn encode(&self) -> Result<Tensor> {
        let mut x = self.emb.as_tensor().clone();
        for (i, (w, b)) in self.mlp.iter().enumerate() {
            x = x
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
            if i + 1 < self.mlp.len() {
                x = x.relu()?;
            }
        }
        Ok(x)
    }
}

impl InputAdapter for PromptEncoder {
    fn embeddings(&self) -> Result<Option<Tensor>> {
        Ok(Some(self.encode()?))
    }

    fn num_virtual_tokens(&self) -> usize {
        self.emb.as_tensor().dims()[0]
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let mut v = vec![NamedTensor {
            name: NAMES[0],
            var: &self.emb,
        }];
        for (i, (w, b)) in self.mlp.iter().enumerate() {
            v.push(NamedTensor {
                name: NAMES[1 + 2 * i],
                var: w,
            });
            v.push(NamedTensor {
                name: NAMES[2 + 2 * i],
                var: b,
            });
        }
        v
    }

    fn export(&self) -> Result<Option<Vec<(&'static str, Tensor)>>> {
        Ok(Some(vec![(EMBEDDINGS, self.encode()?.detach())]))
    }

    fn set_prefix(&self, _t: &Tensor) -> Result<()> {
        Err(Error::Unsupported(
            "P-tuning's prefix comes from its encoder; it cannot be set directly".into(),
        ))
    }
}
