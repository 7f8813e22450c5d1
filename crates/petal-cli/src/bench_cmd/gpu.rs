//! Device memory on a CUDA device: in use (total - free, bytes), and the peak in use while a
//! closure runs, sampled every half millisecond by a second thread. None on the CPU.

use candle_core::Device;

#[cfg(feature = "cuda")]
fn context(
    dev: &Device,
) -> Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>> {
    Some(dev.as_cuda_device().ok()?.cuda_stream().context().clone())
}

#[cfg(feature = "cuda")]
pub fn used(dev: &Device) -> Option<usize> {
    let (free, total) = context(dev)?.mem_get_info().ok()?;
    Some(total - free)
}

#[cfg(feature = "cuda")]
pub fn peak_during<T>(dev: &Device, f: impl FnOnce() -> T) -> (T, Option<usize>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(c) = context(dev) else {
        return (f(), None);
    };
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let seen = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !seen.load(Ordering::Relaxed) {
            if let Ok((free, total)) = c.mem_get_info() {
                peak = peak.max(total - free);
            }
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
        peak
    });
    let r = f();
    stop.store(true, Ordering::Relaxed);
    (r, sampler.join().ok())
}

#[cfg(not(feature = "cuda"))]
pub fn used(_: &Device) -> Option<usize> {
    None
}

#[cfg(not(feature = "cuda"))]
pub fn peak_during<T>(_: &Device, f: impl FnOnce() -> T) -> (T, Option<usize>) {
    (f(), None)
}
