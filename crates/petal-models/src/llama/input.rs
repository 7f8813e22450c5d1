//! What input-side adapters put into the decoder: virtual token embeddings in front of the
//! sequence (prompt tuning, P-tuning), per-layer key/value prefixes (prefix tuning), and
//! per-layer shifts of chosen tokens' hidden states (PASTA).

use super::{Llama, Stage};
use candle_core::Tensor;
use petal_core::{Ctx, Result};

impl Llama {
    /// Token embeddings (after any virtual tokens) and prefix keys/values, for tokens at
    /// positions from `offset` (tokens already in the cache).
    pub(crate) fn input_stage(&self, ids: &Tensor, offset: usize, ctx: &Ctx) -> Result<Stage> {
        let (b, t) = ids.dims2()?;
        let h = self.cfg.hidden_size;
        let mut x = self.embed.forward(ids, ctx)?.to_dtype(self.resid)?;
        debug_assert_eq!(x.dims(), &[b, t, h]);
        let cached = offset;
        let input = self.input.as_ref().filter(|_| offset == 0).map(|(_, a)| a);
        if let Some(p) = input.map(|a| a.embeddings()).transpose()?.flatten() {
            let p = p.to_dtype(self.resid)?; // (n, h), at the start only
            let n = p.dim(0)?;
            let p = p.unsqueeze(0)?.broadcast_as((b, n, h))?.contiguous()?;
            x = Tensor::cat(&[&p, &x], 1)?;
        }
        // prefix tuning: per-layer keys and values stand for n positions already seen
        let kv_prefix = input.map(|a| a.key_values()).transpose()?.flatten();
        let offset = offset
            + kv_prefix
                .as_ref()
                .map(|kv| kv.dim(0))
                .transpose()?
                .unwrap_or(0);
        let t = x.dim(1)?;
        if offset + t > self.cfg.max_position_embeddings {
            return Err(petal_core::Error::msg(format!(
                "sequence of {} tokens exceeds the model's context of {}",
                offset + t,
                self.cfg.max_position_embeddings
            )));
        }
        // a prefix's keys lead every layer's keys (in the cache too, after the first step)
        let rope_from = self.input.as_ref().map_or(0, |(_, a)| a.prefix_len());
        // token-level shifts apply at every step, cached or not
        let slots = self
            .input
            .as_ref()
            .map(|(_, a)| a.token_slots(ids, cached))
            .transpose()?
            .flatten();
        Ok(Stage {
            x,
            kv_prefix,
            rope_from,
            rope_span: 0,
            slots,
        })
    }

    /// `x` plus the input adapter's shift of layer `i` at its tokens' slots (PASTA), if any.
    pub(super) fn token_shift(
        &self,
        i: usize,
        x: &Tensor,
        slots: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let (Some(slots), Some((_, a))) = (slots, self.input.as_ref()) else {
            return Ok(None);
        };
        let Some(shift) = a.layer_shift(i, slots)? else {
            return Ok(None);
        };
        let shift = shift.reshape(x.shape())?.to_dtype(x.dtype())?;
        Ok(Some((x + shift)?))
    }

    /// Layer i's (key, value) prefix as (b, n, kv_heads * head_dim), from the adapter's
    /// (n, 2 layers kv_dim) slots 2i and 2i + 1.
    pub(super) fn layer_prefix(&self, p: &Tensor, i: usize, b: usize) -> Result<(Tensor, Tensor)> {
        let (nkv, d) = (self.cfg.num_key_value_heads, self.cfg.head_dim);
        let n = p.dim(0)?;
        let one = |slot: usize| -> Result<Tensor> {
            Ok(p.narrow(1, slot * nkv * d, nkv * d)?
                .to_dtype(self.act)?
                .reshape((1, n, nkv * d))?
                .broadcast_as((b, n, nkv * d))?
                .contiguous()?)
        };
        Ok((one(2 * i)?, one(2 * i + 1)?))
    }
}
