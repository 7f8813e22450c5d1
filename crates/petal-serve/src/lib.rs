//! petal-serve: generation with a KV cache (greedy, temperature, top-k, top-p, repetition
//! penalty, stop strings, streaming), with or without adapters.

pub mod generate;
pub mod sampling;

pub use generate::{generate, Generated, StopReason};
pub use sampling::SamplingParams;
