//! petal's CUDA kernels run on the CPU: `tools/cuda_emu/check.cpp` includes the kernels' own
//! source with `emu.h` standing in for the CUDA runtime (one OS thread per GPU thread, real
//! barriers) and checks every kernel, forward and backward, against naive double-precision
//! references, attention for heads of 32, 64 and 128 values. The GPU tests
//! (`cuda_kernels.rs`, `--features cuda`) check the same kernels through candle on a device.

use std::path::Path;
use std::process::Command;

#[test]
fn the_cuda_kernels_match_naive_references_when_emulated_on_the_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("tools/cuda_emu/run.sh");
    let have_gpp = Command::new("g++").arg("--version").output().is_ok();
    if !have_gpp {
        eprintln!("skipped: no g++ to build the emulated kernels");
        return;
    }
    let out = Command::new("bash").arg(&script).output().expect("bash");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("all ok").count(), 3, "{text}");
}
