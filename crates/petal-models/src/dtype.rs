//! Which dtypes a model's weights, activations and residual stream take, and which kernels its
//! ops run: chosen when the model is loaded ([`Precision`]), never by a process-wide switch.

use candle_core::{DType, Device};
use petal_ops::Kernels;

/// How a model stores and computes its numbers: the weights' dtype; for bf16 weights on the
/// CPU, whether activations are kept in bf16 too (less memory: about half the activations'
/// bytes) instead of f32 (faster: candle's autograd adds one bf16 gradient per graph node
/// through a slow path); and the kernels its ops and its adapters' ops take. A `DType` converts
/// to the defaults: f32 activations, fused CPU kernels, no CUDA kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    pub weights: DType,
    /// Keep the linears' weights in the block format the file holds them in (GGUF k-quants
    /// and legacy types; `--dtype quantized`): frozen products dequantize tiles on the fly.
    /// Everything else (norms, biases, activations) is in `weights`.
    pub quantized: bool,
    /// Quantize the linears (and, for the GGML types, the token embedding and head) at load
    /// by this quantizer (`--quantize`; from f32/bf16/f16 weights): they then run as
    /// kept-quantized ones.
    pub quantize: Option<&'static dyn petal_ops::quant::Quantizer>,
    pub bf16_activations: bool,
    pub kernels: Kernels,
}

impl From<DType> for Precision {
    fn from(weights: DType) -> Self {
        Precision {
            weights,
            quantized: false,
            quantize: None,
            bf16_activations: false,
            kernels: Kernels::default(),
        }
    }
}

/// The dtype activations (and norms, biases) are stored in. On the CPU, bf16 weights run with
/// f32 activations (each matmul rounds its input to bf16 and accumulates in f32, as autocast
/// does) unless `bf16_activations` asks for bf16 ones (computed in f32 inside each fused
/// kernel, stored in bf16); elsewhere the weights' dtype.
pub fn act_dtype(p: impl Into<Precision>, dev: &Device) -> DType {
    let p = p.into();
    if p.weights == DType::BF16 && dev.is_cpu() && !p.bf16_activations {
        DType::F32
    } else {
        p.weights
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
