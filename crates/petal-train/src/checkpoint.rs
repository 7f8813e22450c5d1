//! Checkpoints: adapter + optimizer state + step + config fingerprint, written to a temp folder
//! and renamed into place, so a crash never leaves a half-written one.

use candle_core::{Device, Tensor};
use petal_core::{AdapterConfig, Error, Result};
use petal_io::{write_adapter_files, write_atomic, write_safetensors_atomic};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const STATE: &str = "trainer_state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const LATEST: &str = "latest";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Identity of the model + adapter + data settings; a resume must match it.
    pub fingerprint: String,
    pub adam_t: usize,
    pub last_loss: f64,
}

pub struct Checkpoint {
    pub state: TrainerState,
    pub adapter: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

pub fn step_dir(out: &Path, step: usize) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:06}"))
}

pub fn save(
    out: &Path,
    state: &TrainerState,
    cfg: &AdapterConfig,
    adapter: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
) -> Result<PathBuf> {
    let final_dir = step_dir(out, state.step);
    let parent = final_dir.parent().unwrap_or(out).to_path_buf();
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::msg(e.to_string()))?;
    petal_io::write_dir_atomic(&final_dir, |tmp| {
        write_adapter_files(tmp, cfg, adapter)?;
        write_safetensors_atomic(&tmp.join(OPTIMIZER), optimizer)?;
        write_atomic(&tmp.join(STATE), json.as_bytes())
    })?;
    write_atomic(
        &parent.join(LATEST),
        final_dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .as_bytes(),
    )?;
    Ok(final_dir)
}

/// A checkpoint folder, or a run folder (then its latest checkpoint).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE).exists() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("checkpoints").join(LATEST);
    let name = std::fs::read_to_string(&latest).map_err(|_| {
        Error::msg(format!(
            "{}: not a checkpoint (no {STATE}) and no checkpoints/{LATEST}",
            path.display()
        ))
    })?;
    Ok(path.join("checkpoints").join(name.trim()))
}

pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    let dir = resolve(path)?;
    let sp = dir.join(STATE);
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| Error::msg(format!("{}: {e}", sp.display())))?;
    // checkpoints are written as step-NNNNNN: a state claiming another step was altered
    let named = dir
        .file_name()
        .and_then(|n| n.to_str()?.strip_prefix("step-")?.parse().ok());
    if let Some(n) = named.filter(|&n: &usize| n != state.step) {
        return Err(Error::msg(format!(
            "{}: field `step` is {}, but the checkpoint folder is step {n}",
            sp.display(),
            state.step
        )));
    }
    let (_, adapter) = petal_io::load_adapter(&dir, device)?;
    let op = dir.join(OPTIMIZER);
    let optimizer = candle_core::safetensors::load(&op, device)
        .map_err(|e| Error::msg(format!("{}: {e}", op.display())))?;
    Ok(Checkpoint {
        state,
        adapter,
        optimizer,
    })
}
