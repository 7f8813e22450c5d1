//! The `petal` command: subcommands over the petal crates. Also a library so that the
//! end-to-end tests drive the same code the binary runs.

pub mod adapter_opts;
pub mod assets;
pub mod bench_cmd;
pub mod classify_cmd;
pub mod common;
pub mod config_file;
pub mod export_cmd;
pub mod gen_cmd;
pub mod methods_cmd;
pub mod plot;
pub mod quantize_cmd;
pub mod ranks;
pub mod serve_cmd;
pub mod task_cmd;
pub mod tools_cmd;
pub mod train_cmd;
pub mod train_report;
