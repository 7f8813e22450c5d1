//! The plumbing between an op and its kernel: a launch (`Spec`: kernel, output, scalars,
//! grid) and the graph nodes that run it forward (on a GPU through `imp`, on CPU tensors
//! through `emulate`) and hold its backward.

use super::emulating;
#[cfg(feature = "cuda")]
use super::imp;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};

/// A scalar kernel argument, pushed after the tensors.
#[derive(Clone, Copy, Debug)]
pub(super) enum Arg {
    I32(i32),
    I64(i64),
    F32(f32),
}

/// One launch: the kernel's name, its output's shape and dtype, its scalars and its grid (one
/// block per row, or one thread per element).
#[derive(Clone, Debug)]
pub(super) struct Spec {
    pub(super) name: String,
    pub(super) shape: Shape,
    pub(super) dtype: DType,
    pub(super) args: Vec<Arg>,
    pub(super) grid: (u32, u32, u32),
    pub(super) block: u32,
    /// 0: the row and elementwise module; d: the attention module for heads of d
    pub(super) head_dim: usize,
}

pub(super) fn sfx(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// i32 for a kernel's `int` argument, or an error for sizes past it.
pub(super) fn int(v: usize) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| candle_core::Error::Msg(format!("cuda kernel: size {v} too large")))
}

impl Spec {
    /// One block per row of `cols`, threads a multiple of 32 up to 1024.
    pub(super) fn rows(name: String, rows: usize, cols: usize, shape: Shape, dtype: DType) -> Self {
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
    pub(super) fn items(name: String, items: usize, shape: Shape, dtype: DType) -> Self {
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

    pub(super) fn arg(mut self, a: Arg) -> Self {
        self.args.push(a);
        self
    }
}

pub(super) type Bwd1 = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
pub(super) type Bwd2 =
    Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync>;

pub(super) type Grads3 = [Option<Tensor>; 3];
pub(super) type Bwd3 =
    Box<dyn Fn([&Tensor; 3], [bool; 3], &Tensor, &Tensor) -> Result<Grads3> + Send + Sync>;

/// A kernel over three inputs, differentiable in each: `[da, db, dc] = bwd([a, b, c], need, y,
/// dy)`, `need[i]` telling whether input i tracks a gradient. `rest` is read by the forward
/// launch and dropped then, so the graph does not keep it.
pub(super) struct Kernel3 {
    spec: Spec,
    rest: std::sync::Mutex<Vec<Tensor>>,
    bwd: Bwd3,
}

impl Kernel3 {
    pub(super) fn new(spec: Spec, rest: Vec<Tensor>, bwd: Bwd3) -> Self {
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
pub(super) struct Kernel {
    pub(super) spec: Spec,
    pub(super) rest: Vec<Tensor>,
    pub(super) bwd: Option<Bwd1>,
}

/// A kernel differentiable in two inputs: `(da, db) = bwd(a, b, dy)`.
pub(super) struct Kernel2 {
    pub(super) spec: Spec,
    pub(super) rest: Vec<Tensor>,
    pub(super) bwd: Bwd2,
}

pub(super) fn no_cpu<T>() -> Result<T> {
    candle_core::bail!("petal's CUDA kernels run on CUDA tensors only")
}

/// A launch on CPU tensors: emulated where `emulate_from` was called, an error otherwise.
pub(super) fn on_cpu(
    spec: &Spec,
    first: &[(&CpuStorage, &Layout)],
    rest: &[Tensor],
) -> Result<(CpuStorage, Shape)> {
    if !emulating() {
        return no_cpu();
    }
    super::emulate::run(spec, first, rest)
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

/// `f` over the storages of `first` then of `rest` (each taken by `pick`, which says whether
/// it is on the launch's device), `rest`'s storage guards held while `f` runs.
pub(super) fn with_inputs<S, R>(
    spec: &Spec,
    first: &[(&S, &Layout)],
    rest: &[Tensor],
    pick: impl Fn(&Storage) -> Option<&S>,
    f: impl FnOnce(&[(&S, &Layout)]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = rest.iter().map(|t| t.storage_and_layout()).collect();
    let mut ins: Vec<(&S, &Layout)> = first.to_vec();
    for (g, l) in &guards {
        let Some(s) = pick(g) else {
            candle_core::bail!("{}: an input is on another device", spec.name)
        };
        ins.push((s, l));
    }
    f(&ins)
}

/// Runs a kernel with no backward over contiguous inputs.
pub(super) fn launch(spec: Spec, inputs: &[&Tensor]) -> Result<Tensor> {
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
pub(super) fn rows_cols(x: &Tensor) -> Result<(usize, usize)> {
    let cols = x.dim(candle_core::D::Minus1)?;
    Ok((x.elem_count() / cols.max(1), cols))
}
