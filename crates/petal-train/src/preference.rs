//! Multi-objective training steps (PaLoRA): each micro-batch's examples are grouped by task,
//! and for each preference ray ω of the step (set on the model by the method's hook) the loss
//! `Σ_k ω_k L_k` is taken forward and backward, L_k being the token-mean loss of task k's
//! examples over the step's micro-batches. The gradients of the rays add up (the official
//! trainer's sum over its window); the reported loss is their mean.

use crate::objective::Objective;
use crate::trainer::{accumulate, micro_examples, micro_seed, tokens_of, TrainConfig};
use candle_core::{Tensor, Var};
use petal_core::{rng, Error, Rays, Result, TrainingHook};
use petal_data::Example;

/// One step under `rays`: the mean over the rays of `Σ_k ω_k L_k`, the gradients of `vars`,
/// and the tokens read.
pub(crate) fn step(
    obj: &dyn Objective,
    hook: &dyn TrainingHook,
    rays: &Rays,
    train_set: &[Example],
    cfg: &TrainConfig,
    step: usize,
    vars: &[Var],
) -> Result<(f64, Vec<Option<Tensor>>, usize)> {
    let k = rays.tasks.len();
    // (micro-batch, task, its examples of that micro-batch)
    let mut parts: Vec<(usize, usize, Vec<Example>)> = Vec::new();
    for j in 0..cfg.grad_accum {
        let examples = micro_examples(train_set, cfg, step * cfg.grad_accum + j);
        let mut by_task: Vec<Vec<Example>> = vec![Vec::new(); k];
        for e in examples {
            let i = task_index(&rays.tasks, e.task.as_deref())?;
            by_task[i].push(e);
        }
        parts.extend(
            by_task
                .into_iter()
                .enumerate()
                .filter(|(_, g)| !g.is_empty())
                .map(|(i, g)| (j, i, g)),
        );
    }
    let mut task_units = vec![0usize; k];
    for (_, i, g) in &parts {
        task_units[*i] += obj.units(g);
    }
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut loss = 0f64;
    for (r, ray) in rays.rays.iter().enumerate() {
        hook.set_ray(obj.model(), ray)?;
        for (j, i, g) in &parts {
            let (w, n) = (ray[*i], task_units[*i]);
            if w == 0.0 || n == 0 {
                continue;
            }
            let seed = rng::splitmix(micro_seed(cfg, step, *j) ^ r as u64);
            let (sum, gr) = obj.backward(g, n as f64 / w, seed)?;
            loss += w * sum / n as f64;
            accumulate(&mut grads, vars, &gr)?;
        }
    }
    let tokens = parts.iter().map(|(_, _, g)| tokens_of(g)).sum();
    Ok((loss / rays.rays.len().max(1) as f64, grads, tokens))
}

/// The index of an example's task in the adapter's task list.
fn task_index(tasks: &[String], task: Option<&str>) -> Result<usize> {
    let Some(t) = task else {
        return Err(Error::msg(format!(
            "multi-objective training needs a `task` on every example (the adapter's tasks: {})",
            tasks.join(", ")
        )));
    };
    tasks.iter().position(|x| x == t).ok_or_else(|| {
        Error::msg(format!(
            "the training data's task {t:?} is not one of the adapter's `tasks` ({})",
            tasks.join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::batch_loss;
    use petal_core::config::Targets;
    use petal_core::{inject_adapter, AdapterConfig, Ctx};
    use petal_data::batches;

    /// The step's gradients equal those of `Σ_rays Σ_k ω_k L_k` written out: each task's
    /// examples of the step in one batch, its summed loss over its tokens, one backward.
    #[test]
    fn a_step_takes_the_gradient_of_the_preference_weighted_task_losses_summed_over_rays() {
        let mut m = crate::test_support::golden_llama();
        let targets = Targets::List(vec!["q_proj".into(), "v_proj".into()]);
        let mut c = AdapterConfig::for_method("palora", 2, 4.0, targets);
        c.set("tasks", ["a", "b"]).unwrap();
        c.set("init_weights", false).unwrap();
        inject_adapter(&mut m, "default", &c, 5).unwrap();
        // task a: 10 tokens, task b: 16, in no particular order
        let data: Vec<Example> = (0..8u32)
            .map(|i| {
                let n = if i % 3 == 0 { 10 } else { 16 };
                let ids: Vec<u32> = (0..n).map(|j| (i * 31 + j * 7) % 96).collect();
                Example {
                    labels: ids.iter().map(|&x| x as i64).collect(),
                    ids,
                    task: Some(if i % 3 == 0 { "a" } else { "b" }.to_string()),
                }
            })
            .collect();
        let cfg = TrainConfig {
            max_steps: 4,
            batch_size: 3,
            grad_accum: 2,
            seed: 2,
            ..crate::test_support::plain_config(std::env::temp_dir())
        };
        let vars = petal_core::inject::adapter_vars(&m, "default");
        let hook = c
            .method()
            .unwrap()
            .training(&m, "default", &c)
            .unwrap()
            .unwrap();
        let rays = Rays {
            tasks: vec!["a".into(), "b".into()],
            rays: vec![vec![0.3, 0.7], vec![0.9, 0.1]],
        };
        let lm = crate::objective::LmObjective {
            model: &m,
            pad: 0,
            checkpointing: false,
        };
        let (loss, grads, _) = step(&lm, hook.as_ref(), &rays, &data, &cfg, 1, &vars).unwrap();

        let chosen: Vec<Example> = (2..4)
            .flat_map(|k| micro_examples(&data, &cfg, k))
            .collect();
        let mut total: Option<Tensor> = None;
        for ray in &rays.rays {
            petal_core::methods::palora::set_preference(&m, Some("default"), ray).unwrap();
            for (i, t) in ["a", "b"].iter().enumerate() {
                let group: Vec<Example> = chosen
                    .iter()
                    .filter(|e| e.task.as_deref() == Some(*t))
                    .cloned()
                    .collect();
                let b = batches(&group, group.len(), 0).remove(0);
                let (sum, n) = batch_loss(&m, &b, &Ctx::train(0)).unwrap();
                let term = (sum * (ray[i] / n as f64)).unwrap();
                total = Some(match total {
                    Some(acc) => (acc + term).unwrap(),
                    None => term,
                });
            }
        }
        let total = total.unwrap();
        let want = total.to_scalar::<f32>().unwrap() as f64 / 2.0;
        assert!((loss - want).abs() < 1e-5 * want, "loss {loss} vs {want}");
        let g = total.backward().unwrap();
        for (v, got) in vars.iter().zip(&grads) {
            let want = g.get(v.as_tensor()).unwrap();
            let e = petal_ops::testing::max_rel(got.as_ref().unwrap(), want);
            assert!(e < 1e-4, "gradient {e:e}");
        }
        // a task outside the adapter's list is refused naming it
        let mut other = data.clone();
        for e in other.iter_mut().filter(|e| e.task.as_deref() == Some("b")) {
            e.task = Some("c".into());
        }
        let e = step(&lm, hook.as_ref(), &rays, &other, &cfg, 0, &vars)
            .unwrap_err()
            .to_string();
        assert!(e.contains("task \"c\" is not one of"), "{e}");
    }
}
