//! The ranks of `mpirun -np N petal train …`: data-parallel training over MPI (the cargo
//! feature `mpi`, on Open MPI or MPICH through the `mpi` crate). Each rank loads the model
//! and data, takes its share of every batch and sums gradients with the others
//! (`petal_train::parallel`); rank 0 writes the run folder. Without the feature, a process
//! started as one of several ranks refuses to train rather than train alone N times over.
//! With the feature `nccl` too, ranks that train on GPUs sum their gradients on NCCL.

use anyhow::{bail, Result};
use petal_train::Group;
use std::cell::RefCell;
use std::sync::OnceLock;

#[cfg(feature = "nccl")]
mod nccl;

thread_local! {
    /// The process's group, made once (MPI is initialised once per process).
    static GROUP: RefCell<Option<Group>> = const { RefCell::new(None) };
}

/// The number of ranks the launcher started, when this process is one of them (Open MPI's
/// `mpirun`, MPICH's Hydra).
fn launched_size() -> Option<usize> {
    launcher_number(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
}

/// The first of these launcher variables that holds a number.
fn launcher_number(keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// This process's rank among the launch's ranks on its machine (Open MPI's `mpirun`, MPICH's
/// Hydra).
fn local_rank() -> Option<usize> {
    launcher_number(&["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"])
}

/// The CUDA device this process trains on, once `--device` has named one.
static CUDA_ORDINAL: OnceLock<usize> = OnceLock::new();

/// The GPU of `--device cuda` (no index): one per rank on each machine (its local rank), the
/// first one for a process alone; recorded for the gradient sums.
pub fn cuda_ordinal(explicit: Option<usize>) -> usize {
    let ordinal = explicit.unwrap_or_else(|| match launched_size() {
        Some(n) if n > 1 => local_rank().unwrap_or(0),
        _ => 0,
    });
    let _ = CUDA_ORDINAL.set(ordinal);
    ordinal
}

/// The GPU whose NCCL communicator sums the gradients, if any: the training device's by
/// default, none with `PETAL_COLLECTIVE=mpi`, the local rank's with `PETAL_COLLECTIVE=nccl`
/// (also when training on the CPU).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
fn nccl_ordinal() -> Result<Option<usize>> {
    let chosen = std::env::var("PETAL_COLLECTIVE").unwrap_or_default();
    match chosen.as_str() {
        "" => Ok(CUDA_ORDINAL.get().copied()),
        "mpi" => Ok(None),
        "nccl" if cfg!(feature = "nccl") => Ok(Some(
            CUDA_ORDINAL.get().copied().or_else(local_rank).unwrap_or(0),
        )),
        "nccl" => bail!(
            "PETAL_COLLECTIVE=nccl, but this petal was built without the `nccl` feature: build \
             it with `cargo build --release -p petal-cli --features mpi,nccl`"
        ),
        o => bail!("PETAL_COLLECTIVE=`{o}`: the gradient sums run on `mpi` or `nccl`"),
    }
}

/// This process's ranks: all of an MPI launch's with the `mpi` feature, else one alone.
pub fn group() -> Result<Group> {
    if let Some(g) = GROUP.with(|g| g.borrow().clone()) {
        return Ok(g);
    }
    let g = match launched_size() {
        Some(n) if n > 1 => transport::init(n)?,
        _ => Group::solo(),
    };
    GROUP.with(|slot| *slot.borrow_mut() = Some(g.clone()));
    Ok(g)
}

/// Run a command that may train data-parallel: MPI ends with it after success; a rank that
/// fails prints its error and aborts the whole job (the other ranks may be waiting for it in
/// a collective, and a rank that exits without ending MPI crashes Open MPI 4.1's `mpirun`).
pub fn run(command: impl FnOnce() -> Result<()>) -> Result<()> {
    let r = command();
    let many = GROUP.with(|g| g.borrow_mut().take()).map(|g| g.size() > 1);
    match (r, many) {
        (Err(e), Some(true)) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            transport::abort(1)
        }
        (r, _) => {
            transport::finish();
            r
        }
    }
}

#[cfg(not(feature = "mpi"))]
mod transport {
    use anyhow::{bail, Result};
    use petal_train::Group;

    pub fn init(n: usize) -> Result<Group> {
        bail!(
            "started as one of {n} MPI ranks, but this petal was built without the `mpi` \
             feature, so each rank would train alone; build it with `cargo build --release -p \
             petal-cli --features mpi` (needs Open MPI and libclang: apt-get install \
             libopenmpi-dev openmpi-bin libclang-dev)"
        )
    }
    pub fn finish() {}
    pub fn abort(code: i32) -> ! {
        std::process::exit(code)
    }
}

#[cfg(feature = "mpi")]
mod transport {
    use anyhow::{anyhow, bail, Result};
    use mpi::collective::SystemOperation;
    use mpi::traits::{Communicator, CommunicatorCollectives, Root};
    use petal_core::Result as CoreResult;
    use petal_train::{Collective, Group};
    use std::cell::RefCell;
    use std::sync::Arc;

    thread_local! {
        /// MPI's environment: dropping it finalises MPI.
        static UNIVERSE: RefCell<Option<mpi::environment::Universe>> = const { RefCell::new(None) };
    }

    struct Mpi(mpi::topology::SimpleCommunicator);

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.0.rank() as usize
        }
        fn size(&self) -> usize {
            self.0.size() as usize
        }
        fn sum_f32(&self, values: &mut [f32]) -> CoreResult<()> {
            let send = values.to_vec();
            self.0
                .all_reduce_into(&send[..], values, SystemOperation::sum());
            Ok(())
        }
        fn sum_f64(&self, values: &mut [f64]) -> CoreResult<()> {
            let send = values.to_vec();
            self.0
                .all_reduce_into(&send[..], values, SystemOperation::sum());
            Ok(())
        }
        fn broadcast(&self, bytes: &mut Vec<u8>) -> CoreResult<()> {
            let root = self.0.process_at_rank(0);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
            Ok(())
        }
    }

    pub fn init(n: usize) -> Result<Group> {
        let universe = mpi::initialize().ok_or_else(|| anyhow!("MPI was already initialised"))?;
        let world = universe.world();
        if world.size() as usize != n {
            bail!(
                "the launcher announced {n} ranks but MPI's world has {}: was petal started \
                 by another MPI's launcher than the one it was built with?",
                world.size()
            );
        }
        UNIVERSE.with(|u| *u.borrow_mut() = Some(universe));
        let mpi = Mpi(world);
        // read in every MPI build, so that a `PETAL_COLLECTIVE` it cannot honour is refused
        let nccl_on = super::nccl_ordinal()?;
        #[cfg(feature = "nccl")]
        if let Some(ordinal) = nccl_on {
            let nccl = super::nccl::Nccl::new(Box::new(mpi), ordinal)?;
            return Ok(Group::new(Arc::new(nccl)));
        }
        let _ = nccl_on;
        Ok(Group::new(Arc::new(mpi)))
    }

    pub fn finish() {
        UNIVERSE.with(|u| drop(u.borrow_mut().take()));
    }

    pub fn abort(code: i32) -> ! {
        match UNIVERSE.with(|u| u.borrow().as_ref().map(|u| u.world())) {
            Some(world) => world.abort(code),
            None => std::process::exit(code),
        }
    }
}
