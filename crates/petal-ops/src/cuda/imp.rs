//! The launches on a GPU: each module's PTX (NVRTC, cached on disk), the kernels' arguments
//! pushed in order, AdamW's table of addresses.

use super::launch::{with_inputs, Arg, Spec};
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::OnceLock;

/// A module's PTX, compiled once a process (for compute capability 8.0 and later): the row
/// and elementwise kernels (`head_dim` 0), or the attention kernels for one head size.
pub(super) fn ptx(head_dim: usize) -> Result<&'static str> {
    type Cache = Mutex<HashMap<usize, std::result::Result<&'static str, String>>>;
    static PTX: OnceLock<Cache> = OnceLock::new();
    let mut cache = PTX
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| candle_core::Error::Msg("cuda kernels: poisoned".into()))?;
    let entry = cache.entry(head_dim).or_insert_with(|| {
        let (src, options) = match head_dim {
            0 => (super::source(), vec![]),
            d => super::attention_source(d),
        };
        // a module compiled before, by this machine, from this very source and options
        let cached = super::ptx_cache_path(&src, &options);
        if let Some(ptx) = cached
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        {
            return Ok(&*Box::leak(ptx.into_boxed_str()));
        }
        let opts = CompileOptions {
            arch: Some("compute_80"),
            name: Some(format!("petal_kernels_{head_dim}.cu")),
            options,
            ..Default::default()
        };
        // compiled once per module and kept for the process: leaked on purpose. cudarc
        // panics where it cannot load NVRTC: caught, it is an error like the others.
        let compiled = std::panic::catch_unwind(|| compile_ptx_with_opts(src, opts));
        let ptx = match compiled {
            Ok(Ok(p)) => {
                let ptx = p.to_src();
                if let Some(path) = &cached {
                    super::write_ptx_cache(path, &ptx);
                }
                Ok(&*Box::leak(ptx.into_boxed_str()))
            }
            Ok(Err(e)) => Err(format!("{e:?}")),
            Err(panic) => Err(panic
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "NVRTC could not be loaded".into())),
        };
        if let Err(e) = &ptx {
            eprintln!("petal: CUDA kernels unavailable, using candle's ops instead: {e}");
        }
        ptx
    });
    entry
        .clone()
        .map_err(|e| candle_core::Error::Msg(format!("petal's CUDA kernels: {e}")))
}

/// See `super::adamw_step` (inputs checked there).
pub(super) fn adamw(
    w: &[Tensor],
    g: &[Tensor],
    m: &[Tensor],
    v: &[Tensor],
    s: super::AdamStep,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let n = w.len();
    let candle_core::Device::Cuda(dev) = w
        .first()
        .map(|t| t.device().clone())
        .unwrap_or(candle_core::Device::Cpu)
    else {
        return Ok(()); // nothing to update (or not on a GPU: checked by the caller)
    };
    if n > 65535 {
        candle_core::bail!("adamw_step: {n} parameters, more than one launch takes")
    }
    let stream = dev.cuda_stream();
    // each tensor's address: petal runs one stream, so the kernel is ordered after every
    // earlier write and before any later free of these buffers
    let addr = |t: &Tensor| -> Result<i64> {
        let (st, l) = t.storage_and_layout();
        let Storage::Cuda(c) = &*st else {
            candle_core::bail!("adamw_step: a tensor is not on the GPU")
        };
        let (ptr, _sync) = c.as_cuda_slice::<f32>()?.device_ptr(&stream);
        Ok((ptr + 4 * l.start_offset() as u64) as i64)
    };
    let mut table = Vec::with_capacity(5 * n);
    let mut longest = 0;
    for i in 0..n {
        for t in [&w[i], &g[i], &m[i], &v[i]] {
            table.push(addr(t)?);
        }
        table.push(w[i].elem_count() as i64);
        longest = longest.max(w[i].elem_count());
    }
    let table = dev.clone_htod(&table)?;
    let func = dev.get_or_load_custom_func("adamw_multi", "petal0", ptx(0)?)?;
    let f = |x: f64| x as f32;
    let args = [
        f(s.lr),
        f(1.0 - s.lr * s.weight_decay),
        f(s.beta1),
        f(1.0 - s.beta1),
        f(s.beta2),
        f(1.0 - s.beta2),
        f(s.eps),
        f(s.bc1),
        f(s.bc2),
    ];
    let mut b = func.builder();
    b.arg(&table);
    for a in &args {
        b.arg(a);
    }
    let cfg = LaunchConfig {
        grid_dim: (longest.div_ceil(256).max(1) as u32, n as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the table holds live f32 buffers of the sizes given, on this device
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

enum View<'a> {
    F32(CudaView<'a, f32>),
    BF16(CudaView<'a, bf16>),
    I64(CudaView<'a, i64>),
}

fn view<'a>(c: &'a CudaStorage, l: &Layout) -> Result<View<'a>> {
    use candle_core::backend::BackendStorage;
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cuda kernel: input is not contiguous")
    };
    Ok(match &c.slice {
        S::F32(s) => View::F32(s.slice(a..b)),
        S::BF16(s) => View::BF16(s.slice(a..b)),
        S::I64(s) => View::I64(s.slice(a..b)),
        _ => candle_core::bail!("cuda kernel: input of dtype {:?}", c.dtype()),
    })
}

fn on_gpu_storage(s: &Storage) -> Option<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Some(c),
        _ => None,
    }
}

/// Launches `spec` over `first` then `rest`, writing a fresh output.
pub(super) fn run(
    spec: &Spec,
    first: &[(&CudaStorage, &Layout)],
    rest: &[Tensor],
) -> Result<(CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    with_inputs(spec, first, rest, on_gpu_storage, |ins| {
        let views = ins
            .iter()
            .map(|(c, l)| view(c, l))
            .collect::<Result<Vec<_>>>()?;
        let dev = ins[0].0.device().clone();
        if spec.grid.0 == 0 {
            let out = match spec.dtype {
                DType::BF16 => S::BF16(dev.alloc_zeros::<bf16>(0)?),
                _ => S::F32(dev.alloc_zeros::<f32>(0)?),
            };
            let storage = CudaStorage {
                slice: out,
                device: dev,
            };
            return Ok((storage, spec.shape.clone()));
        }
        let module = format!("petal{}", spec.head_dim);
        let func = dev.get_or_load_custom_func(&spec.name, &module, ptx(spec.head_dim)?)?;
        let n = spec.shape.elem_count();
        // SAFETY: every kernel writes each element of its output.
        let mut out = match spec.dtype {
            DType::F32 => S::F32(unsafe { dev.alloc::<f32>(n)? }),
            DType::BF16 => S::BF16(unsafe { dev.alloc::<bf16>(n)? }),
            dt => candle_core::bail!("{}: output of dtype {dt:?}", spec.name),
        };
        {
            let mut b = func.builder();
            for v in &views {
                match v {
                    View::F32(v) => b.arg(v),
                    View::BF16(v) => b.arg(v),
                    View::I64(v) => b.arg(v),
                };
            }
            match &mut out {
                S::F32(s) => b.arg(s),
                S::BF16(s) => b.arg(s),
                _ => unreachable!("outputs are f32 or bf16"),
            };
            for a in &spec.args {
                match a {
                    Arg::I32(v) => b.arg(v),
                    Arg::I64(v) => b.arg(v),
                    Arg::F32(v) => b.arg(v),
                };
            }
            let cfg = LaunchConfig {
                grid_dim: spec.grid,
                block_dim: (spec.block, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match the kernel's signature (tensors, output, scalars).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((
            CudaStorage {
                slice: out,
                device: dev,
            },
            spec.shape.clone(),
        ))
    })
}
