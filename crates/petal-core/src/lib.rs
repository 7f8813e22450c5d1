//! petal-core: the adapter API shared by every PEFT method.
//!
//! A model builds each projection as an [`AdaptableLinear`]; methods attach [`AdapterLayer`]s to
//! them through [`inject::inject_adapter`], driven by a PEFT-format [`AdapterConfig`]. Merge,
//! unmerge and safe-merge live once in `linear.rs`, from each method's [`WeightUpdate`].

pub mod adapter;
pub mod config;
pub mod ctx;
pub mod error;
pub mod inject;
pub mod linear;
pub mod memory;
pub mod methods;
pub mod mixed;
pub mod norm;
pub mod registry;
pub mod rng;
pub mod target;
pub mod walk;

pub use adapter::{
    AdapterLayer, AdapterMethod, Flag, InputAdapter, NamedTensor, NewAdapter, QuantGrid, Rays,
    SharedOption, TrainingHook, WeightUpdate,
};
pub use config::AdapterConfig;
pub use ctx::Ctx;
pub use error::{Error, Result};
pub use inject::{inject_adapter, inject_adapter_within, Adaptable, InjectionReport, ParamCount};
pub use linear::AdaptableLinear;
pub use memory::MemoryLimit;
pub use mixed::rows_ctx;
pub use norm::AdaptableNorm;

#[doc(hidden)]
pub mod testing;
