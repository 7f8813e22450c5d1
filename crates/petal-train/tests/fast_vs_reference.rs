//! A short training run gives the same loss curve through the fused kernels and through the
//! composed reference ops (a model loaded with `Kernels::REFERENCE`), on the tiny golden Llama.

mod common;

use candle_core::DType;
use common::{tiny_llama_losses, tiny_llama_losses_with};

#[test]
fn the_fused_kernels_and_the_reference_ops_give_the_same_loss_curve() {
    let d = tempfile::tempdir().unwrap();
    let fast = tiny_llama_losses(DType::F32, d.path().join("fast"));
    let reference = petal_models::Precision {
        kernels: petal_ops::Kernels::REFERENCE,
        ..DType::F32.into()
    };
    let slow = tiny_llama_losses_with(reference, 0.1, d.path().join("slow"));
    assert!(fast[5] < fast[0], "the run must learn: {fast:?}");
    for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
        assert!(
            (a - b).abs() < 1e-4 * b.abs(),
            "step {}: fused {a} vs reference {b}",
            i + 1
        );
    }
}
