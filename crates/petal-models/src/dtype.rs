//! Which dtypes a model's activations and residual stream take for its weights' dtype.

use candle_core::{DType, Device};
use std::sync::atomic::{AtomicBool, Ordering};

static BF16_ACTIVATIONS: AtomicBool = AtomicBool::new(false);

/// Whether models loaded from now on with bf16 weights on the CPU keep their activations in
/// bf16 (less memory: about half the activations' bytes) instead of f32 (faster: candle's
/// autograd adds one bf16 gradient per graph node through a slow path). Off by default.
pub fn set_bf16_activations(on: bool) {
    BF16_ACTIVATIONS.store(on, Ordering::Relaxed);
}

/// The dtype activations (and norms, biases) are stored in for weights of dtype `dt`. On the
/// CPU, bf16 weights run with f32 activations (each matmul rounds its input to bf16 and
/// accumulates in f32, as autocast does) unless `set_bf16_activations` asked for bf16 ones
/// (computed in f32 inside each fused kernel, stored in bf16); elsewhere the weights' dtype.
pub fn act_dtype(dt: DType, dev: &Device) -> DType {
    let bf16_act = BF16_ACTIVATIONS.load(Ordering::Relaxed);
    if dt == DType::BF16 && dev.is_cpu() && !bf16_act {
        DType::F32
    } else {
        dt
    }
}

/// The residual stream's dtype for activations in `act`: f32 on the CPU (as under autocast,
/// the sums of block outputs stay f32 and each norm rounds its output to bf16), else `act`.
pub fn resid_dtype(act: DType, dev: &Device) -> DType {
    if act == DType::BF16 && dev.is_cpu() {
        DType::F32
    } else {
        act
    }
}
