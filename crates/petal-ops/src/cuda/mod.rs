//! CUDA kernels for the ops the CPU fuses (`kernels.cu`, compiled at run time by NVRTC): RMSNorm,
//! softmax (plain and scaled causal), RoPE in both layouts, SwiGLU and the cross-entropy of a
//! chunk of logits, each one launch per direction where candle's composed ops take five to ten.
//! Each op is a graph node whose backward launches its backward kernel. They run on f32 and bf16
//! activations of a CUDA tensor while the fast paths are on (`set_fast`, `PETAL_FUSED`) and the
//! kernels are switched on (`set_enabled`, or `PETAL_CUDA_KERNELS=1`): off by default until
//! their tests (`tests/cuda_kernels.rs`) have passed on a GPU. Without the `cuda` feature
//! `usable` is false and nothing here runs.

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use std::sync::atomic::{AtomicU8, Ordering};

mod emulate;
#[doc(hidden)]
pub use emulate::{emulate_from, emulating};

const COMMON: &str = include_str!("common.cuh");

/// The source of the kernels' module for the row and elementwise ops (every dtype).
pub fn source() -> String {
    [COMMON, include_str!("kernels.cu")].concat()
}

/// The source of the attention kernels and the NVRTC options that compile them for heads of
/// `head_dim` values (one module per head size).
pub fn attention_source(head_dim: usize) -> (String, Vec<String>) {
    let src = [COMMON, include_str!("attention.cu")].concat();
    (src, vec![format!("-DHD={head_dim}")])
}

/// The largest head the attention kernels take (their tiles fill 33 KB of shared memory).
pub const MAX_HEAD_DIM: usize = 128;

/// The kernel families, each switched on or off on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Norm,
    Softmax,
    Rope,
    Swiglu,
    Loss,
    Attention,
    /// AdamW on every parameter in one launch
    Adamw,
    /// LoRA's low-rank term added to the base product in one launch
    Lora,
}

impl Family {
    pub const ALL: [Family; 8] = [
        Family::Norm,
        Family::Softmax,
        Family::Rope,
        Family::Swiglu,
        Family::Loss,
        Family::Attention,
        Family::Adamw,
        Family::Lora,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Norm => "norm",
            Family::Softmax => "softmax",
            Family::Rope => "rope",
            Family::Swiglu => "swiglu",
            Family::Loss => "loss",
            Family::Attention => "attention",
            Family::Adamw => "adamw",
            Family::Lora => "lora",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Bit 7: read from PETAL_CUDA_KERNELS already; bits 0-5: the families switched on.
static ENABLED: AtomicU8 = AtomicU8::new(0);
const READ: u8 = 1 << 7;

/// Switches every CUDA kernel on or off (process-wide; default: from `PETAL_CUDA_KERNELS`).
pub fn set_enabled(on: bool) {
    set_families(if on { &Family::ALL } else { &[] });
}

/// Switches on exactly these families.
pub fn set_families(families: &[Family]) {
    let bits = families.iter().fold(READ, |b, f| b | f.bit());
    ENABLED.store(bits, Ordering::Relaxed);
}

/// The families `PETAL_CUDA_KERNELS` names: `1` or `all` every one, a comma list some
/// (norm, softmax, rope, swiglu, loss, attention, adamw, lora), unset or `0` none. Unknown names are
/// reported once and skipped.
fn from_env() -> Vec<Family> {
    parse_families(&std::env::var("PETAL_CUDA_KERNELS").unwrap_or_default())
}

fn parse_families(v: &str) -> Vec<Family> {
    match v.trim() {
        "" | "0" => vec![],
        "1" | "all" => Family::ALL.to_vec(),
        list => list
            .split(',')
            .filter_map(|n| {
                let f = Family::ALL.into_iter().find(|f| f.name() == n.trim());
                if f.is_none() {
                    let names: Vec<_> = Family::ALL.iter().map(|f| f.name()).collect();
                    eprintln!(
                        "petal: PETAL_CUDA_KERNELS: no kernel family `{}` (1, all, or some of {})",
                        n.trim(),
                        names.join(", ")
                    );
                }
                f
            })
            .collect(),
    }
}

fn bits() -> u8 {
    let b = ENABLED.load(Ordering::Relaxed);
    if b & READ != 0 {
        return b;
    }
    set_families(&from_env());
    ENABLED.load(Ordering::Relaxed)
}

/// The names of the kernel families switched on (they run only where `usable`).
pub fn enabled() -> Vec<&'static str> {
    let b = bits();
    Family::ALL
        .into_iter()
        .filter(|f| b & f.bit() != 0)
        .map(Family::name)
        .collect()
}

/// Whether `t` takes the kernels of `family`: an f32 or bf16 tensor on a CUDA device, the
/// fast paths and the family switched on, and the kernels compiled (where NVRTC is missing
/// or fails, a warning once and candle's ops instead).
pub fn usable(t: &Tensor, family: Family) -> bool {
    let on_gpu = cfg!(feature = "cuda") && t.device().is_cuda();
    // AdamW's launch takes device addresses: it has no emulated path
    let emulated = t.device().is_cpu() && emulating() && family != Family::Adamw;
    (on_gpu || emulated)
        && bits() & family.bit() != 0
        && crate::cpu::fast()
        && matches!(t.dtype(), DType::F32 | DType::BF16)
        && (emulated || compiled(0))
}

/// Whether the attention kernels for heads of `head_dim` values run on `t` (see `usable`).
pub fn attention_usable(t: &Tensor, head_dim: usize) -> bool {
    usable(t, Family::Attention)
        && (1..=MAX_HEAD_DIM).contains(&head_dim)
        && match t.device().is_cpu() {
            true => emulate::has_module(head_dim),
            false => compiled(head_dim),
        }
}

fn compiled(module: usize) -> bool {
    #[cfg(feature = "cuda")]
    return imp::ptx(module).is_ok();
    #[cfg(not(feature = "cuda"))]
    return module == usize::MAX;
}

/// Where a module's PTX is kept between runs: `$PETAL_CACHE/ptx` (default
/// `~/.cache/petal/ptx`), named by a hash of the source and compile options. None without a
/// home folder.
pub fn ptx_cache_path(src: &str, options: &[String]) -> Option<std::path::PathBuf> {
    let root = match std::env::var_os("PETAL_CACHE") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache/petal"),
    };
    // FNV-1a, 64 bits: stable across runs and builds (std's hasher is not)
    let mut h: u64 = 0xcbf29ce484222325;
    let text = [src, "\0compute_80\0", &options.join("\0")].concat();
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    Some(root.join("ptx").join(format!("{h:016x}.ptx")))
}

/// The PTX of a module (0: rows and elements, d: attention for heads of d), compiled or read
/// from the cache; for tests.
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub fn module_ptx(head_dim: usize) -> Result<&'static str> {
    imp::ptx(head_dim)
}

/// Keeps compiled PTX for later runs (temp file, then rename, so a reader never sees half of
/// it); a cache that cannot be written is skipped.
fn write_ptx_cache(path: &std::path::Path, ptx: &str) {
    let Some(dir) = path.parent() else { return };
    let tmp = dir.join(format!(".{}.tmp", std::process::id()));
    let ok = std::fs::create_dir_all(dir).is_ok() && std::fs::write(&tmp, ptx).is_ok();
    if !(ok && std::fs::rename(&tmp, path).is_ok()) {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// A scalar kernel argument, pushed after the tensors.
#[derive(Clone, Copy, Debug)]
enum Arg {
    I32(i32),
    I64(i64),
    F32(f32),
}

/// One launch: the kernel's name, its output's shape and dtype, its scalars and its grid (one
/// block per row, or one thread per element).
#[derive(Clone, Debug)]
struct Spec {
    name: String,
    shape: Shape,
    dtype: DType,
    args: Vec<Arg>,
    grid: (u32, u32, u32),
    block: u32,
    /// 0: the row and elementwise module; d: the attention module for heads of d
    head_dim: usize,
}

fn sfx(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// i32 for a kernel's `int` argument, or an error for sizes past it.
fn int(v: usize) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| candle_core::Error::Msg(format!("cuda kernel: size {v} too large")))
}

impl Spec {
    /// One block per row of `cols`, threads a multiple of 32 up to 1024.
    fn rows(name: String, rows: usize, cols: usize, shape: Shape, dtype: DType) -> Self {
        let block = cols.div_ceil(32).clamp(1, 32) as u32 * 32;
        Spec {
            name,
            shape,
            dtype,
            args: vec![],
            grid: (rows as u32, 1, 1),
            block,
            head_dim: 0,
        }
    }

    /// One thread per item, 256 a block.
    fn items(name: String, items: usize, shape: Shape, dtype: DType) -> Self {
        Spec {
            name,
            shape,
            dtype,
            args: vec![],
            grid: (items.div_ceil(256).max(1) as u32, 1, 1),
            block: 256,
            head_dim: 0,
        }
    }

    fn arg(mut self, a: Arg) -> Self {
        self.args.push(a);
        self
    }
}

type Bwd1 = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
type Bwd2 = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync>;

type Grads3 = [Option<Tensor>; 3];
type Bwd3 = Box<dyn Fn([&Tensor; 3], [bool; 3], &Tensor, &Tensor) -> Result<Grads3> + Send + Sync>;

/// A kernel over three inputs, differentiable in each: `[da, db, dc] = bwd([a, b, c], need, y,
/// dy)`, `need[i]` telling whether input i tracks a gradient. `rest` is read by the forward
/// launch and dropped then, so the graph does not keep it.
struct Kernel3 {
    spec: Spec,
    rest: std::sync::Mutex<Vec<Tensor>>,
    bwd: Bwd3,
}

impl Kernel3 {
    fn new(spec: Spec, rest: Vec<Tensor>, bwd: Bwd3) -> Self {
        Kernel3 {
            spec,
            rest: std::sync::Mutex::new(rest),
            bwd,
        }
    }

    fn take_rest(&self) -> Result<Vec<Tensor>> {
        let mut r = self
            .rest
            .lock()
            .map_err(|_| candle_core::Error::Msg("cuda kernel: poisoned".into()))?;
        Ok(std::mem::take(&mut *r))
    }
}

/// A kernel over its first input and `rest` (read from their storage at launch), with an
/// optional backward `dx = bwd(x, y, dy)`.
struct Kernel {
    spec: Spec,
    rest: Vec<Tensor>,
    bwd: Option<Bwd1>,
}

/// A kernel differentiable in two inputs: `(da, db) = bwd(a, b, dy)`.
struct Kernel2 {
    spec: Spec,
    rest: Vec<Tensor>,
    bwd: Bwd2,
}

fn no_cpu<T>() -> Result<T> {
    candle_core::bail!("petal's CUDA kernels run on CUDA tensors only")
}

/// A launch on CPU tensors: emulated where `emulate_from` was called, an error otherwise.
fn on_cpu(
    spec: &Spec,
    first: &[(&CpuStorage, &Layout)],
    rest: &[Tensor],
) -> Result<(CpuStorage, Shape)> {
    if !emulating() {
        return no_cpu();
    }
    emulate::run(spec, first, rest)
}

impl CustomOp1 for Kernel {
    fn name(&self) -> &'static str {
        "petal-cuda"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        on_cpu(&self.spec, &[(s, l)], &self.rest)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        imp::run(&self.spec, &[(s, l)], &self.rest)
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        match &self.bwd {
            Some(f) => Ok(Some(f(&x.detach(), &y.detach(), &dy.detach())?)),
            None => candle_core::bail!("{}: no backward", self.spec.name),
        }
    }
}

impl CustomOp2 for Kernel2 {
    fn name(&self) -> &'static str {
        "petal-cuda2"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        on_cpu(&self.spec, &[(s1, l1), (s2, l2)], &self.rest)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        imp::run(&self.spec, &[(s1, l1), (s2, l2)], &self.rest)
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = (self.bwd)(&a.detach(), &b.detach(), &dy.detach())?;
        Ok((Some(da), Some(db)))
    }
}

impl CustomOp3 for Kernel3 {
    fn name(&self) -> &'static str {
        "petal-cuda3"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        on_cpu(
            &self.spec,
            &[(s1, l1), (s2, l2), (s3, l3)],
            &self.take_rest()?,
        )
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        imp::run(
            &self.spec,
            &[(s1, l1), (s2, l2), (s3, l3)],
            &self.take_rest()?,
        )
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = [a.track_op(), b.track_op(), c.track_op()];
        let [da, db, dc] = (self.bwd)(
            [&a.detach(), &b.detach(), &c.detach()],
            need,
            &y.detach(),
            &dy.detach(),
        )?;
        Ok((da, db, dc))
    }
}

/// Runs a kernel with no backward over contiguous inputs.
fn launch(spec: Spec, inputs: &[&Tensor]) -> Result<Tensor> {
    let ins = inputs
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let op = Kernel {
        spec,
        rest: ins[1..].to_vec(),
        bwd: None,
    };
    ins[0].apply_op1_no_bwd(&op)
}

/// Rows and row length of `x`'s last dimension.
fn rows_cols(x: &Tensor) -> Result<(usize, usize)> {
    let cols = x.dim(candle_core::D::Minus1)?;
    Ok((x.elem_count() / cols.max(1), cols))
}

/// RMSNorm with a frozen weight, `x r w` in w's dtype (r = 1 / sqrt(mean(x^2) + eps)).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (rows, cols) = rows_cols(&x)?;
    let (sx, sw) = (sfx(x.dtype()), sfx(w.dtype()));
    let eps = eps as f32;
    let fwd = Spec::rows(
        format!("rms_fwd_{sx}_{sw}"),
        rows,
        cols,
        x.shape().clone(),
        w.dtype(),
    )
    .arg(int(cols)?)
    .arg(Arg::F32(eps));
    let wb = w.clone();
    let bwd: Bwd1 = Box::new(move |x, _, dy| {
        let spec = Spec::rows(
            format!("rms_bwd_{}_{}", sfx(x.dtype()), sfx(wb.dtype())),
            rows,
            cols,
            x.shape().clone(),
            x.dtype(),
        )
        .arg(int(cols)?)
        .arg(Arg::F32(eps));
        launch(spec, &[x, &wb, &dy.to_dtype(wb.dtype())?])
    });
    x.apply_op1(Kernel {
        spec: fwd,
        rest: vec![w],
        bwd: Some(bwd),
    })
}

/// softmax(scale x) over the last dimension; `causal` (t, offset): rows are groups of t
/// queries at positions offset.., each seeing the keys up to its own position.
pub fn softmax(x: &Tensor, scale: f64, causal: Option<(usize, usize)>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (rows, cols) = rows_cols(&x)?;
    let (t, offset) = causal.unwrap_or((0, 0));
    let s = sfx(x.dtype());
    let scale = scale as f32;
    let fwd = Spec::rows(
        format!("softmax_fwd_{s}"),
        rows,
        cols,
        x.shape().clone(),
        x.dtype(),
    )
    .arg(int(cols)?)
    .arg(Arg::F32(scale))
    .arg(int(t)?)
    .arg(int(offset)?);
    let bwd: Bwd1 = Box::new(move |x, y, dy| {
        let spec = Spec::rows(
            format!("softmax_bwd_{}", sfx(y.dtype())),
            rows,
            cols,
            x.shape().clone(),
            y.dtype(),
        )
        .arg(int(cols)?)
        .arg(Arg::F32(scale));
        launch(spec, &[y, &dy.to_dtype(y.dtype())?])
    });
    x.apply_op1(Kernel {
        spec: fwd,
        rest: vec![],
        bwd: Some(bwd),
    })
}

fn rope_spec(x: &Tensor, d: usize, t: usize, per_pos: usize, sign: f32) -> Result<Spec> {
    let heads = x.elem_count() / d;
    Ok(Spec::items(
        format!("rope_{}", sfx(x.dtype())),
        heads * d / 2,
        x.shape().clone(),
        x.dtype(),
    )
    .arg(Arg::I64(heads as i64))
    .arg(int(d)?)
    .arg(int(t)?)
    .arg(int(per_pos)?)
    .arg(Arg::F32(sign)))
}

/// Rotate-half RoPE: heads of `d = 2 * cos.dim(1)` values, head h at position
/// `(h / per_pos) % t` of the tables cos/sin (t, d/2); backward turns back.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, t: usize, per_pos: usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    let f = |c: &Tensor| c.to_dtype(DType::F32)?.contiguous();
    let (cos, sin) = (f(cos)?, f(sin)?);
    let d = 2 * cos.dim(1)?;
    let (cb, sb) = (cos.clone(), sin.clone());
    let bwd: Bwd1 = Box::new(move |x, _, dy| {
        let dy = dy.to_dtype(x.dtype())?;
        launch(rope_spec(&dy, d, t, per_pos, -1.0)?, &[&dy, &cb, &sb])
    });
    x.apply_op1(Kernel {
        spec: rope_spec(&x, d, t, per_pos, 1.0)?,
        rest: vec![cos, sin],
        bwd: Some(bwd),
    })
}

/// silu(g) u for g, u of one shape and dtype.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    let n = g.elem_count();
    let s = sfx(g.dtype());
    let fwd = Spec::items(format!("swiglu_fwd_{s}"), n, g.shape().clone(), g.dtype())
        .arg(Arg::I64(n as i64));
    let bwd: Bwd2 = Box::new(move |g, u, dy| {
        let mut dims = vec![2];
        dims.extend(g.dims());
        let spec = Spec::items(
            format!("swiglu_bwd_{}", sfx(g.dtype())),
            n,
            Shape::from(dims),
            g.dtype(),
        )
        .arg(Arg::I64(n as i64));
        let both = launch(spec, &[g, u, &dy.to_dtype(g.dtype())?])?;
        Ok((both.get(0)?, both.get(1)?))
    });
    g.apply_op2(
        &u,
        Kernel2 {
            spec: fwd,
            rest: vec![],
            bwd,
        },
    )
}

/// Per-row cross-entropy (rows,) in f32 of logits (rows, vocab) against `labels` (rows,) i64
/// on the device; 0 on ignored rows (negative labels). No graph.
pub fn cross_entropy_rows(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (rows, cols) = rows_cols(logits)?;
    let spec = Spec::rows(
        format!("ce_fwd_{}", sfx(logits.dtype())),
        rows,
        cols,
        Shape::from(rows),
        DType::F32,
    )
    .arg(int(cols)?);
    launch(spec, &[logits, labels])
}

/// `dy (softmax(logits) - onehot(labels))` in `dtype`, 0 on ignored rows; `dy` one f32 on the
/// device. No graph.
pub fn cross_entropy_grad(
    logits: &Tensor,
    labels: &Tensor,
    dy: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let (rows, cols) = rows_cols(logits)?;
    let spec = Spec::rows(
        format!("ce_grad_{}_{}", sfx(logits.dtype()), sfx(dtype)),
        rows,
        cols,
        logits.shape().clone(),
        dtype,
    )
    .arg(int(cols)?);
    let dy = dy.to_dtype(DType::F32)?.reshape(1)?;
    launch(spec, &[logits, labels, &dy])
}

/// Causal attention `softmax(scale q k^T + mask) v` on the token-major layout: q (b, t, nh *
/// d) or (b, t, nh, d), k and v (b, T, nkv * d) or (b, T, nkv, d), query i at position
/// T - t + i seeing keys up to it, query head h reading kv head h / (nh / nkv). With `rope`
/// (cos, sin tables (positions >= T, d/2) from position 0, and the first key to rotate), q
/// and k come unrotated and the kernels rotate them as they read them (and turn dq, dk back).
/// Never holds the (t, T) scores nor a rotated copy: forward keeps nothing but the output,
/// backward recomputes the rows' log-sum-exp, then dq and dk, dv. `head_dim` up to
/// `MAX_HEAD_DIM`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    head_dim: usize,
    scale: f64,
    rope: Option<(&Tensor, &Tensor, usize)>,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (b, t, keys, d) = (q.dim(0)?, q.dim(1)?, k.dim(1)?, head_dim);
    let (nh, nkv) = (
        q.elem_count() / (b * t * d),
        k.elem_count() / (b * keys * d),
    );
    if d == 0 || d > MAX_HEAD_DIM || nkv == 0 || nh % nkv != 0 || keys < t {
        candle_core::bail!("cuda attention: heads of {d} (at most {MAX_HEAD_DIM}), {nh} query and {nkv} kv heads, {t} queries over {keys} keys")
    }
    // the tables' rows for positions 0..keys (a placeholder without RoPE)
    let (tables, from) = match rope {
        Some((cos, sin, from)) => {
            let f = |x: &Tensor| x.narrow(0, 0, keys)?.to_dtype(DType::F32)?.contiguous();
            (vec![f(cos)?, f(sin)?], from)
        }
        None => {
            let z = Tensor::zeros(1, DType::F32, q.device())?;
            (vec![z.clone(), z], 0)
        }
    };
    // rows per block and keys per tile (TQ, TK in attention.cu)
    let tile = if d > 64 { 16 } else { 32 };
    let scale = scale as f32;
    let on = Arg::I32(i32::from(rope.is_some()));
    let (dims, with_b) = (
        vec![int(t)?, int(keys)?, int(nh)?, int(nkv)?, Arg::F32(scale)],
        int(b)?,
    );
    let spec = move |kernel: &str, dt: DType, shape: Shape, over_keys: bool| {
        let mut args = dims.clone();
        if kernel != "fwd" {
            args.push(with_b);
        }
        args.extend([on, int(from)?]);
        Ok::<_, candle_core::Error>(Spec {
            name: format!("attn_{kernel}_{}", sfx(dt)),
            shape,
            dtype: if kernel == "stats" { DType::F32 } else { dt },
            args,
            grid: match over_keys {
                true => (keys.div_ceil(tile) as u32, nkv as u32, b as u32),
                false => (t.div_ceil(tile) as u32, nh as u32, b as u32),
            },
            block: tile as u32,
            head_dim: d,
        })
    };
    let fwd = spec("fwd", q.dtype(), q.shape().clone(), false)?;
    let (cs, sn) = (tables[0].clone(), tables[1].clone());
    let bwd: Bwd3 = Box::new(move |[q, k, v], _, o, dy| {
        let dy = dy.to_dtype(q.dtype())?;
        let dt = q.dtype();
        let stats_shape = Shape::from((2, b, nh, t));
        let stats = launch(
            spec("stats", dt, stats_shape, false)?,
            &[q, k, o, &dy, &cs, &sn],
        )?;
        let dq = launch(
            spec("dq", dt, q.shape().clone(), false)?,
            &[q, k, v, &dy, &stats, &cs, &sn],
        )?;
        let mut two = vec![2];
        two.extend(k.dims());
        let dkv = launch(
            spec("dkv", dt, Shape::from(two), true)?,
            &[q, k, v, &dy, &stats, &cs, &sn],
        )?;
        Ok([Some(dq), Some(dkv.get(0)?), Some(dkv.get(1)?)])
    });
    q.apply_op3(&k, &v, Kernel3::new(fwd, tables, bwd))
}

/// The largest LoRA rank `lora` takes (its kernel keeps x A^T of a row in shared memory).
pub const MAX_LORA_RANK: usize = 64;

/// LoRA without dropout, `x W^T + bias + scale (x A^T) B^T`: the base product by candle (a
/// frozen matmul, not kept by the graph), then one launch adding the low-rank term. A and B in
/// f32, rank up to `MAX_LORA_RANK`. Backward: LoRA's closed form (dx, dA, dB).
pub fn lora(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let r = a.dim(0)?;
    if r > MAX_LORA_RANK || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        candle_core::bail!("cuda lora: rank {r} (at most {MAX_LORA_RANK}) with f32 A and B")
    }
    let x = x.contiguous()?;
    let n = x.elem_count() / inp;
    let base = crate::frozen_linear(&x.detach(), w, bias)?.contiguous()?;
    let spec = Spec {
        name: format!("lora_fwd_{}", sfx(x.dtype())),
        shape: base.shape().clone(),
        dtype: x.dtype(),
        args: vec![int(inp)?, int(r)?, int(out)?, Arg::F32(scale as f32)],
        grid: (n as u32, 1, 1),
        block: 256,
        head_dim: 0,
    };
    let wc = w.clone();
    let bwd: Bwd3 = Box::new(move |[x, a, b], need, _, dy| {
        crate::lora_linear::lora_backward([x, &wc, a, b], scale, dy, need)
    });
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    x.apply_op3(&a, &b, Kernel3::new(spec, vec![base], bwd))
}

/// One AdamW step's constants, bias corrections included.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1 - beta1^t and 1 - beta2^t
    pub bc1: f64,
    pub bc2: f64,
}

/// AdamW on every parameter at once, in place: `w[i]`, `m[i]`, `v[i]` (contiguous f32 CUDA
/// tensors on one device, the optimizer's own) updated from `g[i]`, torch.optim.AdamW's
/// arithmetic; one launch and one small copy of their addresses, in place of a dozen
/// launches per parameter plus copies in and out of flat buffers.
pub fn adamw_step(
    w: &[Tensor],
    g: &[Tensor],
    m: &[Tensor],
    v: &[Tensor],
    s: AdamStep,
) -> Result<()> {
    let n = w.len();
    if g.len() != n || m.len() != n || v.len() != n {
        candle_core::bail!(
            "adamw_step: {n} parameters but {}, {}, {} gradients, m, v",
            g.len(),
            m.len(),
            v.len()
        )
    }
    for i in 0..n {
        for t in [&w[i], &g[i], &m[i], &v[i]] {
            let ok = t.dtype() == DType::F32
                && t.is_contiguous()
                && t.elem_count() == w[i].elem_count()
                && t.device().same_device(w[0].device());
            if !ok {
                candle_core::bail!("adamw_step: parameter {i}'s tensors are not contiguous f32 of one size on one device")
            }
        }
    }
    #[cfg(feature = "cuda")]
    return imp::adamw(w, g, m, v, s);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = s;
        no_cpu()
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{Arg, Spec};
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

    /// Launches `spec` over `first` then `rest`, writing a fresh output.
    pub(super) fn run(
        spec: &Spec,
        first: &[(&CudaStorage, &Layout)],
        rest: &[Tensor],
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let guards: Vec<_> = rest.iter().map(|t| t.storage_and_layout()).collect();
        let mut ins: Vec<(&CudaStorage, &Layout)> = first.to_vec();
        for (g, l) in &guards {
            match &**g {
                Storage::Cuda(c) => ins.push((c, l)),
                _ => candle_core::bail!("{}: an input is not on the GPU", spec.name),
            }
        }
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_switch_reads_all_none_or_a_list_of_families() {
        assert_eq!(parse_families("1"), Family::ALL.to_vec());
        assert_eq!(parse_families("all"), Family::ALL.to_vec());
        assert!(parse_families("0").is_empty() && parse_families("").is_empty());
        let some = parse_families(" norm, attention ,bogus");
        assert_eq!(some, vec![Family::Norm, Family::Attention]);
    }

    #[test]
    fn the_ptx_cache_is_named_by_source_and_options() {
        let (src, hd) = attention_source(64);
        let a = ptx_cache_path(&src, &hd).unwrap();
        assert_eq!(a, ptx_cache_path(&src, &hd).unwrap());
        assert_ne!(a, ptx_cache_path(&src, &attention_source(32).1).unwrap());
        assert_ne!(a, ptx_cache_path(&source(), &hd).unwrap());
    }
}
