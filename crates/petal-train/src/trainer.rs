//! The training loop: for each optimizer step, accumulate token-weighted gradients over
//! micro-batches, clip, step AdamW on the scheduled learning rate, log, evaluate, checkpoint.
//! Data order and dropout masks derive from (seed, micro-batch index), and checkpoints hold
//! the adapter and optimizer state bit for bit, so `--resume` replays the same losses.

use crate::checkpoint::{self, TrainerState};
use crate::objective::{LmObjective, Objective};
use crate::optim::{AdamW, AdamWParams};
use crate::parallel::Group;
use crate::schedule::Schedule;
use candle_core::{Tensor, Var};
use petal_core::inject::adapter_vars;
use petal_core::{rng, AdapterConfig, Error, Result, TrainingHook};
use petal_data::Example;
use petal_io::adapter_tensors;
use petal_models::Llama;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub optim: AdamWParams,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub max_steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    pub eval_every: usize,
    pub save_every: usize,
    pub out_dir: PathBuf,
    pub adapter_name: String,
    pub pad_id: u32,
    /// Identity of model, adapter config and data; checkpoints refuse to resume elsewhere.
    pub fingerprint: String,
    /// Save the final adapter in the method's converted form (`AdapterMethod::convert_for_save`:
    /// PiSSA / OLoRA as plain LoRA of rank 2r for the original base). Checkpoints stay as trained.
    pub save_converted: bool,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    pub grad_checkpointing: bool,
    /// Multi-task data: draw the tasks in turn (each gets the same share of every batch)
    /// instead of in proportion to their sizes.
    pub balanced_tasks: bool,
    /// Group examples of similar lengths into micro-batches (transformers'
    /// `group_by_length`, [`length_grouped`]): less padding, batches no longer uniform draws.
    pub group_by_length: bool,
    /// FedProx's proximal term: `prox_mu / 2 * ||w - w0||^2` over the adapter's tensors, w0
    /// their values when training starts (a federated round's global adapter); 0: none. Its
    /// gradient `prox_mu (w - w0)` joins the step's gradients before clipping; the losses
    /// logged are the data's alone.
    pub prox_mu: f64,
    /// The ranks of a data-parallel run (`batch_size` is per rank); one process by default.
    pub group: Group,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Multi-task validation data: each task's loss at this evaluation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_tasks: Option<std::collections::BTreeMap<String, f64>>,
    /// The mixtures' router (MoV, MoLoRA, SiRA): each expert's mean gate per token over the
    /// step's forwards, averaged over the layers, and the share of top-k choices dropped for
    /// capacity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router: Option<petal_core::methods::mixture::RouterLoad>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub losses: Vec<f64>,
    pub final_eval_loss: Option<f64>,
    pub adapter_dir: PathBuf,
    pub seconds: f64,
    /// Wall time of each optimizer step (forward, backward, update; no eval or checkpoint).
    pub step_seconds: Vec<f64>,
    /// Training examples (sequences) the run drew from (a federated client's weight).
    pub examples: usize,
}

/// Callbacks for progress display.
pub trait Observer {
    fn on_start(&mut self, _first_step: usize, _max_steps: usize) {}
    fn on_step(&mut self, _m: &StepMetrics) {}
    fn on_checkpoint(&mut self, _dir: &Path) {}
}

impl Observer for () {}

/// The examples of micro-batch `k` of the endless, per-epoch reshuffled (or, with
/// `balanced`, task-balanced) stream of training examples: every rank's, `batch_size` for each.
pub(crate) fn micro_examples(train: &[Example], cfg: &TrainConfig, k: usize) -> Vec<Example> {
    let bs = cfg.batch_size * cfg.group.size();
    let per_epoch = train.len().div_ceil(bs);
    let (epoch, pos) = (k / per_epoch, k % per_epoch);
    let seed = rng::splitmix(cfg.seed ^ (epoch as u64 + 1));
    let order = if cfg.balanced_tasks {
        petal_data::balanced_order(train, seed)
    } else {
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        if cfg.group_by_length {
            let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
            // transformers groups by an optimizer step's examples (batch x accumulation)
            order = length_grouped(&order, &lengths, bs * cfg.grad_accum.max(1), None);
        }
        order
    };
    order[pos * bs..((pos + 1) * bs).min(train.len())]
        .iter()
        .map(|&i| train[i].clone())
        .collect()
}

/// transformers' length grouping (`get_length_grouped_indices`, the Trainer's
/// `group_by_length`) of the permutation `order`: mega-batches of `mult * batch_size` (by
/// default `min(n / (4 batch_size), 50)`, at least 1), each sorted longest first (ties keep
/// `order`'s order), then the longest example swapped to the front, so a too-long batch fails
/// at once. Consecutive micro-batches then hold examples of similar lengths.
pub fn length_grouped(
    order: &[usize],
    lengths: &[usize],
    batch_size: usize,
    mult: Option<usize>,
) -> Vec<usize> {
    let mult = mult
        .unwrap_or_else(|| (lengths.len() / (batch_size * 4).max(1)).min(50))
        .max(1);
    let mut mega: Vec<Vec<usize>> = order
        .chunks(mult * batch_size.max(1))
        .map(|c| {
            let mut c = c.to_vec();
            c.sort_by_key(|&i| std::cmp::Reverse(lengths[i])); // stable: ties keep their order
            c
        })
        .collect();
    // the mega-batch whose longest is longest (the first of equals) gives the front its longest
    let first = |m: &Vec<usize>| lengths[m[0]];
    if let Some(best) = (0..mega.len()).reduce(|b, i| {
        if first(&mega[i]) > first(&mega[b]) {
            i
        } else {
            b
        }
    }) {
        let (front, longest) = (mega[0][0], mega[best][0]);
        mega[0][0] = longest;
        mega[best][0] = front;
    }
    mega.concat()
}

/// Train adapter `cfg.adapter_name` of a decoder on next-token prediction.
pub fn train(
    model: &Llama,
    adapter_cfg: &AdapterConfig,
    train_set: &[Example],
    val_set: &[Example],
    cfg: &TrainConfig,
    resume: Option<&Path>,
    obs: &mut dyn Observer,
) -> Result<TrainSummary> {
    let lm = LmObjective {
        model,
        pad: cfg.pad_id,
        checkpointing: cfg.grad_checkpointing,
    };
    train_objective(&lm, adapter_cfg, train_set, val_set, cfg, resume, obs)
}

/// Train adapter `cfg.adapter_name` of `obj`'s model on `obj`'s loss.
pub fn train_objective(
    obj: &dyn Objective,
    adapter_cfg: &AdapterConfig,
    train_set: &[Example],
    val_set: &[Example],
    cfg: &TrainConfig,
    resume: Option<&Path>,
    obs: &mut dyn Observer,
) -> Result<TrainSummary> {
    let model = obj.model();
    if train_set.is_empty() {
        return Err(Error::msg("training data is empty"));
    }
    let vars = adapter_vars(model, &cfg.adapter_name);
    if vars.is_empty() {
        return Err(Error::msg(format!(
            "adapter `{}` has no trainable tensors",
            cfg.adapter_name
        )));
    }
    let method = adapter_cfg
        .method()
        .ok_or_else(|| Error::msg(format!("unknown peft_type `{}`", adapter_cfg.peft_type)))?;
    if cfg.save_converted {
        // refuse before training rather than after it
        method.convert_for_save(model, &cfg.adapter_name, adapter_cfg, &mut HashMap::new())?;
    }
    let mut opt = AdamW::new(vars.clone(), cfg.optim)?.with_kernels(obj.kernels());
    if cfg.prox_mu > 0.0 && resume.is_some() {
        return Err(Error::msg(
            "a proximal term (prox_mu) is anchored at the adapter training starts from: a \
             resumed run would anchor it elsewhere",
        ));
    }
    let anchor: Vec<Tensor> = match cfg.prox_mu > 0.0 {
        true => vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?,
        false => Vec::new(),
    };
    // the method's own work around training (AdaLoRA's rank allocator)
    let mut hook = method.training(model, &cfg.adapter_name, adapter_cfg)?;
    if let Some(why) = hook
        .as_ref()
        .and_then(|h| h.single_process_only())
        .filter(|_| cfg.group.size() > 1)
    {
        return Err(Error::msg(format!(
            "{} does not train data-parallel: {why}",
            adapter_cfg.peft_type
        )));
    }
    let leader = cfg.group.is_leader();
    let mut start = 0;
    let metrics_path = cfg.out_dir.join("metrics.jsonl");
    if let Some(path) = resume {
        start = restore(obj, &mut opt, hook.as_deref_mut(), cfg, path)?;
    }
    cfg.group
        .check_same(&crate::parallel::rank_settings(cfg, start, train_set.len()))?;
    match resume {
        Some(_) if leader => truncate_metrics(&metrics_path, start)?,
        None if leader => {
            std::fs::create_dir_all(&cfg.out_dir).map_err(|e| Error::io(&cfg.out_dir, e))?;
            std::fs::write(&metrics_path, b"").map_err(|e| Error::io(&metrics_path, e))?;
        }
        _ => {}
    }
    // only rank 0 writes the run's files
    let mut log = match leader {
        true => Some(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&metrics_path)
                .map_err(|e| Error::io(&metrics_path, e))?,
        ),
        false => None,
    };
    obs.on_start(start, cfg.max_steps);
    let t0 = Instant::now();
    let mut losses = Vec::new();
    let mut step_seconds = Vec::new();
    let mut last_eval = None;
    for step in start..cfg.max_steps {
        let ts = Instant::now();
        let lr = cfg
            .schedule
            .lr(cfg.optim.lr, step, cfg.warmup_steps, cfg.max_steps);
        let rays = hook.as_ref().and_then(|h| h.rays(step, cfg.max_steps));
        let (loss, mut grads, tokens) = match (&rays, hook.as_deref()) {
            (Some(_), Some(_)) if cfg.group.size() > 1 => {
                return Err(Error::msg(format!(
                    "{}: preference-ray training runs in one process only, not data-parallel",
                    adapter_cfg.peft_type
                )))
            }
            (Some(rays), Some(h)) => {
                crate::preference::step(obj, h, rays, train_set, cfg, step, &vars)?
            }
            _ => plain_step(obj, hook.as_deref(), train_set, cfg, step, &vars)?,
        };
        if !loss.is_finite() {
            let dir = cfg.out_dir.join("checkpoints");
            let kept = match dir.join(checkpoint::LATEST).exists() {
                true => format!("the last good checkpoint is kept in {}", dir.display()),
                false => "no checkpoint had been saved yet".to_string(),
            };
            return Err(Error::msg(format!(
                "loss is {loss} at step {}; stopped ({kept})",
                step + 1
            )));
        }
        for ((g, v), w0) in grads.iter_mut().zip(&vars).zip(&anchor) {
            let pull = ((v.as_tensor() - w0)? * cfg.prox_mu)?;
            *g = Some(match g.take() {
                Some(g) => (g + pull)?,
                None => pull,
            });
        }
        let grad_norm = clip(&mut grads, cfg.max_grad_norm)?;
        opt.step(&grads, lr)?;
        if let Some(h) = hook.as_mut() {
            let grad_of = |v: &Var| {
                vars.iter()
                    .position(|x| x.as_tensor().id() == v.as_tensor().id())
                    .and_then(|i| grads[i].clone())
            };
            h.after_step(model, step, &grad_of)?;
            if h.reset_optimizer_after(step) {
                opt.reset()?;
            }
        }
        losses.push(loss);
        step_seconds.push(ts.elapsed().as_secs_f64());
        let mut m = StepMetrics {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / ts.elapsed().as_secs_f64(),
            eval_loss: None,
            eval_tasks: None,
            router: router_load(model),
        };
        let done = step + 1 == cfg.max_steps;
        let eval_now = cfg.eval_every > 0 && ((step + 1) % cfg.eval_every == 0 || done);
        if leader && !val_set.is_empty() && eval_now {
            let r = obj.evaluate(val_set, cfg.batch_size)?;
            m.eval_loss = Some(r.loss);
            if !r.tasks.is_empty() {
                m.eval_tasks = Some(r.tasks.iter().map(|(t, l)| (t.clone(), l.loss)).collect());
            }
            last_eval = Some(r.loss);
        }
        if let Some(log) = log.as_mut() {
            let line = serde_json::to_string(&m).map_err(|e| Error::msg(e.to_string()))?;
            writeln!(log, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
        }
        obs.on_step(&m);
        if leader && ((cfg.save_every > 0 && (step + 1) % cfg.save_every == 0) || done) {
            let state = TrainerState {
                step: step + 1,
                fingerprint: cfg.fingerprint.clone(),
                adam_t: opt.t,
                last_loss: loss,
            };
            let (mut ostate, _) = opt.state();
            if let Some(h) = &hook {
                ostate.extend(h.state()?);
            }
            let dir = checkpoint::save(
                &cfg.out_dir,
                &state,
                adapter_cfg,
                &adapter_tensors(model, &cfg.adapter_name),
                &ostate,
            )?;
            obs.on_checkpoint(&dir);
        }
    }
    let adapter_dir = cfg.out_dir.join("adapter");
    if leader {
        save_final(model, hook.as_deref(), adapter_cfg, cfg, &adapter_dir)?;
    }
    Ok(TrainSummary {
        steps: cfg.max_steps,
        losses,
        final_eval_loss: last_eval,
        adapter_dir,
        seconds: t0.elapsed().as_secs_f64(),
        step_seconds,
        examples: train_set.len(),
    })
}

/// The trained adapter, in the method's saved (or converted) form, with the hook's files.
fn save_final(
    model: &dyn petal_core::Adaptable,
    hook: Option<&dyn TrainingHook>,
    adapter_cfg: &AdapterConfig,
    cfg: &TrainConfig,
    adapter_dir: &Path,
) -> Result<()> {
    let method = adapter_cfg
        .method()
        .ok_or_else(|| Error::msg(format!("unknown peft_type `{}`", adapter_cfg.peft_type)))?;
    let (mut saved, mut tensors) =
        petal_io::exported_adapter(model, &cfg.adapter_name, adapter_cfg)?;
    if let Some(h) = &hook {
        h.export(&mut saved, &mut tensors)?;
    }
    if cfg.save_converted {
        saved = method.convert_for_save(model, &cfg.adapter_name, &saved, &mut tensors)?;
        saved.inference_mode = true;
    }
    petal_io::save_adapter(adapter_dir, &saved, &tensors)?;
    if let Some(h) = hook {
        for (name, text) in h.files()? {
            petal_io::write_atomic(&adapter_dir.join(name), text.as_bytes())?;
        }
    }
    Ok(())
}

/// One step's gradients: accumulated over its micro-batches, token-weighted. Returns the
/// step's mean loss, the gradients of `vars` and the tokens it read.
fn plain_step(
    obj: &dyn Objective,
    hook: Option<&dyn TrainingHook>,
    train_set: &[Example],
    cfg: &TrainConfig,
    step: usize,
    vars: &[Var],
) -> Result<(f64, Vec<Option<Tensor>>, usize)> {
    let group = &cfg.group;
    let micro: Vec<Vec<Example>> = (0..cfg.grad_accum)
        .map(|j| {
            let all = micro_examples(train_set, cfg, step * cfg.grad_accum + j);
            group.share(all, cfg.batch_size)
        })
        .collect();
    // token-weighted over every rank's share: [units, tokens, loss sum]
    let mut counts = [
        micro.iter().map(|m| obj.units(m)).sum::<usize>() as f64,
        micro.iter().map(|m| tokens_of(m)).sum::<usize>() as f64,
        0.0,
    ];
    group.sum_f64(&mut counts[..1])?;
    let total = counts[0].max(1.0);
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let replicas = (cfg.grad_accum * group.size()) as f64;
    for (j, m) in micro.iter().enumerate() {
        // a short last batch of an epoch can leave a rank nothing but the regulariser
        let (sum, mut g) = match m.is_empty() {
            true => (0.0, petal_models::Grads::default()),
            false => obj.backward(m, total, group.seed(micro_seed(cfg, step, j)))?,
        };
        counts[2] += sum;
        if let Some(reg) = hook
            .map(|h| h.regulariser(obj.model()))
            .transpose()?
            .flatten()
        {
            g.absorb((reg / replicas)?.backward()?)?;
        }
        accumulate(&mut grads, vars, &g)?;
    }
    group.sum_f64(&mut counts[1..])?;
    group.sum_grads(&mut grads, vars)?;
    Ok((counts[2] / total, grads, counts[1] as usize))
}

/// Tokens the examples hold (the step's throughput count).
pub(crate) fn tokens_of(examples: &[Example]) -> usize {
    examples.iter().map(|e| e.ids.len()).sum()
}

/// The dropout seed of micro-batch `j` of `step`.
pub(crate) fn micro_seed(cfg: &TrainConfig, step: usize, j: usize) -> u64 {
    rng::splitmix(cfg.seed ^ rng::splitmix((step * cfg.grad_accum + j) as u64 + 7))
}

pub(crate) fn accumulate(
    acc: &mut [Option<Tensor>],
    vars: &[Var],
    g: &petal_models::Grads,
) -> Result<()> {
    for (slot, v) in acc.iter_mut().zip(vars) {
        if let Some(gi) = g.get(v.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(prev) => (prev + gi)?,
                None => gi.clone(),
            });
        }
    }
    Ok(())
}

/// Global L2 norm of all gradients; scaled down to `max` when above it (torch's
/// The routers' load since the last step, averaged over the layers (None without a mixture).
fn router_load(
    model: &dyn petal_core::Adaptable,
) -> Option<petal_core::methods::mixture::RouterLoad> {
    let loads: Vec<_> = model
        .linears()
        .iter()
        .flat_map(|l| {
            l.active()
                .iter()
                .filter_map(|n| l.layer(n).and_then(|a| a.router_load()))
                .collect::<Vec<_>>()
        })
        .collect();
    petal_core::methods::mixture::mean_load(&loads)
}

/// clip_grad_norm_: coefficient max / (norm + 1e-6), capped at 1).
pub fn clip(grads: &mut [Option<Tensor>], max: Option<f64>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if let Some(max) = max {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

fn restore(
    obj: &dyn Objective,
    opt: &mut AdamW,
    hook: Option<&mut (dyn TrainingHook + 'static)>,
    cfg: &TrainConfig,
    path: &Path,
) -> Result<usize> {
    let ck = checkpoint::load(path, obj.device())?;
    if !fingerprint_diff(&ck.state.fingerprint, &cfg.fingerprint).is_empty() {
        return Err(Error::msg(format!(
            "{}: checkpoint was made for another model or config (differs in: {})",
            path.display(),
            fingerprint_diff(&ck.state.fingerprint, &cfg.fingerprint)
        )));
    }
    if ck.state.step > cfg.max_steps {
        return Err(Error::msg(format!(
            "{}: the checkpoint is at step {}, past --max-steps {}: nothing left to train (raise \
             --max-steps to continue it)",
            path.display(),
            ck.state.step,
            cfg.max_steps
        )));
    }
    petal_io::load_into(obj.model(), &cfg.adapter_name, ck.adapter, path)?;
    opt.load_state(&ck.optimizer, ck.state.adam_t)?;
    if let Some(h) = hook {
        h.load_state(&ck.optimizer)?;
    }
    Ok(ck.state.step)
}

/// The settings in which two run fingerprints (JSON objects) differ, as `key: a -> b` (empty
/// where they agree). A data file named by two paths (relative and absolute, say) is the same.
pub(crate) fn fingerprint_diff(old: &str, new: &str) -> String {
    let parse = |s: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(s);
    let (Ok(a), Ok(b)) = (parse(old), parse(new)) else {
        return match old == new {
            true => String::new(),
            false => format!("checkpoint {old}, this run {new}"),
        };
    };
    let file = |v: Option<&serde_json::Value>| std::fs::canonicalize(v?.as_str()?).ok();
    let same = |k: &str| {
        a.get(k) == b.get(k)
            || (["data", "val_data"].contains(&k)
                && file(a.get(k)).is_some_and(|f| Some(f) == file(b.get(k))))
    };
    let at = |m: &serde_json::Map<_, _>, k| m.get(k).cloned().unwrap_or_default();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| !same(k))
        .map(|k| format!("{k}: {} -> {}", at(&a, k), at(&b, k)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Keep only metric lines of steps <= `step` (a resumed run rewrites what follows).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    petal_io::write_atomic(path, kept.as_bytes())
}

#[cfg(test)]
#[path = "trainer_tests.rs"]
mod tests;
