//! petal-serve: generation with a KV cache (greedy, temperature, top-k, top-p, repetition
//! penalty, stop strings, streaming), with or without adapters, and `petal serve`'s HTTP
//! server (many adapters side by side, each request through its own).

pub mod adapters;
pub mod batch;
mod fields;
pub mod generate;
pub mod http;
pub mod logprobs;
mod metrics;
mod prefix;
mod request;
mod response;
pub mod sampling;
pub mod server;

pub use batch::{Decoder, Finished};
pub use generate::{generate, generate_batch, generate_continuous, Generated, Request, StopReason};
pub use http::{Limits, Stop};
pub use sampling::SamplingParams;
pub use server::Served;
