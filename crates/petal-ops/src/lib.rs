//! petal-ops: kernels and math with no model knowledge.
//!
//! Every op here is differentiable end to end. candle 0.11's own `softmax_last_dim`, `rms_norm`,
//! `rope` and `sdpa` have no backward pass and silently stop gradients, so petal keeps a
//! readable composed reference of each op (`nn.rs`, built from differentiable primitives) and a
//! fused CPU kernel with a hand-written backward (`kernels.rs`, `head_loss.rs`,
//! `frozen_linear.rs`), tested against each other. Every op takes a [`Kernels`] choice;
//! `Kernels::reference()` selects the references.

pub mod amx;
pub mod attention;
pub mod bf16;
#[cfg(test)]
mod bf16_activations;
pub mod blocks;
mod choice;
pub mod cpu;
pub mod cuda;
pub mod fastfood;
pub mod frozen_linear;
pub mod head_loss;
pub mod int8;
pub mod inverse;
pub mod kernels;
pub mod lean;
pub mod linalg;
pub mod lora_linear;
pub mod loss;
pub mod nn;
pub mod paca;
pub mod pair_rotate;
pub mod quant;
pub mod rope;
pub mod scale;
mod skinny;
pub mod sparse;
#[doc(hidden)]
pub mod testing;
pub mod vmath;

pub use attention::{causal_attention, causal_attention_bthd, Rope};
pub use blocks::rotate_blocks;
pub use choice::{parse_families, Frozen, Kernels};
pub use frozen_linear::frozen_linear;
pub use head_loss::head_cross_entropy;
pub use inverse::inverse;
pub use kernels::{causal_softmax, residual_add, rms_norm, softmax_last_dim, swiglu};
pub use lora_linear::{lora, lora_linear, low_rank, quant_lora};
pub use loss::{masked_cross_entropy, IGNORE_INDEX};
pub use nn::{causal_mask, rope_tables};
pub use paca::paca_linear;
pub use pair_rotate::pair_rotate;
pub use rope::{apply_rope, apply_rope_bthd};
pub use scale::{add_frozen, scale_last, scale_shift_last};
