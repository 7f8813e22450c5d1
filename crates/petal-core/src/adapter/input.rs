//! Adapters on the input side (prompt, prefix and P-tuning, PASTA, key-value prompts): what
//! models see of them.

use super::NamedTensor;
use crate::Result;
use candle_core::Tensor;
use std::fmt::Debug;

/// What an input-side adapter needs to know of the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputShape {
    pub hidden: usize,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// An adapter on the input side: embeddings prepended to every sequence (prompt tuning) or
/// keys and values in front of every layer's attention (prefix tuning). Models hold it as a
/// trait object and know nothing else of it.
pub trait InputAdapter: Debug + Send + Sync {
    /// (n, hidden) embeddings in front of the token embeddings (computed, for P-tuning's
    /// encoder); their positions are part of the output.
    fn embeddings(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// (n, 2 layers kv_heads head_dim) keys and values put in front of each layer's own, as if
    /// n positions were already cached: the tokens' positions start at n and no output is
    /// produced for the prefix. PEFT's layout: each row holds, for layer 0 key, layer 0 value,
    /// layer 1 key, …, the kv_heads x head_dim values.
    fn key_values(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Whether the virtual positions are part of the output (prompt tuning, P-tuning) rather
    /// than cached keys and values (prefix tuning).
    fn produces_positions(&self) -> bool {
        true
    }
    /// Token-level shifts (PASTA): for ids (b, t), after `offset` positions already cached,
    /// each position's slot as a one-hot (b t, slots) f32, or None when no position has one.
    /// Computed once per forward; `layer_shift` turns it into each layer's addition.
    fn token_slots(&self, _ids: &Tensor, _offset: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Whether `token_slots` takes an `offset` past 0: a pass may go on from a cache (PASTA's
    /// occurrence slots count from the start of the sequence, so they do not).
    fn continues_a_cache(&self) -> bool {
        true
    }
    /// The (b t, hidden) f32 addition to the hidden states entering layer `layer`, for the
    /// slots of `token_slots`.
    fn layer_shift(&self, _layer: usize, _slots: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Number of virtual positions.
    fn num_virtual_tokens(&self) -> usize;
    /// Rows of `key_values`: the leading keys that stand for cached positions and are not
    /// rotated (prefix tuning: its virtual tokens; E2VPT-style prompts: their key-value slots).
    fn prefix_len(&self) -> usize {
        match self.produces_positions() {
            true => 0,
            false => self.num_virtual_tokens(),
        }
    }
    /// What PEFT saves when it differs from the trained tensors (P-tuning saves its encoder's
    /// output as `prompt_embeddings`): the final adapter holds these, checkpoints the tensors.
    fn export(&self) -> Result<Option<Vec<(&'static str, Tensor)>>> {
        Ok(None)
    }
    /// Owned tensors under their PEFT names (saved without the module prefix).
    fn tensors(&self) -> Vec<NamedTensor<'_>>;
    /// Replace the prefix (loading, text init), checking its shape.
    fn set_prefix(&self, t: &Tensor) -> Result<()>;
    /// The adapter as `Any`, for a method's own training hook to reach its state.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}
