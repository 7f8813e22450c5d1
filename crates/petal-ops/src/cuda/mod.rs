//! CUDA kernels for the ops the CPU fuses (`kernels.cu`, compiled at run time by NVRTC): RMSNorm,
//! softmax (plain and scaled causal), RoPE in both layouts, SwiGLU and the cross-entropy of a
//! chunk of logits, each one launch per direction where candle's composed ops take five to ten.
//! Each op is a graph node whose backward launches its backward kernel. They run on f32 and bf16
//! activations of a CUDA tensor when the op's [`Kernels`] switch their family on (the `petal`
//! binary: [`Family::DEFAULT`] unless `PETAL_CUDA_KERNELS` names others; their tests,
//! `tests/cuda_kernels.rs`, pass on an H200). Without the `cuda` feature
//! `usable` is false and nothing here runs.

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use crate::Kernels;
use candle_core::{DType, Tensor};

mod emulate;
#[cfg(feature = "cuda")]
mod imp;
mod launch;
mod ops;
#[doc(hidden)]
pub use emulate::{emulate_from, emulating};
pub use ops::{
    adamw_step, attention, cross_entropy_grad, cross_entropy_rows, lora, rms_norm, rope, softmax,
    swiglu, AdamStep, MAX_LORA_RANK,
};

const COMMON: &str = include_str!("common.cuh");

/// The source of the kernels' module for the row and elementwise ops (every dtype).
pub fn source() -> String {
    [COMMON, include_str!("kernels.cu")].concat()
}

/// The source of the attention kernels and the NVRTC options that compile them for heads of
/// `head_dim` values (one module per head size).
pub fn attention_source(head_dim: usize) -> (String, Vec<String>) {
    let src = [COMMON, include_str!("attention.cu")].concat();
    (src, vec![format!("-DHD={head_dim}")])
}

/// The largest head the attention kernels take (their tiles fill 33 KB of shared memory).
pub const MAX_HEAD_DIM: usize = 128;

/// The kernel families, each switched on or off on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Norm,
    Softmax,
    Rope,
    Swiglu,
    Loss,
    Attention,
    /// AdamW on every parameter in one launch
    Adamw,
    /// LoRA's low-rank term added to the base product in one launch
    Lora,
}

impl Family {
    pub const ALL: [Family; 8] = [
        Family::Norm,
        Family::Softmax,
        Family::Rope,
        Family::Swiglu,
        Family::Loss,
        Family::Attention,
        Family::Adamw,
        Family::Lora,
    ];

    /// The families on when `PETAL_CUDA_KERNELS` is unset: every one whose GPU tests pass and
    /// that made a step no slower where measured. Attention is left out: correct on an H200,
    /// but one thread per query row (and per key in backward) is too little work for the GPU at
    /// Qwen2.5-1.5B's shape, whose step it made 3.7x slower (docs/gpu.md).
    pub const DEFAULT: [Family; 7] = [
        Family::Norm,
        Family::Softmax,
        Family::Rope,
        Family::Swiglu,
        Family::Loss,
        Family::Adamw,
        Family::Lora,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Norm => "norm",
            Family::Softmax => "softmax",
            Family::Rope => "rope",
            Family::Swiglu => "swiglu",
            Family::Loss => "loss",
            Family::Attention => "attention",
            Family::Adamw => "adamw",
            Family::Lora => "lora",
        }
    }

    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Whether `t` takes the kernels of `family`: an f32 or bf16 tensor on a CUDA device, the
/// fast paths and the family switched on, and the kernels compiled (where NVRTC is missing
/// or fails, a warning once and candle's ops instead).
pub fn usable(k: Kernels, t: &Tensor, family: Family) -> bool {
    let on_gpu = cfg!(feature = "cuda") && t.device().is_cuda();
    // AdamW's launch takes device addresses: it has no emulated path
    let emulated = t.device().is_cpu() && emulating() && family != Family::Adamw;
    (on_gpu || emulated)
        && k.cuda_on(family)
        && matches!(t.dtype(), DType::F32 | DType::BF16)
        && (emulated || compiled(0))
}

/// Whether the attention kernels for heads of `head_dim` values run on `t` (see `usable`).
pub fn attention_usable(k: Kernels, t: &Tensor, head_dim: usize) -> bool {
    usable(k, t, Family::Attention)
        && (1..=MAX_HEAD_DIM).contains(&head_dim)
        && match t.device().is_cpu() {
            true => emulate::has_module(head_dim),
            false => compiled(head_dim),
        }
}

fn compiled(module: usize) -> bool {
    #[cfg(feature = "cuda")]
    return imp::ptx(module).is_ok();
    #[cfg(not(feature = "cuda"))]
    return module == usize::MAX;
}

/// Where a module's PTX is kept between runs: `$PETAL_CACHE/ptx` (default
/// `~/.cache/petal/ptx`), named by a hash of the source and compile options. None without a
/// home folder.
pub fn ptx_cache_path(src: &str, options: &[String]) -> Option<std::path::PathBuf> {
    let root = match std::env::var_os("PETAL_CACHE") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache/petal"),
    };
    // FNV-1a, 64 bits: stable across runs and builds (std's hasher is not)
    let mut h: u64 = 0xcbf29ce484222325;
    let text = [src, "\0compute_80\0", &options.join("\0")].concat();
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    Some(root.join("ptx").join(format!("{h:016x}.ptx")))
}

/// The PTX of a module (0: rows and elements, d: attention for heads of d), compiled or read
/// from the cache; for tests.
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub fn module_ptx(head_dim: usize) -> candle_core::Result<&'static str> {
    imp::ptx(head_dim)
}

/// Keeps compiled PTX for later runs (temp file, then rename, so a reader never sees half of
/// it); a cache that cannot be written is skipped.
fn write_ptx_cache(path: &std::path::Path, ptx: &str) {
    let Some(dir) = path.parent() else { return };
    let tmp = dir.join(format!(".{}.tmp", std::process::id()));
    let ok = std::fs::create_dir_all(dir).is_ok() && std::fs::write(&tmp, ptx).is_ok();
    if !(ok && std::fs::rename(&tmp, path).is_ok()) {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ptx_cache_is_named_by_source_and_options() {
        let (src, hd) = attention_source(64);
        let a = ptx_cache_path(&src, &hd).unwrap();
        assert_eq!(a, ptx_cache_path(&src, &hd).unwrap());
        assert_ne!(a, ptx_cache_path(&src, &attention_source(32).1).unwrap());
        assert_ne!(a, ptx_cache_path(&source(), &hd).unwrap());
    }
}
