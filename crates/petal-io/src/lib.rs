//! petal-io: files in and out. Safetensors (single or sharded, memory-mapped), GGUF (llama
//! architecture, dequantized, renamed to HF names), PEFT adapter folders, atomic writes, and
//! resolving a model argument (folder, .gguf file or hub id) into a model and its tokenizer.

pub mod adapter;
pub mod atomic;
pub mod bnb;
pub mod encoder;
pub mod gguf;
pub mod gguf_lora;
pub mod gguf_out;
pub mod gptq;
pub mod gptq_out;
pub mod hub;
pub mod model;
pub mod weights;

pub use adapter::{
    adapter_tensors, attach_adapter, attach_adapter_with, exported_adapter, load_adapter,
    load_into, save_adapter, save_model_adapter, write_adapter_files, AttachOptions,
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX,
};
pub use atomic::{
    mark_output, write_atomic, write_atomic_with, write_dir_atomic, write_safetensors_atomic,
    OUTPUT_MARKER,
};
pub use encoder::{encoder_tokenizer, load_encoder, LoadedEncoder};
pub use model::{gguf_tokenizer, llama_config, load_model, parse_dtype, LoadedModel};
pub use weights::Weights;
