//! petal-data: tokenizers, chat templates, JSONL/text readers, loss masks, packing, batching.
//! Stands alone: no tensor library, only token ids and labels.

pub mod classify;
pub mod dataset;
pub mod error;
pub mod tasks;
pub mod template;
pub mod tokenizer;

pub use classify::{labels_of, load_classification, Labels};
pub use dataset::{
    balanced_order, batches, group_by_task, load_examples, pack, select_tasks, split, tasks, Batch,
    DataOptions, Example,
};
pub use error::{DataError, Result};
pub use template::ChatTemplate;
pub use tokenizer::Tokenizer;

/// Label of a position that carries no loss (transformers' ignore index).
pub const IGNORE: i64 = -100;
