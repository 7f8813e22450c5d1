//! `trainable_token_indices` (PEFT's `TrainableTokensLayer`, usable next to LoRA): chosen rows
//! of the token embedding are trained in full, e.g. for new special tokens, without training
//! the table. Mirrors PEFT `tuners/trainable_tokens/layer.py`.
//!
//! `delta (k, hidden)` holds the new values of rows `indices` (initialised to the current rows);
//! the layer computes with `E' = E.index_copy(indices, delta)`. With a tied output head the head
//! uses the same `E'` (PEFT ties a second layer to the first): one tensor, saved once as
//! `<embedding>.token_adapter.trainable_tokens_delta`. Merge writes the rows; unmerge restores
//! the originals.

use crate::adapter::{AdapterLayer, NamedTensor, Shared, WeightUpdate};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};

pub const DELTA: &str = "token_adapter.trainable_tokens_delta";

#[derive(Debug)]
pub struct TrainableTokens {
    delta: Var,        // (k, hidden), shared with a tied head
    original: Tensor,  // (k, hidden) rows as they were
    indices: Vec<u32>, // token ids, in the order of delta's rows
    vocab: usize,
    /// On the tied output head rather than the embedding (not saved: the embedding saves it).
    head: bool,
}

impl TrainableTokens {
    /// The layer for a table `weight (vocab, hidden)`; `shared` hands the same delta to a tied
    /// head.
    pub fn new(weight: &Tensor, indices: &[u32], shared: &Shared, head: bool) -> Result<Self> {
        let vocab = weight.dim(0)?;
        if let Some(bad) = indices.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::msg(format!(
                "trainable_token_indices: token {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let idx = Tensor::new(indices, weight.device())?;
        let original = weight.index_select(&idx, 0)?.to_dtype(DType::F32)?;
        let delta = shared.get_or_init("trainable_tokens_delta", || Ok(original.copy()?))?;
        Ok(TrainableTokens {
            delta,
            original,
            indices: indices.to_vec(),
            vocab,
            head,
        })
    }

    /// `delta - original`, the change to the chosen rows.
    fn change(&self) -> Result<Tensor> {
        Ok((self.delta.as_tensor() - &self.original)?)
    }

    /// (k, vocab) one-hot rows placing row j at token `indices[j]`.
    fn placement(&self, vocab: usize, dev: &candle_core::Device) -> Result<Tensor> {
        let mut p = vec![0f32; self.indices.len() * vocab];
        for (j, &i) in self.indices.iter().enumerate() {
            p[j * vocab + i as usize] = 1.0;
        }
        Ok(Tensor::from_vec(p, (self.indices.len(), vocab), dev)?)
    }
}

impl AdapterLayer for TrainableTokens {
    fn forward(&self, x: &Tensor, y: Tensor, _ctx: &crate::Ctx) -> Result<Tensor> {
        let out = y.dim(candle_core::D::Minus1)?;
        if self.head {
            // logits: columns `indices` come from the new rows: y + (x change^T) P
            let x2 = crate::methods::flat_input(x)?;
            let p = self.placement(out, x.device())?;
            let d = x2.matmul(&self.change()?.t()?)?.matmul(&p)?;
            let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
            return Ok((y + d)?);
        }
        // embedding: positions holding a chosen id take its new row
        let ids = x.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let (mut sel, mut mask) = (Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()));
        for id in ids {
            match self.indices.iter().position(|&i| i == id) {
                Some(j) => (sel.push(j as u32), mask.push(1f32)),
                None => (sel.push(0), mask.push(0f32)),
            };
        }
        let n = sel.len();
        let sel = Tensor::from_vec(sel, n, x.device())?;
        let mask = Tensor::from_vec(mask, (n, 1), x.device())?;
        let d = self.change()?.index_select(&sel, 0)?.broadcast_mul(&mask)?;
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        // the rows' change, placed in a (vocab, hidden) update (the head's layout too)
        let p = self.placement(self.vocab, self.original.device())?;
        Ok(WeightUpdate::Add(p.t()?.matmul(&self.change()?)?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        if self.head {
            return Vec::new();
        }
        vec![NamedTensor {
            name: DELTA,
            var: &self.delta,
        }]
    }

    fn vars(&self) -> Vec<Var> {
        if self.head {
            return Vec::new();
        }
        vec![self.delta.clone()]
    }
}
