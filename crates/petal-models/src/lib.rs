//! petal-models: real pretrained architectures, written with differentiable ops, whose
//! projections are `AdaptableLinear`s.

pub mod checkpoint;
pub mod config;
pub mod llama;
pub mod load;

pub use checkpoint::Grads;
pub use config::LlamaConfig;
pub use llama::{act_dtype, random_weights, resid_dtype, set_bf16_activations, KvCache, Llama};
pub use load::{load_model, LoadedModel};
