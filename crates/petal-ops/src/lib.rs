//! petal-ops: kernels and math with no model knowledge.
//!
//! Every op here is differentiable end to end. candle 0.11's own `softmax_last_dim`, `rms_norm`,
//! `rope` and `sdpa` have no backward pass and silently stop gradients, so petal composes its
//! own from differentiable primitives, or writes a `CustomOp` with a hand-written backward
//! (`frozen_linear`). Each op keeps a readable reference next to it and a test tying them.

pub mod frozen_linear;
pub mod loss;
pub mod nn;

pub use frozen_linear::frozen_linear;
pub use loss::{masked_cross_entropy, IGNORE_INDEX};
pub use nn::{apply_rope, causal_mask, rms_norm, rope_tables, softmax_last_dim};
