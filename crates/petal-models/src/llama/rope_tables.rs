//! The RoPE cos and sin tables a decoder's attention reads: one pair, or LongRoPE's two (short
//! factors within the pretraining context, long ones past it), with YaRN's and LongRoPE's
//! attention factor applied.

use crate::config::LlamaConfig;
use candle_core::{Device, Tensor};
use petal_core::Result;

#[derive(Debug)]
pub(crate) struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    /// LongRoPE: the tables for a pass over more positions than this many
    long: Option<(Tensor, Tensor, usize)>,
}

impl RopeTables {
    /// The tables for `cfg`'s positions, refused when they would take over half the machine's
    /// memory (a context read from a file must not size them past it).
    pub fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let max_pos = cfg.max_position_embeddings.max(1);
        let long = cfg.long_inv_freq();
        // (positions, head_dim / 2) f32 for cos and for sin, twice for LongRoPE
        let pairs = if long.is_some() { 2 } else { 1 };
        let table_bytes = (max_pos as u64).saturating_mul(cfg.head_dim as u64 * 4 * pairs);
        let limit = petal_core::MemoryLimit::default();
        if table_bytes > limit.bytes {
            return Err(petal_core::Error::config(
                "model config",
                "max_position_embeddings",
                format!(
                    "{max_pos} positions need {} of RoPE tables, over half of this machine's \
                     memory ({})",
                    petal_core::memory::human_bytes(table_bytes),
                    petal_core::memory::human_bytes(limit.bytes)
                ),
            ));
        }
        // YaRN and LongRoPE: cos and sin scaled, so q and k are (transformers'
        // `attention_scaling`)
        let attention = cfg.rope_attention_factor();
        let tables = |inv_freq: &[f32]| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = petal_ops::rope_tables(inv_freq, max_pos, device)?;
            Ok(if attention != 1.0 {
                ((cos * attention)?, (sin * attention)?)
            } else {
                (cos, sin)
            })
        };
        let (cos, sin) = tables(&cfg.inv_freq())?;
        let long = match long {
            Some((inv_freq, original)) => {
                let (cos, sin) = tables(&inv_freq)?;
                Some((cos, sin, original))
            }
            None => None,
        };
        Ok(RopeTables { cos, sin, long })
    }

    /// The tables for a pass over `positions` positions (its largest plus one): LongRoPE's long
    /// ones past the pretraining context, as transformers picks them.
    pub fn for_positions(&self, positions: usize) -> (&Tensor, &Tensor) {
        match &self.long {
            Some((cos, sin, original)) if positions > *original => (cos, sin),
            _ => (&self.cos, &self.sin),
        }
    }

    /// LongRoPE's pretraining context (`None`: one pair of tables).
    pub fn switch(&self) -> Option<usize> {
        self.long.as_ref().map(|(_, _, original)| *original)
    }
}
