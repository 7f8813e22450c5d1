//! The CUDA kernels' launches on the CPU, for tests on machines without a GPU: after
//! `emulate_from(dir)`, CPU tensors take the kernel paths, and each launch (the same `Spec`:
//! kernel name, arguments in order, output shape and dtype, grid) runs in `dir/petal<m>.so`,
//! the module built for the CPU from the kernels' own source by `tools/cuda_emu/module.cpp`.
//! Everything between an op and its kernel is then exercised, but cudarc's calls.

use super::launch::{with_inputs, Arg, Spec};
use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Storage, Tensor};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

type Launch =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_uint, c_uint, c_uint, c_uint) -> c_int;

static DIR: OnceLock<PathBuf> = OnceLock::new();
/// Each module's entry point; held while a launch runs (the emulator's state is global).
static MODULES: Mutex<Option<HashMap<usize, usize>>> = Mutex::new(None);

/// Runs the kernels of CPU tensors in the modules under `dir` (petal0.so, petal<head size>.so).
/// Process-wide, once.
pub fn emulate_from(dir: &Path) {
    let _ = DIR.set(dir.to_path_buf());
}

/// Whether CPU tensors take the (emulated) kernels.
pub fn emulating() -> bool {
    DIR.get().is_some()
}

/// Whether the emulated module for heads of `head_dim` values was built.
pub(super) fn has_module(head_dim: usize) -> bool {
    DIR.get()
        .is_some_and(|d| d.join(format!("petal{head_dim}.so")).exists())
}

fn entry(module: usize, modules: &mut HashMap<usize, usize>) -> Result<Launch> {
    if let Some(&f) = modules.get(&module) {
        // SAFETY: stored below from dlsym of this very signature
        return Ok(unsafe { std::mem::transmute::<usize, Launch>(f) });
    }
    let dir = DIR
        .get()
        .ok_or_else(|| candle_core::Error::Msg("cuda emulation is off".into()))?;
    let path = dir.join(format!("petal{module}.so"));
    let c = CString::new(path.to_string_lossy().as_bytes())
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    // SAFETY: loading a library built from tools/cuda_emu/module.cpp
    let f = unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if h.is_null() {
            candle_core::bail!("cuda emulation: cannot load {}", path.display())
        }
        libc::dlsym(h, c"petal_emu_launch".as_ptr())
    };
    if f.is_null() {
        candle_core::bail!("cuda emulation: {} has no petal_emu_launch", path.display())
    }
    modules.insert(module, f as usize);
    // SAFETY: the symbol is module.cpp's petal_emu_launch
    Ok(unsafe { std::mem::transmute::<*mut c_void, Launch>(f) })
}

/// A contiguous CPU input's first element.
fn data(s: &CpuStorage, l: &Layout) -> Result<*const c_void> {
    let Some((a, _)) = l.contiguous_offsets() else {
        candle_core::bail!("cuda emulation: input is not contiguous")
    };
    Ok(match s {
        CpuStorage::F32(v) => v[a..].as_ptr() as *const c_void,
        CpuStorage::BF16(v) => v[a..].as_ptr() as *const c_void,
        CpuStorage::I64(v) => v[a..].as_ptr() as *const c_void,
        _ => candle_core::bail!("cuda emulation: input of dtype {:?}", s.dtype()),
    })
}

fn on_cpu_storage(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Some(c),
        _ => None,
    }
}

/// `spec` launched on the CPU over `first` then `rest`, as `imp::run` launches it on a GPU.
pub(super) fn run(
    spec: &Spec,
    first: &[(&CpuStorage, &Layout)],
    rest: &[Tensor],
) -> Result<(CpuStorage, Shape)> {
    with_inputs(spec, first, rest, on_cpu_storage, |ins| {
        let n = spec.shape.elem_count();
        let mut out = match spec.dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; n]),
            DType::BF16 => CpuStorage::BF16(vec![half::bf16::ZERO; n]),
            dt => candle_core::bail!("{}: output of dtype {dt:?}", spec.name),
        };
        // cuLaunchKernel's convention: one pointer to each argument's value
        let mut ptrs = ins
            .iter()
            .map(|(s, l)| data(s, l))
            .collect::<Result<Vec<_>>>()?;
        ptrs.push(match &mut out {
            CpuStorage::F32(v) => v.as_mut_ptr() as *const c_void,
            CpuStorage::BF16(v) => v.as_mut_ptr() as *const c_void,
            _ => unreachable!("outputs are f32 or bf16"),
        });
        let mut params: Vec<*mut c_void> = ptrs
            .iter()
            .map(|p| p as *const *const c_void as *mut c_void)
            .collect();
        let scalars = spec.args.clone();
        for a in &scalars {
            params.push(match a {
                Arg::I32(v) => v as *const i32 as *mut c_void,
                Arg::I64(v) => v as *const i64 as *mut c_void,
                Arg::F32(v) => v as *const f32 as *mut c_void,
            });
        }
        let name =
            CString::new(spec.name.as_str()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut modules = MODULES
            .lock()
            .map_err(|_| candle_core::Error::Msg("cuda emulation: poisoned".into()))?;
        let launch = entry(spec.head_dim, modules.get_or_insert_with(HashMap::new))?;
        let (g, b) = (spec.grid, spec.block);
        // SAFETY: params point at live values of the kernel's argument types, in order
        let rc = unsafe { launch(name.as_ptr(), params.as_mut_ptr(), g.0, g.1, g.2, b) };
        if rc != 0 {
            candle_core::bail!("cuda emulation: no kernel {}", spec.name)
        }
        Ok((out, spec.shape.clone()))
    })
}
