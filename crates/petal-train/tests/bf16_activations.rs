//! Training with bf16 activations (bf16 weights, activations stored in bf16 and computed in
//! f32 inside each kernel, f32 residual stream) follows the f32 loss curve within bf16
//! rounding, through the one-node LoRA op (no dropout) and the composed LoRA (dropout).

mod common;

use candle_core::DType;
use common::tiny_llama_losses_with as losses;

#[test]
fn training_with_bf16_activations_follows_the_f32_loss_curve_within_bf16_rounding() {
    let d = tempfile::tempdir().unwrap();
    for dropout in [0.0, 0.1] {
        let full = losses(DType::F32, dropout, d.path().join(format!("f32-{dropout}")));
        let bf16 = petal_models::Precision {
            weights: DType::BF16,
            bf16_activations: true,
            ..DType::BF16.into()
        };
        let half = losses(bf16, dropout, d.path().join(format!("bf16-{dropout}")));
        assert!(half[5] < half[0], "the run must learn: {half:?}");
        // seen: 3e-5 relative (activations rounded to 8 significant bits, sums in f32)
        for (i, (a, b)) in half.iter().zip(&full).enumerate() {
            assert!(
                (a - b).abs() < 2e-3 * b.abs(),
                "dropout {dropout}, step {}: bf16 {a} vs f32 {b}",
                i + 1
            );
        }
        let moved = (full[0] - full[5]).abs();
        let apart = (half[5] - full[5]).abs();
        assert!(
            apart < 0.2 * moved,
            "dropout {dropout}: bf16 drifts {apart} where training moved {moved}"
        );
    }
}
