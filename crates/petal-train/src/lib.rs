//! petal-train: one readable training loop (trainer.rs) with AdamW, schedules, accumulation,
//! clipping, evaluation, exact checkpoints and metrics.

pub mod checkpoint;
pub mod classify;
pub mod eval;
pub mod objective;
pub mod optim;
pub mod parallel;
mod preference;
pub mod schedule;
#[cfg(test)]
mod test_support;
pub mod trainer;

pub use eval::{backward_batch, batch_loss, evaluate, EvalResult};
pub use objective::{LmObjective, Objective};
pub use optim::AdamW;
pub use parallel::{Collective, Group};
pub use schedule::Schedule;
pub use trainer::{train, train_objective, Observer, StepMetrics, TrainConfig, TrainSummary};
