//! `petal train`'s checks of its options before any work: ranges, the memory limit, the task
//! sampling.

use super::TrainOpts;
use anyhow::{anyhow, bail, Result};

/// Refuse out-of-range training values before any work, naming the flag (and its run-file key)
/// and the allowed range. A method's own options are checked by the method.
pub(super) fn check_ranges(o: &TrainOpts) -> Result<()> {
    let given = |flag, v: Option<usize>| v.map(|v| (flag, v));
    let counts: Vec<(&str, usize)> = [
        given("batch-size", o.batch_size),
        given("grad-accum", o.grad_accum),
    ]
    .into_iter()
    .flatten()
    .collect();
    crate::common::at_least(1, &counts)?;
    o.seq_len.map(crate::common::check_seq_len).transpose()?;
    let positive = |flag: &str, v: Option<f64>, zero_ok: bool| -> Result<()> {
        match v {
            Some(x) if !x.is_finite() || x < 0.0 || (x == 0.0 && !zero_ok) => {
                let range = if zero_ok {
                    "finite and >= 0"
                } else {
                    "finite and > 0"
                };
                bail!("--{flag} {x} is out of range: must be {range}")
            }
            _ => Ok(()),
        }
    };
    positive("lr", o.lr, false)?;
    positive("alpha", o.alpha, false)?;
    if let Some(d) = o.dropout.filter(|d| !(0.0..1.0).contains(d)) {
        bail!("--dropout {d} is out of range: must be in [0, 1)");
    }
    positive("weight-decay", o.weight_decay, true)?;
    positive("prox-mu", o.prox_mu, true)?;
    positive("max-grad-norm", o.max_grad_norm, true)?;
    task_sampling(o)?;
    if let Some(s) = &o.schedule {
        s.parse::<petal_train::Schedule>()
            .map_err(|e| anyhow!("--schedule {s}: {e}"))?;
    }
    if let Some(f) = o.val_fraction.filter(|f| !(0.0..1.0).contains(f)) {
        bail!("--val-fraction {f} is out of range: must be in [0, 1)");
    }
    max_memory(o)?;
    Ok(())
}

/// `--max-memory` in bytes, if given.
pub(crate) fn max_memory(o: &TrainOpts) -> Result<Option<u64>> {
    let parse =
        |s: &str| petal_core::memory::parse_bytes(s).map_err(|e| anyhow!("--max-memory: {e}"));
    o.max_memory.as_deref().map(parse).transpose()
}

/// `--task-sampling`, checked: proportional or balanced.
pub(super) fn task_sampling(o: &TrainOpts) -> Result<&str> {
    match o.task_sampling.as_deref().unwrap_or("proportional") {
        "balanced" if o.group_by_length == Some(true) => {
            bail!("--group-by-length orders examples by length, --task-sampling balanced by task: choose one")
        }
        s @ ("proportional" | "balanced") => Ok(s),
        s => bail!("--task-sampling {s:?} is not a task sampling: proportional or balanced"),
    }
}
