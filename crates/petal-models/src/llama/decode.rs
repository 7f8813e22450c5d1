//! One decoding step for several sequences at once, each with its own KV cache (its own
//! length): the projections, MLPs and head run over all rows as one batch (through each row's
//! adapter under `petal_core::rows_ctx`, or every row through the model as it is), attention
//! row by row against that row's cache. This is what lets a server decode concurrent requests
//! together, and an evaluation decode many prompts at once.

use super::{KvCache, Llama};
use candle_core::{DType, Tensor};
use petal_core::{Ctx, Error, Result};
use petal_ops::residual_add;

impl Llama {
    /// Logits (b, 1, vocab) in f32 for one new token per sequence, `ids` (b, 1); row r
    /// continues `caches[r]` (filled by a prefill through `forward`), which is extended.
    /// Row r's logits equal `forward(ids[r], Some(caches[r]))`'s. An input-side adapter acts
    /// on every row as in `forward`: its virtual tokens and prefixes are in the caches since
    /// the prefill, its token shifts (PASTA) are added at each layer (`rows_ctx` refuses one,
    /// so it runs under the plain context only).
    pub fn decode_rows(
        &self,
        ids: &Tensor,
        caches: &mut [&mut KvCache],
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let ctx = &self.pass(ctx);
        let (b, t) = ids.dims2()?;
        if t != 1 || b != caches.len() {
            return Err(Error::msg(format!(
                "decode_rows: ids ({b}, {t}) for {} caches; one new token per cache",
                caches.len()
            )));
        }
        if let (Some((n, _)), true) = (&self.input, caches.iter().any(|c| c.is_empty())) {
            return Err(Error::msg(format!(
                "decode_rows: an empty cache with input-side adapter `{n}` attached (its \
                 virtual tokens enter at the prefill, through `forward`)"
            )));
        }
        let context = self.cfg.max_position_embeddings;
        if let Some(c) = caches.iter().find(|c| c.len() + 1 > context) {
            return Err(Error::msg(format!(
                "sequence of {} tokens exceeds the model's context of {context}",
                c.len() + 1
            )));
        }
        let mut x = self.embed.forward(ids, ctx)?.to_dtype(self.resid)?;
        let slots = self
            .input
            .as_ref()
            .map(|(_, a)| a.token_slots(ids, 1)) // every row past its prefill
            .transpose()?
            .flatten();
        // as `hidden_states` sets a cache's RoPE span, its virtual positions added
        let before = self.virtual_positions();
        let span = |c: &KvCache| if c.span > 0 { c.span + before } else { 0 };
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(shifted) = self.token_shift(i, &x, slots.as_ref())? {
                x = shifted;
            }
            let h = self.rms(&x, &layer.ln1)?;
            let at = &layer.attn;
            let (q, k, v) = (
                at.q.forward(&h, ctx)?,
                at.k.forward(&h, ctx)?,
                at.v.forward(&h, ctx)?,
            );
            let mut o = Vec::with_capacity(b);
            for (r, cache) in caches.iter_mut().enumerate() {
                let row = |t: &Tensor| t.narrow(0, r, 1);
                o.push(self.attend(
                    &row(&q)?,
                    row(&k)?,
                    row(&v)?,
                    (0, span(cache)),
                    Some(&mut cache.kv[i]),
                    None,
                )?);
            }
            let a = at.o.forward(&Tensor::cat(&o, 0)?, ctx)?;
            x = self.mlp_block(layer, &residual_add(self.kernels, &x, &a)?, ctx)?;
        }
        let h = self.final_norm(&x)?;
        Ok(self.lm_head.forward(&h, ctx)?.to_dtype(DType::F32)?)
    }
}
