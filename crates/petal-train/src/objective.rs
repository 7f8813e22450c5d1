//! What the trainer trains: a model with adapters and the loss of a batch of examples. The
//! language-model objective (next-token loss over the scored tokens) is here; sequence
//! classification is in `classify.rs`. The trainer knows nothing else of the model.

use crate::eval::{backward_batch, evaluate, EvalResult};
use candle_core::Device;
use petal_core::{Adaptable, Result};
use petal_data::{batches, Batch, Example};
use petal_models::{Grads, Llama};
use petal_ops::Kernels;

pub trait Objective {
    /// The model the adapters live on.
    fn model(&self) -> &dyn Adaptable;
    fn device(&self) -> &Device;
    fn kernels(&self) -> Kernels;
    /// What the loss is averaged over in `examples`: scored tokens, or examples.
    fn units(&self, examples: &[Example]) -> usize;
    /// The summed loss of `examples` (one batch) divided by `scale`, and its gradients, in
    /// training mode with dropout drawn from `seed`. Returns the summed (unscaled) loss.
    fn backward(&self, examples: &[Example], scale: f64, seed: u64) -> Result<(f64, Grads)>;
    /// The validation metrics of `examples`, in batches of `batch_size`.
    fn evaluate(&self, examples: &[Example], batch_size: usize) -> Result<EvalResult>;
}

/// Next-token prediction on a decoder: the loss averaged over the scored (non-ignored) tokens.
pub struct LmObjective<'a> {
    pub model: &'a Llama,
    /// The padding id of batches.
    pub pad: u32,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    pub checkpointing: bool,
}

impl LmObjective<'_> {
    fn batch(&self, examples: &[Example]) -> Batch {
        batches(examples, examples.len().max(1), self.pad).remove(0)
    }
}

impl Objective for LmObjective<'_> {
    fn model(&self) -> &dyn Adaptable {
        self.model
    }
    fn device(&self) -> &Device {
        self.model.device()
    }
    fn kernels(&self) -> Kernels {
        self.model.kernels()
    }
    fn units(&self, examples: &[Example]) -> usize {
        if examples.is_empty() {
            return 0;
        }
        self.batch(examples).target_tokens()
    }
    fn backward(&self, examples: &[Example], scale: f64, seed: u64) -> Result<(f64, Grads)> {
        backward_batch(
            self.model,
            &self.batch(examples),
            scale,
            self.checkpointing,
            seed,
        )
    }
    fn evaluate(&self, examples: &[Example], batch_size: usize) -> Result<EvalResult> {
        evaluate(self.model, examples, batch_size, self.pad)
    }
}
