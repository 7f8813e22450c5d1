//! petal's CUDA kernels run on the CPU, two ways, on machines without a GPU:
//! - `tools/cuda_emu/check.cpp` includes the kernels' own source with `emu.h` standing in for
//!   the CUDA runtime (one OS thread per GPU thread, real barriers) and checks every kernel,
//!   forward and backward, against naive double-precision references, attention for heads of
//!   32, 64 and 128 values;
//! - `tools/cuda_emu/module.cpp` builds each CUDA module as a CPU library, and petal's ops run
//!   on CPU tensors through it (`petal_ops::cuda::emulate_from`): the same launches as on a
//!   GPU (kernel names, argument order, shapes, grids), checked by `kernel_checks` as the GPU
//!   tests check them (`cuda_kernels.rs`, `--features cuda`).
//!
//! Both need g++ (C++20); without it they say so and pass.

mod kernel_checks;

use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether a g++ with C++20's <barrier> (11 or later) is here.
fn have_gpp() -> bool {
    let major = Command::new("g++")
        .arg("-dumpversion")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split('.')
                .next()?
                .trim()
                .parse::<u32>()
                .ok()
        });
    let ok = major.is_some_and(|m| m >= 11);
    if !ok {
        petal_ops::testing::skip_missing_tool("no g++ 11 or later to build the emulated kernels");
    }
    ok
}

#[test]
fn the_cuda_kernels_match_naive_references_when_emulated_on_the_cpu() {
    if !have_gpp() {
        return;
    }
    let script = root().join("tools/cuda_emu/run.sh");
    let out = Command::new("bash").arg(&script).output().expect("bash");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("all ok").count(), 3, "{text}");
}

/// petal0.so (row and elementwise kernels) and petal<d>.so (attention) for heads of 32, 64
/// and 128, built into `dir`.
fn build_modules(dir: &Path) {
    let src = root().join("tools/cuda_emu/module.cpp");
    for hd in [0, 32, 64, 128] {
        let mut cmd = Command::new("g++");
        cmd.args(["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread"])
            .arg("-Wno-unknown-pragmas")
            .arg(&src)
            .arg("-o")
            .arg(dir.join(format!("petal{hd}.so")));
        if hd > 0 {
            cmd.arg(format!("-DHD={hd}"));
        }
        let out = cmd.output().expect("g++");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_op_through_its_emulated_cuda_kernels_matches_the_composed_ops() {
    if !have_gpp() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    build_modules(dir.path());
    petal_ops::cuda::emulate_from(dir.path());
    let cpu = Device::Cpu;
    // one after another: emulated launches take turns
    kernel_checks::the_rms_norm_kernel_matches_autograd_through_the_composed_norm(&cpu);
    kernel_checks::the_rms_norm_kernel_normalises_an_f32_stream_into_a_bf16_weights_dtype(&cpu);
    kernel_checks::the_softmax_kernel_matches_autograd_through_the_composed_softmax(&cpu);
    kernel_checks::the_causal_softmax_kernel_matches_autograd_through_scale_mask_and_softmax(&cpu);
    kernel_checks::the_rope_kernel_matches_autograd_through_the_composed_rotation_in_both_layouts(
        &cpu,
    );
    kernel_checks::the_swiglu_kernel_matches_autograd_through_silu_times_up(&cpu);
    kernel_checks::the_cross_entropy_kernels_match_the_definition_in_value_and_gradient(&cpu);
    kernel_checks::the_head_loss_matches_logits_then_cross_entropy_by_definition(&cpu);
    kernel_checks::the_attention_kernels_match_autograd_through_the_definition(&cpu);
    kernel_checks::the_attention_kernels_rotate_by_rope_and_take_bf16(&cpu);
    kernel_checks::the_lora_kernel_matches_autograd_through_its_definition(&cpu);
}
