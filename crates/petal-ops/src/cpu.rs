//! Shared plumbing of the CPU kernels: contiguous f32 views and a global fast/reference switch.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static FAST: AtomicBool = AtomicBool::new(true);

/// Use the fused kernels (default) or the composed reference ops everywhere.
pub fn set_fast(on: bool) {
    FAST.store(on, Ordering::Relaxed);
}

/// Whether `t` can take a fused CPU f32 kernel.
pub fn fast_ok(t: &Tensor) -> bool {
    FAST.load(Ordering::Relaxed) && t.device().is_cpu() && t.dtype() == DType::F32
}

pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("petal-ops: kernel needs a contiguous input".into())
    })?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

pub(crate) fn last_dim(l: &Layout) -> usize {
    *l.shape().dims().last().unwrap_or(&1)
}
