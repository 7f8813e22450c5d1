//! PASTA (Yang et al., EACL 2023, "Parameter-Efficient Tuning with Special Token Adaptation";
//! official code luka-group/PASTA, `PASTA_modeling.py`): a trainable vector per layer and per
//! special-token slot, added to the hidden state of the special tokens entering every layer;
//! nothing else of the model changes (a classifier, where there is one, trains through
//! `modules_to_save`).
//!
//! Slots: `occurrence` (the official mapping): the k-th special token of a sequence takes slot
//! k (BERT: [CLS] 0, [SEP] 1, a pair's second [SEP] 2), later ones the last slot; `token`
//! (petal's default): one slot per special token id, every occurrence of the id taking it, so
//! a decoder generating with a KV cache needs no count of what came before. For a single
//! sentence on BERT ([CLS] a [SEP]) both give the same slots. Init N(0, 0.02²) (the official
//! `nn.Embedding` under BERT's `_init_weights`): not identity at init. Not mergeable (the
//! shift depends on the token).
//!
//! petal's own adapter: `peft_type: "PASTA"`, one tensor `special_token_embedding` (layers,
//! slots, hidden), saved without a module prefix like the prompt methods' tensors.

use crate::adapter::{AdapterMethod, InputAdapter, InputShape, NamedTensor, NewAdapter};
use crate::config::{spec, AdapterConfig, Spec};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;

pub const TENSOR: &str = "special_token_embedding";

pub struct Pasta;

crate::method_options! {
    /// PASTA's options.
    pub struct PastaOptions {
        /// Token ids that count as special (comma list; `petal train` fills them with the
        /// tokenizer's special tokens found in the training data, its unknown token excepted)
        [crate::config::parse_list]
        pub special_tokens: Vec<u32> = Vec::new(),
        /// token (one slot per special token id) | occurrence (the k-th special token of a
        /// sequence takes slot k, as the official code)
        pub slots: String = "token".into(),
        /// Slots in occurrence mode (the official num_special: 2 for single sentences on BERT,
        /// 3 for pairs)
        pub num_slots: usize = 3,
        /// The model's layers and hidden size (recorded when the adapter is made)
        pub num_layers: Option<usize> = None,
        pub token_dim: Option<usize> = None,
    }
}

impl PastaOptions {
    /// Slots of each layer.
    fn slot_count(&self) -> usize {
        match self.slots.as_str() {
            "occurrence" => self.num_slots,
            _ => self.special_tokens.len(),
        }
    }
}

impl AdapterMethod for Pasta {
    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[("special_tokens", "[1]")])
    }

    fn peft_type(&self) -> &'static str {
        "PASTA"
    }

    fn options(&self) -> Spec {
        spec::<PastaOptions>()
    }

    fn default_targets(&self) -> Option<&'static str> {
        None
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        if !new.given("special_tokens") {
            cfg.set("special_tokens", &new.special_tokens)?;
        }
        cfg.set("num_layers", new.shape.layers)?;
        cfg.set("token_dim", new.shape.hidden)?;
        cfg.target_modules = None;
        Ok(())
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: PastaOptions = cfg.options()?;
        let bad = |k: &str, m: String| Err(Error::config("adapter config", k, m));
        match o.slots.as_str() {
            "token" if o.special_tokens.is_empty() => bad(
                "special_tokens",
                "is empty: list the token ids PASTA adapts (the training data holds none of \
                 the tokenizer's special tokens)"
                    .into(),
            ),
            "occurrence" if o.num_slots == 0 => {
                bad("num_slots", "0 is out of range: num_slots >= 1".into())
            }
            "token" | "occurrence" => Ok(()),
            s => bad(
                "slots",
                format!("{s:?} is not a slot mapping: token or occurrence"),
            ),
        }
    }

    fn input_values(&self, cfg: &AdapterConfig, shape: &InputShape) -> Result<u64> {
        let o: PastaOptions = cfg.options()?;
        Ok((shape.layers as u64)
            .saturating_mul(o.slot_count() as u64)
            .saturating_mul(shape.hidden as u64))
    }

    fn build_input(
        &self,
        cfg: &AdapterConfig,
        shape: &InputShape,
        seed: u64,
        dev: &Device,
    ) -> Result<Option<Box<dyn InputAdapter>>> {
        let o: PastaOptions = cfg.options()?;
        crate::methods::check_recorded(&[
            ("num_layers", o.num_layers, shape.layers),
            ("token_dim", o.token_dim, shape.hidden),
        ])?;
        let slots = o.slot_count();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let e = crate::methods::normal((shape.layers * slots, shape.hidden), 0.02, &mut g, dev)?
            .reshape((shape.layers, slots, shape.hidden))?;
        Ok(Some(Box::new(SpecialTokens {
            table: Var::from_tensor(&e)?,
            special: o.special_tokens,
            occurrence: o.slots == "occurrence",
        })))
    }
}

#[derive(Debug)]
pub struct SpecialTokens {
    table: Var, // (layers, slots, hidden)
    special: Vec<u32>,
    occurrence: bool,
}

impl SpecialTokens {
    /// Each position's slot (None: not special) for one row of ids.
    fn row_slots(&self, ids: &[u32], slots: usize) -> Vec<Option<usize>> {
        let mut k = 0;
        ids.iter()
            .map(|id| {
                let i = self.special.iter().position(|s| s == id);
                match (i, self.occurrence) {
                    (None, _) => None,
                    (Some(i), false) => Some(i),
                    (Some(_), true) => {
                        k += 1;
                        Some((k - 1).min(slots - 1))
                    }
                }
            })
            .collect()
    }
}

impl InputAdapter for SpecialTokens {
    fn continues_a_cache(&self) -> bool {
        !self.occurrence
    }
    fn token_slots(&self, ids: &Tensor, offset: usize) -> Result<Option<Tensor>> {
        let (b, t) = ids.dims2()?;
        if self.occurrence && offset > 0 {
            return Err(Error::Unsupported(
                "PASTA with occurrence slots counts the special tokens from the start of the \
                 sequence, which decoding with a cache does not see: use slots = token"
                    .into(),
            ));
        }
        let slots = self.table.as_tensor().dim(1)?;
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let mut onehot = vec![0f32; b * t * slots];
        let mut any = false;
        for (r, row) in rows.iter().enumerate() {
            for (p, s) in self.row_slots(row, slots).into_iter().enumerate() {
                if let Some(s) = s {
                    onehot[(r * t + p) * slots + s] = 1.0;
                    any = true;
                }
            }
        }
        if !any {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(
            onehot,
            (b * t, slots),
            ids.device(),
        )?))
    }

    fn layer_shift(&self, layer: usize, slots: &Tensor) -> Result<Option<Tensor>> {
        let e = self.table.as_tensor().get(layer)?; // (slots, hidden)
        Ok(Some(slots.matmul(&e)?))
    }

    fn num_virtual_tokens(&self) -> usize {
        0
    }

    fn produces_positions(&self) -> bool {
        false
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: TENSOR,
            var: &self.table,
        }]
    }

    fn set_prefix(&self, t: &Tensor) -> Result<()> {
        crate::methods::set_var(&self.table, TENSOR, t)
    }
}

#[cfg(test)]
#[path = "pasta_tests.rs"]
mod tests;
