//! petal-models: real pretrained architectures, written with differentiable ops, whose
//! projections are `AdaptableLinear`s.

pub mod bert;
pub mod checkpoint;
pub mod config;
pub mod dtype;
pub mod llama;
pub mod rope;
pub mod weights;

pub use bert::{segments, Bert, BertConfig};
pub use checkpoint::Grads;
pub use config::LlamaConfig;
pub use dtype::{act_dtype, resid_dtype, Precision};
pub use llama::{random_weights, KvCache, Llama};
pub use rope::RopeScaling;
pub use weights::WeightSource;
