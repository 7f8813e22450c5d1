//! One decoding step for several sequences at once, each with its own KV cache (its own
//! length): the projections, MLPs and head run over all rows as one batch (through each row's
//! adapter under `petal_core::rows_ctx`), attention row by row against that row's
//! cache. This is what lets a server decode concurrent requests together.

use super::{KvCache, Llama};
use candle_core::{DType, Tensor};
use petal_core::{Ctx, Error, Result};
use petal_ops::residual_add;

impl Llama {
    /// Logits (b, 1, vocab) in f32 for one new token per sequence, `ids` (b, 1); row r
    /// continues `caches[r]` (filled by a prefill through `forward`), which is extended.
    /// Row r's logits equal `forward(ids[r], Some(caches[r]))`'s.
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
        if let Some((n, _)) = &self.input {
            return Err(Error::Unsupported(format!(
                "decode_rows: input-side adapter `{n}` (prompt learning) is attached"
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
        for (i, layer) in self.layers.iter().enumerate() {
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
                    (0, cache.span),
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
