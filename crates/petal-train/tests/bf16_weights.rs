//! Training over bf16 base weights (f32 activations, the AVX512-BF16 kernels where the CPU has
//! them, else candle's bf16 matmul) follows the f32 loss curve within bf16 rounding, on the
//! tiny golden Llama. Its own test binary.

mod common;

use candle_core::DType;
use common::tiny_llama_losses as losses;

#[test]
fn training_over_bf16_base_weights_follows_the_f32_loss_curve_within_bf16_rounding() {
    let d = tempfile::tempdir().unwrap();
    let half = losses(DType::BF16, d.path().join("bf16"));
    let full = losses(DType::F32, d.path().join("f32"));
    assert!(half[5] < half[0], "the run must learn: {half:?}");
    for (i, (a, b)) in half.iter().zip(&full).enumerate() {
        // weights and matmul inputs rounded to 8 significant bits (~0.4% per value); the
        // rounding errors average out in the loss (seen: 3e-5 relative)
        assert!(
            (a - b).abs() < 2e-3 * b.abs(),
            "step {}: bf16 {a} vs f32 {b}",
            i + 1
        );
    }
    let moved = (full[0] - full[5]).abs();
    let apart = (half[5] - full[5]).abs();
    assert!(
        apart < 0.2 * moved,
        "bf16 drifts {apart} where training moved {moved}"
    );
}
