//! The attention block of a decoder layer: the q, k, v projections, causal attention through
//! the KV cache and after a prefix, and the o projection.

use super::kv_cache::Slot;
use super::{Attention, Llama, Stage};
use candle_core::Tensor;
use petal_core::{Ctx, Result};
use petal_ops::{causal_attention_bthd, Rope};

impl Llama {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        &self,
        at: &Attention,
        x: &Tensor,
        stage: &Stage,
        kv: Option<&mut Option<Slot>>,
        prefix: Option<(Tensor, Tensor)>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        // Heads token-major and merged (b, t, heads * d), as the projections write them, and q,
        // k unrotated: the attention op reorders and applies RoPE inside, so no transposed,
        // reshaped or rotated copy of q, k, v or the output enters the graph.
        let q = at.q.forward(x, ctx)?;
        let k = at.k.forward(x, ctx)?;
        let v = at.v.forward(x, ctx)?;
        let o = self.attend(&q, k, v, (stage.rope_from, stage.rope_span), kv, prefix)?;
        at.o.forward(&o, ctx)
    }

    /// Causal attention of projected q, k, v (b, t, heads * d), unrotated, through the cache
    /// slot and after the prefix where given; the output before the o projection. `rope`: the
    /// leading keys a prefix holds unrotated, and the positions the pass stands for at least
    /// (its RoPE tables; 0: its own).
    pub(crate) fn attend(
        &self,
        q: &Tensor,
        mut k: Tensor,
        mut v: Tensor,
        (rope_from, span): (usize, usize),
        kv: Option<&mut Option<Slot>>,
        prefix: Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let d = self.cfg.head_dim;
        let t = k.dim(1)?;
        // With a cache (decoding), the new keys are rotated here and the cache holds rotated
        // keys, so no step rotates the whole cache again; the op then rotates q only.
        let cached = kv.as_ref().and_then(|s| s.as_ref()).map_or(0, |s| s.len());
        let seen = cached + prefix.as_ref().map_or(0, |(pk, _)| pk.dims()[1]);
        let (cos, sin) = self.rope.for_positions((seen + t).max(span));
        let from = if kv.is_some() {
            let new_rows = |tab: &Tensor| tab.narrow(0, seen, t);
            k = petal_ops::apply_rope_bthd(self.kernels, &k, &new_rows(cos)?, &new_rows(sin)?)?;
            seen + t
        } else {
            rope_from
        };
        if let Some((pk, pv)) = prefix {
            k = Tensor::cat(&[&pk, &k], 1)?;
            v = Tensor::cat(&[&pv, &v], 1)?;
        }
        if let Some(slot) = kv {
            // written in place after what the cache holds; read back without a graph
            (k, v) = Slot::push(slot, &k, &v)?;
        }
        // Grouped-query attention without copying k/v per query head (HF's repeat_kv order:
        // head h reads kv head h / (nh / nkv)); scores are never held whole on the CPU.
        let rope = Rope { cos, sin, from };
        Ok(causal_attention_bthd(
            self.kernels,
            q,
            &k,
            &v,
            d,
            1.0 / (d as f64).sqrt(),
            Some(rope),
        )?)
    }
}
