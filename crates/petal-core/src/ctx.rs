//! What one forward pass depends on besides its inputs, handed down explicitly (never through
//! thread-locals or statics): training or inference, the adapter of each row of a mixed batch,
//! the random stream of training-time dropout, and the kernels the ops take.

use crate::rng::Stream;
use petal_ops::Kernels;
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct Ctx {
    train: bool,
    rows: Option<Arc<[String]>>,
    rng: Arc<Stream>,
    kernels: Kernels,
    /// The pass runs the frozen model alone: no adapter acts (FedIns's query pass).
    frozen: bool,
    /// Each row's query (b, d), from the frozen model's pass over the same inputs (FedIns).
    query: Option<candle_core::Tensor>,
}

impl Ctx {
    /// Inference: no dropout, every active adapter on every row.
    pub fn eval() -> Self {
        Ctx::default()
    }

    /// Training, with dropout masks drawn from `seed` (one seed per micro-batch, so a resumed
    /// run replays them).
    pub fn train(seed: u64) -> Self {
        Ctx {
            train: true,
            rng: Arc::new(Stream::new(seed)),
            ..Ctx::default()
        }
    }

    /// Inference with row i of the batch through adapter `rows[i]` ([`crate::mixed::BASE`]:
    /// none). Made by [`crate::mixed::rows_ctx`], which checks the names against the model.
    pub(crate) fn with_rows(rows: &[&str]) -> Self {
        Ctx {
            rows: Some(rows.iter().map(|s| s.to_string()).collect()),
            ..Ctx::default()
        }
    }

    /// The same pass (same rows, same random stream) with the ops taking `kernels`: a model
    /// hands its own choice, made at load, down to the adapters it runs.
    pub fn with_kernels(&self, kernels: Kernels) -> Self {
        Ctx {
            kernels,
            ..self.clone()
        }
    }

    /// The same pass over the frozen model alone: no adapter acts on any linear. A model makes
    /// it for the per-row query of instance-adaptive methods ([`Self::with_query`]).
    pub fn frozen(&self) -> Self {
        Ctx {
            frozen: true,
            query: None,
            ..self.clone()
        }
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// The same pass with each row's query `q` (b, d): the frozen model's feature of that row,
    /// which instance-adaptive adapters (FedIns) match against their keys.
    pub fn with_query(&self, q: candle_core::Tensor) -> Self {
        Ctx {
            query: Some(q),
            ..self.clone()
        }
    }

    /// Each row's query, where the model computed one ([`Self::with_query`]).
    pub fn query(&self) -> Option<&candle_core::Tensor> {
        self.query.as_ref()
    }

    /// Which kernels the ops of this pass take.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn is_train(&self) -> bool {
        self.train
    }

    /// The adapter of each row, in a mixed batch.
    pub fn rows(&self) -> Option<&[String]> {
        self.rows.as_deref()
    }

    /// A fresh seed for the next random draw of this pass.
    pub fn next_seed(&self) -> u64 {
        self.rng.next_seed()
    }

    /// Where this pass's draws stand (see [`Stream::snapshot`]).
    pub fn rng_snapshot(&self) -> (u64, u64) {
        self.rng.snapshot()
    }

    pub fn rng_restore(&self, state: (u64, u64)) {
        self.rng.restore(state)
    }
}
