//! Gradient sums on NCCL (the cargo feature `nccl`, with `mpi`): each rank's GPU joins one NCCL
//! communicator, bootstrapped by MPI (rank 0 draws NCCL's unique id and broadcasts it), and the
//! adapter's summed gradients travel GPU to GPU (NVLink or the network NCCL finds); the small
//! sums (token counts, settings) stay on MPI. NCCL is loaded at run time (`libnccl.so`), so
//! the build needs no CUDA toolkit.
//!
//! The gradients reach [`Collective::sum_f32`] as one flat host buffer (as MPI's), so they are
//! staged through host memory: one copy up, the all-reduce on the GPU, one copy back.

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use petal_core::{Error, Result};
use petal_train::Collective;
use std::sync::Arc;

pub struct Nccl {
    /// MPI, for the sums that are not gradients and for the broadcasts.
    mpi: Box<dyn Collective>,
    comm: Comm,
    stream: Arc<CudaStream>,
}

fn fail(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::msg(format!("NCCL: {what}: {e:?}"))
}

/// Run `f`, turning a panic of cudarc's library loading (no `libcuda` or `libnccl` on the
/// library path) into an error that says which library and where it was looked for.
fn loading<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.unwrap_or_else(|p| {
        let cause = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        // cudarc's message goes on to list every file name it tried
        let cause = cause.split(" - searched for").next().unwrap_or(cause);
        Err(Error::msg(format!(
            "NCCL: {what}: {cause} (an NVIDIA driver's libcuda.so and NCCL's libnccl.so must be \
             on the library path; PETAL_COLLECTIVE=mpi sums on MPI instead)"
        )))
    })
}

impl Nccl {
    /// Join the ranks' NCCL communicator on GPU `ordinal` (a collective call: every rank).
    pub fn new(mpi: Box<dyn Collective>, ordinal: usize) -> Result<Nccl> {
        let (rank, size) = (mpi.rank(), mpi.size());
        let device = format!("rank {rank}: CUDA device {ordinal}");
        let stream = loading(&device, || {
            // the driver's library loaded, but no device (or not this one)
            let ctx = CudaContext::new(ordinal).map_err(|e| {
                Error::msg(format!(
                    "NCCL: {device}: {e:?} (PETAL_COLLECTIVE=mpi sums on MPI instead)"
                ))
            })?;
            Ok(ctx.default_stream())
        })?;
        let mut id: Vec<u8> = match rank {
            0 => loading("rank 0: the communicator's id", || {
                let id = Id::new().map_err(|e| fail("ncclGetUniqueId", e.0))?;
                Ok(id.internal().iter().map(|&c| c as u8).collect())
            })?,
            _ => Vec::new(),
        };
        mpi.broadcast(&mut id)?;
        let internal: [std::ffi::c_char; 128] = std::array::from_fn(|i| id[i] as std::ffi::c_char);
        let comm = loading(&format!("rank {rank} of {size}: joining"), || {
            Comm::from_rank(stream.clone(), rank, size, Id::uninit(internal))
                .map_err(|e| fail("ncclCommInitRank", e.0))
        })?;
        Ok(Nccl { mpi, comm, stream })
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn size(&self) -> usize {
        self.mpi.size()
    }
    fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        let s = &self.stream;
        let mut on_gpu = s
            .clone_htod(values)
            .map_err(|e| fail("copy to the GPU", e))?;
        self.comm
            .all_reduce_in_place(&mut on_gpu, &ReduceOp::Sum)
            .map_err(|e| fail("ncclAllReduce", e.0))?;
        s.memcpy_dtoh(&on_gpu, values)
            .map_err(|e| fail("copy from the GPU", e))?;
        s.synchronize().map_err(|e| fail("synchronize", e))
    }
    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.mpi.sum_f64(values)
    }
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        self.mpi.broadcast(bytes)
    }
}
