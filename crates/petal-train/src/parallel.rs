//! Data-parallel training: N processes (ranks) each take an N-th of every micro-batch, and
//! sum their token-weighted gradients, losses and token counts before clipping and the
//! optimizer step, so every rank steps the same adapter on the gradients one process would
//! have of the whole batch. The transport is a [`Collective`] (MPI in petal-cli's `mpi`
//! feature); a run of one process uses [`Group::solo`] and none of this changes anything.

use candle_core::{DType, Tensor, Var};
use petal_core::{rng, Error, Result};
use petal_data::Example;
use std::sync::Arc;

/// The operations data-parallel training needs from its transport. Every rank calls each one
/// in the same order (they are collective). A rank that fails exits with an error, which ends
/// the job (`mpirun` stops the other ranks) rather than leave them waiting.
pub trait Collective {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place on every rank.
    fn sum_f32(&self, values: &mut [f32]) -> Result<()>;
    fn sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Rank 0's bytes, on every rank.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;
}

/// The ranks a run trains on: one process alone unless a transport is given.
#[derive(Clone, Default)]
pub struct Group(Option<Arc<dyn Collective>>);

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {})", self.rank(), self.size())
    }
}

impl Group {
    pub fn solo() -> Group {
        Group(None)
    }
    pub fn new(c: Arc<dyn Collective>) -> Group {
        Group(Some(c))
    }
    pub fn rank(&self) -> usize {
        self.0.as_ref().map_or(0, |c| c.rank())
    }
    pub fn size(&self) -> usize {
        self.0.as_ref().map_or(1, |c| c.size())
    }
    /// Rank 0 writes the run's files (metrics, checkpoints, the adapter, reports).
    pub fn is_leader(&self) -> bool {
        self.rank() == 0
    }
    pub fn sum_f64(&self, v: &mut [f64]) -> Result<()> {
        match &self.0 {
            Some(c) if c.size() > 1 => c.sum_f64(v),
            _ => Ok(()),
        }
    }
    /// Refuse to train unless every rank runs with the same settings (`settings`: a JSON
    /// object). Every rank learns every rank's settings, so each one's message names the odd
    /// ranks and the keys they change: whichever rank's message reaches the user first (the
    /// first to exit ends the job) says it all.
    pub fn check_same(&self, settings: &str) -> Result<()> {
        let Some(c) = self.0.as_ref().filter(|c| c.size() > 1) else {
            return Ok(());
        };
        let all = gather_bytes(c.as_ref(), settings.as_bytes())?;
        let all: Vec<String> = all
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        let odd: Vec<String> = (1..c.size())
            .filter(|&r| all[r] != all[0])
            .map(|r| {
                format!(
                    "rank {r}: {}",
                    crate::trainer::fingerprint_diff(&all[0], &all[r])
                )
            })
            .collect();
        match odd.is_empty() {
            true => Ok(()),
            false => Err(Error::msg(format!(
                "rank {} of {}: ranks run with other settings than rank 0 ({}); every rank \
                 must run the same command",
                c.rank(),
                c.size(),
                odd.join("; ")
            ))),
        }
    }

    /// This rank's share of a global micro-batch: rows `[rank·b, (rank+1)·b)` of the batch
    /// one process would take with `size·b` rows (`b` the per-rank batch size).
    pub fn share(&self, global: Vec<Example>, per_rank: usize) -> Vec<Example> {
        let lo = (self.rank() * per_rank).min(global.len());
        let hi = (lo + per_rank).min(global.len());
        global.into_iter().skip(lo).take(hi - lo).collect()
    }

    /// The dropout seed of this rank's share of a micro-batch: the micro-batch's own with one
    /// process, one per rank otherwise (so ranks do not repeat each other's masks).
    pub fn seed(&self, micro_seed: u64) -> u64 {
        match self.size() {
            1 => micro_seed,
            _ => rng::splitmix(micro_seed ^ rng::splitmix(self.rank() as u64 + 1)),
        }
    }

    /// Sum each variable's gradient over the ranks, in place. A gradient that no rank has
    /// stays absent (as with one process, where the optimizer skips it).
    pub fn sum_grads(&self, grads: &mut [Option<Tensor>], vars: &[Var]) -> Result<()> {
        let Some(c) = self.0.as_ref().filter(|c| c.size() > 1) else {
            return Ok(());
        };
        let total: usize = vars.iter().map(|v| v.elem_count()).sum();
        let mut flat: Vec<f32> = Vec::with_capacity(total + vars.len());
        for (g, v) in grads.iter().zip(vars) {
            match g {
                Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => flat.resize(flat.len() + v.elem_count(), 0.0),
            }
        }
        flat.extend(grads.iter().map(|g| f32::from(u8::from(g.is_some()))));
        c.sum_f32(&mut flat)?;
        let present = &flat[total..];
        let mut at = 0;
        for ((g, v), &p) in grads.iter_mut().zip(vars).zip(present) {
            let n = v.elem_count();
            *g = match p > 0.0 {
                true => Some(
                    Tensor::from_slice(&flat[at..at + n], v.shape(), v.device())?
                        .to_dtype(v.dtype())?,
                ),
                false => None,
            };
            at += n;
        }
        Ok(())
    }
}

/// What every rank of a data-parallel run must share: the run's fingerprint (model, adapter,
/// data, batch), the trainer's settings, the step it starts from and the data's size.
pub(crate) fn rank_settings(cfg: &crate::TrainConfig, start: usize, examples: usize) -> String {
    let mut s: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&cfg.fingerprint)
        .unwrap_or_else(|_| {
            let mut m = serde_json::Map::new();
            m.insert("fingerprint".into(), cfg.fingerprint.clone().into());
            m
        });
    let o = &cfg.optim;
    let trainer = serde_json::json!({
        "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
        "schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps, "max_steps": cfg.max_steps,
        "max_grad_norm": cfg.max_grad_norm, "eval_every": cfg.eval_every,
        "save_every": cfg.save_every, "prox_mu": cfg.prox_mu, "out": cfg.out_dir,
        "balanced_tasks": cfg.balanced_tasks, "group_by_length": cfg.group_by_length, "grad_checkpointing": cfg.grad_checkpointing,
        "save_converted": cfg.save_converted, "start_step": start, "train_examples": examples,
    });
    if let serde_json::Value::Object(t) = trainer {
        s.extend(t);
    }
    serde_json::Value::Object(s).to_string()
}

/// Every rank's bytes, on every rank (an all-gather made of two sums: the lengths, then each
/// rank's bytes at its own offset of a zeroed buffer; a byte is exact in an f64).
fn gather_bytes(c: &dyn Collective, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut lengths = vec![0f64; c.size()];
    lengths[c.rank()] = mine.len() as f64;
    c.sum_f64(&mut lengths)?;
    let lengths: Vec<usize> = lengths.iter().map(|&l| l as usize).collect();
    let at: usize = lengths[..c.rank()].iter().sum();
    let mut buffer = vec![0f64; lengths.iter().sum()];
    for (slot, &b) in buffer[at..].iter_mut().zip(mine) {
        *slot = f64::from(b);
    }
    c.sum_f64(&mut buffer)?;
    let mut out = Vec::with_capacity(c.size());
    let mut from = 0;
    for l in lengths {
        out.push(buffer[from..from + l].iter().map(|&v| v as u8).collect());
        from += l;
    }
    Ok(out)
}
