//! AdaLoRA's training: PEFT's `RankAllocator` (importance tracking and rank masking after every
//! optimizer step), the orthogonal regulariser, and the saved form cut to the kept ranks, run by
//! the trainer through `TrainingHook`.

use super::{AdaLoraLayer, AdaLoraOptions};
use crate::config::{AdapterConfig, RankValue};
use crate::Result;
use candle_core::{DType, Tensor, Var};

/// PEFT's `RankAllocator` and the model-level `update_and_allocate`, over adapter `name`:
/// importance EMAs per parameter entry, triplet scores, and the masks of the kept ranks.
#[derive(Debug)]
pub struct RankAllocator {
    name: String,
    beta1: f64,
    beta2: f64,
    tinit: usize,
    tfinal: usize,
    delta_t: usize,
    total_step: usize,
    init_bgt: usize,
    target_bgt: usize,
    layers: Vec<Tracked>,
    /// The masks PEFT writes as `rank_pattern` (None until the first masking step).
    masks: Option<Vec<Vec<bool>>>,
}

#[derive(Debug)]
struct Tracked {
    path: String,
    /// EMA of |p grad| and of its deviation, for A, B and E, as host vectors.
    ipt: [Vec<f32>; 3],
    unc: [Vec<f32>; 3],
}

/// The AdaLoRA layers of adapter `name`, with their module paths.
fn layers<'a>(model: &'a dyn crate::Adaptable, name: &str) -> Vec<(String, &'a AdaLoraLayer)> {
    model
        .linears()
        .into_iter()
        .filter_map(|l| {
            let a = l.layer(name)?.as_any()?.downcast_ref::<AdaLoraLayer>()?;
            Some((l.path().to_string(), a))
        })
        .collect()
}

/// `w` (`orth_reg_weight`) times the mean over all A and B of `||A A^T - I||_F`,
/// `||B^T B - I||_F` (PEFT adds it to every forward's loss); None when the adapter is not
/// AdaLoRA or w is 0.
pub fn orth_regulariser(
    model: &dyn crate::Adaptable,
    name: &str,
    w: f64,
) -> Result<Option<Tensor>> {
    let ls = layers(model, name);
    if ls.is_empty() || w == 0.0 {
        return Ok(None);
    }
    let mut total: Option<Tensor> = None;
    let mut n = 0usize;
    for (_, l) in ls.iter().filter(|(_, l)| l.rank() > 0) {
        let a = l.a.as_tensor();
        let b = l.b.as_tensor();
        for cov in [a.matmul(&a.t()?)?, b.t()?.matmul(b)?] {
            let eye = Tensor::eye(cov.dim(0)?, DType::F32, cov.device())?;
            let f = (cov - eye)?.sqr()?.sum_all()?.sqrt()?;
            total = Some(match total {
                Some(t) => (t + f)?,
                None => f,
            });
            n += 1;
        }
    }
    Ok(total.map(|t| t * (w / n.max(1) as f64)).transpose()?)
}

impl RankAllocator {
    /// An allocator when adapter `name` is AdaLoRA (`total_step` is required, as in PEFT).
    pub fn new(
        model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
    ) -> Result<Option<Self>> {
        let ls = layers(model, name);
        if ls.is_empty() {
            return Ok(None);
        }
        let o: AdaLoraOptions = cfg.options()?;
        let total_step = o.total_step.filter(|&t| t > 0).ok_or_else(|| {
            crate::Error::config(
                "adapter config",
                "total_step",
                "AdaLoRA needs the total number of steps",
            )
        })?;
        let (tinit, tfinal) = (o.tinit, o.tfinal);
        if tinit + tfinal >= total_step {
            return Err(crate::Error::config(
                "adapter config",
                "tinit / tfinal",
                format!("tinit ({tinit}) + tfinal ({tfinal}) must leave steps of total_step ({total_step}) to allocate in"),
            ));
        }
        let init_bgt = ls.iter().map(|(_, l)| l.rank()).sum();
        let mut layers = Vec::new();
        for (path, l) in &ls {
            let sizes = [l.a.as_tensor(), l.b.as_tensor(), l.e.as_tensor()].map(|t| t.elem_count());
            layers.push(Tracked {
                path: path.clone(),
                ipt: sizes.map(|n| vec![0f32; n]),
                unc: sizes.map(|n| vec![0f32; n]),
            });
        }
        Ok(Some(RankAllocator {
            name: name.to_string(),
            beta1: o.beta1,
            beta2: o.beta2,
            tinit,
            tfinal,
            delta_t: o.delta_t.max(1),
            total_step,
            init_bgt,
            target_bgt: o.target_r * ls.len(),
            layers,
            masks: None,
        }))
    }

    /// PEFT's `budget_schedule`: (budget, whether to mask at this step).
    pub fn budget(&self, step: usize) -> (usize, bool) {
        if step <= self.tinit {
            (self.init_bgt, false)
        } else if step > self.total_step - self.tfinal {
            (self.target_bgt, true)
        } else {
            let span = (self.total_step - self.tfinal - self.tinit) as f64;
            let mul = 1.0 - (step - self.tinit) as f64 / span;
            let b = (self.init_bgt as f64 - self.target_bgt as f64) * mul.powi(3)
                + self.target_bgt as f64;
            (b as usize, step % self.delta_t == 0)
        }
    }

    /// After the optimizer step of `step` (0-based), with the step's (clipped) gradients:
    /// PEFT's `AdaLoraModel.update_and_allocate(step)`.
    pub fn update(
        &mut self,
        model: &dyn crate::Adaptable,
        step: usize,
        grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        let edge = self.total_step - self.tfinal;
        if step < edge {
            self.update_importance(model, grad_of)?;
            let (budget, mask) = self.budget(step);
            if mask {
                self.mask_to_budget(model, budget)?;
            }
        } else if step == edge {
            let (budget, _) = self.budget(step);
            self.mask_to_budget(model, budget)?;
            for t in &mut self.layers {
                t.ipt
                    .iter_mut()
                    .chain(t.unc.iter_mut())
                    .for_each(|v| v.fill(0.0));
            }
        } else {
            self.apply_masks(model)?;
        }
        Ok(())
    }

    fn update_importance(
        &mut self,
        model: &dyn crate::Adaptable,
        grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        let ls = layers(model, &self.name);
        for (t, (_, l)) in self.layers.iter_mut().zip(ls) {
            for (k, var) in [&l.a, &l.b, &l.e].into_iter().enumerate() {
                let Some(g) = grad_of(var) else { continue };
                let p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
                for i in 0..p.len() {
                    let ipt = (p[i] * g[i]).abs();
                    t.ipt[k][i] = b1 * t.ipt[k][i] + (1.0 - b1) * ipt;
                    t.unc[k][i] = b2 * t.unc[k][i] + (1.0 - b2) * (ipt - t.ipt[k][i]).abs();
                }
            }
        }
        Ok(())
    }

    /// Triplet scores per layer: score(E_i) + mean over row i of A + mean over column i of B.
    fn scores(&self, model: &dyn crate::Adaptable) -> Result<Vec<Vec<f32>>> {
        let ls = layers(model, &self.name);
        let mut out = Vec::new();
        for (t, (_, l)) in self.layers.iter().zip(ls) {
            let r = l.rank();
            let (inp, outf) = (l.a.as_tensor().dim(1)?, l.b.as_tensor().dim(0)?);
            let s = |k: usize, i: usize| t.ipt[k][i] * t.unc[k][i];
            let v = (0..r)
                .map(|i| {
                    let a = (0..inp).map(|j| s(0, i * inp + j)).sum::<f32>() / inp as f32;
                    let b = (0..outf).map(|j| s(1, j * r + i)).sum::<f32>() / outf as f32;
                    s(2, i) + (a + b)
                })
                .collect();
            out.push(v);
        }
        Ok(out)
    }

    /// Zero the singular values of the `init_bgt - budget` least important triplets.
    fn mask_to_budget(&mut self, model: &dyn crate::Adaptable, budget: usize) -> Result<()> {
        let scores = self.scores(model)?;
        let k = self.init_bgt.saturating_sub(budget);
        let threshold = if k == 0 {
            f32::NEG_INFINITY
        } else {
            let mut all: Vec<f32> = scores.iter().flatten().copied().collect();
            all.sort_by(f32::total_cmp);
            all[k - 1] // torch.kthvalue: the k-th smallest
        };
        self.masks = Some(
            scores
                .iter()
                .map(|v| v.iter().map(|&s| s > threshold).collect())
                .collect(),
        );
        self.apply_masks(model)
    }

    fn apply_masks(&self, model: &dyn crate::Adaptable) -> Result<()> {
        let Some(masks) = &self.masks else {
            return Ok(());
        };
        for ((_, l), m) in layers(model, &self.name).into_iter().zip(masks) {
            let keep: Vec<f32> = m.iter().map(|&k| k as u8 as f32).collect();
            let keep = Tensor::from_vec(keep, (m.len(), 1), l.e.as_tensor().device())?;
            l.e.set(&l.e.as_tensor().mul(&keep)?)?;
        }
        Ok(())
    }

    /// The masks as PEFT's `rank_pattern` (`<module>.lora_E` -> kept flags), if any were made.
    pub fn rank_pattern(&self) -> Option<std::collections::BTreeMap<String, RankValue>> {
        let masks = self.masks.as_ref()?;
        Some(
            self.layers
                .iter()
                .zip(masks)
                .map(|(t, m)| (format!("{}.lora_E", t.path), RankValue::Mask(m.clone())))
                .collect(),
        )
    }

    /// Cut saved tensors (`<module>.lora_A/B/E`) to the kept ranks, as PEFT saves them.
    pub fn cut(&self, tensors: &mut std::collections::HashMap<String, Tensor>) -> Result<()> {
        let Some(masks) = &self.masks else {
            return Ok(());
        };
        for (t, m) in self.layers.iter().zip(masks) {
            let idx: Vec<u32> = (0..m.len() as u32).filter(|&i| m[i as usize]).collect();
            for (suffix, dim) in [("lora_A", 0), ("lora_E", 0), ("lora_B", 1)] {
                let key = format!("{}.{suffix}", t.path);
                if let Some(x) = tensors.get(&key) {
                    let cut = if idx.is_empty() {
                        let mut dims = x.dims().to_vec();
                        dims[dim] = 0;
                        Tensor::zeros(dims, x.dtype(), x.device())?
                    } else {
                        x.index_select(&Tensor::new(idx.as_slice(), x.device())?, dim)?
                    };
                    tensors.insert(key, cut);
                }
            }
        }
        Ok(())
    }

    /// Allocator state for a checkpoint (keys `adalora.<i>.<what>`), so a resumed run goes on
    /// exactly.
    pub fn state(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        let dev = candle_core::Device::Cpu;
        let mut s = std::collections::HashMap::new();
        for (i, t) in self.layers.iter().enumerate() {
            for k in 0..3 {
                s.insert(
                    format!("adalora.{i}.ipt{k}"),
                    Tensor::new(t.ipt[k].as_slice(), &dev)?,
                );
                s.insert(
                    format!("adalora.{i}.unc{k}"),
                    Tensor::new(t.unc[k].as_slice(), &dev)?,
                );
            }
            if let Some(m) = self.masks.as_ref().map(|m| &m[i]) {
                let v: Vec<f32> = m.iter().map(|&k| k as u8 as f32).collect();
                s.insert(
                    format!("adalora.{i}.mask"),
                    Tensor::new(v.as_slice(), &dev)?,
                );
            }
        }
        Ok(s)
    }

    pub fn load_state(&mut self, s: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let mut masks = Vec::new();
        for (i, t) in self.layers.iter_mut().enumerate() {
            for k in 0..3 {
                for (what, dst) in [("ipt", &mut t.ipt[k]), ("unc", &mut t.unc[k])] {
                    let key = format!("adalora.{i}.{what}{k}");
                    let v = s
                        .get(&key)
                        .ok_or_else(|| crate::Error::msg(format!("checkpoint lacks `{key}`")))?
                        .to_vec1::<f32>()?;
                    *dst = v;
                }
            }
            if let Some(m) = s.get(&format!("adalora.{i}.mask")) {
                masks.push(m.to_vec1::<f32>()?.iter().map(|&v| v > 0.5).collect());
            }
        }
        self.masks = (masks.len() == self.layers.len()).then_some(masks);
        Ok(())
    }
}

/// The trainer's view of AdaLoRA: the regulariser in every loss, the allocator after every
/// step, its state in checkpoints, and the saved form cut to the kept ranks.
pub(super) struct AdaLoraTraining {
    pub alloc: RankAllocator,
    pub name: String,
    pub orth_reg_weight: f64,
}

impl crate::TrainingHook for AdaLoraTraining {
    fn regulariser(&self, model: &dyn crate::Adaptable) -> Result<Option<Tensor>> {
        // PEFT adds the orthogonal regulariser to every forward's loss
        orth_regulariser(model, &self.name, self.orth_reg_weight)
    }

    fn after_step(
        &mut self,
        model: &dyn crate::Adaptable,
        step: usize,
        grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        self.alloc.update(model, step, grad_of)
    }

    fn state(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        self.alloc.state()
    }

    fn load_state(&mut self, s: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        self.alloc.load_state(s)
    }

    fn export(
        &self,
        cfg: &mut AdapterConfig,
        tensors: &mut std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        // saved as PEFT saves it: cut to the kept ranks, the masks as `rank_pattern`
        self.alloc.cut(tensors)?;
        if let Some(p) = self.alloc.rank_pattern() {
            cfg.set("rank_pattern", p)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{golden_fixture, Toy};
    use std::collections::HashMap;

    /// PEFT's `RankAllocator` over the toy (tools/golden/make_adalora_allocator.py): the same
    /// start, moves and gradients each step give the same E after each step's allocation
    /// (masked triplets zero) and the same rank pattern; the regulariser equals PEFT's.
    #[test]
    fn importance_masks_and_regulariser_equal_peft_step_by_step() {
        let g = golden_fixture("adalora_allocator");
        let mut c = AdapterConfig::for_method("ADALORA", 4, 8.0, crate::testing::toy_targets());
        for (k, v) in [("init_r", 4), ("target_r", 2), ("tinit", 1), ("tfinal", 3)] {
            c.set(k, v).unwrap();
        }
        c.set("deltaT", 2).unwrap();
        c.set("total_step", 12).unwrap();
        c.set("beta1", 0.85).unwrap();
        c.set("beta2", 0.9).unwrap();
        let mut t = Toy::new();
        crate::inject_adapter(&mut t, "default", &c, 0).unwrap();
        let ls = layers(&t, "default");
        // PEFT's names of A, B and E, in the allocator's order
        const NAMES: [&str; 3] = ["lora_A", "lora_B", "lora_E"];
        let parts = |l: &AdaLoraLayer| {
            [
                (NAMES[0], l.a.clone()),
                (NAMES[1], l.b.clone()),
                (NAMES[2], l.e.clone()),
            ]
        };
        for (path, l) in &ls {
            for (part, v) in parts(l) {
                v.set(&g[&format!("init.{path}.{part}")]).unwrap();
            }
        }
        let reg = orth_regulariser(&t, "default", 0.3).unwrap().unwrap();
        let (got, want) = (
            reg.to_scalar::<f32>().unwrap(),
            g["orth_reg"].to_vec1::<f32>().unwrap()[0],
        );
        assert!(
            (got - want).abs() < 1e-5 * want,
            "regulariser {got} vs PEFT {want}"
        );

        let mut alloc = RankAllocator::new(&t, "default", &c).unwrap().unwrap();
        let mut masked_steps = 0;
        for step in 0..12 {
            let mut grads: HashMap<candle_core::TensorId, Tensor> = HashMap::new();
            for (path, l) in &ls {
                for (part, v) in parts(l) {
                    let moved =
                        (v.as_tensor() + &g[&format!("move.{step}.{path}.{part}")]).unwrap();
                    v.set(&moved).unwrap();
                    grads.insert(
                        v.as_tensor().id(),
                        g[&format!("grad.{step}.{path}.{part}")].clone(),
                    );
                }
            }
            alloc
                .update(&t, step, &|v: &Var| grads.get(&v.as_tensor().id()).cloned())
                .unwrap();
            for (path, l) in &ls {
                for (part, v) in parts(l) {
                    let want = &g[&format!("after.{step}.{path}.{part}")];
                    let err = crate::testing::max_rel(v.as_tensor(), want);
                    assert!(err < 1e-6, "step {step}: {path}.{part} off by {err:e}");
                }
            }
            // the importance EMAs, until PEFT resets them after the final allocation
            for ((path, _), tr) in ls.iter().zip(&alloc.layers) {
                for (k, part) in NAMES.iter().enumerate() {
                    for (what, got) in [("ipt", &tr.ipt[k]), ("unc", &tr.unc[k])] {
                        let key = format!("{what}.{step}.{path}.{part}");
                        let Some(want) = g.get(&key) else {
                            assert!(got.iter().all(|&x| x == 0.0), "{key}: not reset");
                            continue;
                        };
                        let got = Tensor::from_slice(got, want.shape(), want.device()).unwrap();
                        let err = crate::testing::max_rel(&got, want);
                        assert!(err < 1e-5, "{key} off by {err:e}");
                    }
                }
            }
            let pattern = alloc.rank_pattern();
            for (i, (path, _)) in ls.iter().enumerate() {
                let want = g.get(&format!("mask.{step}.{path}"));
                let got = alloc.masks.as_ref().map(|m| m[i].clone());
                match (want, got) {
                    (Some(w), Some(got)) => {
                        let w: Vec<bool> = w
                            .to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .map(|&x| x > 0.5)
                            .collect();
                        assert_eq!(got, w, "step {step}: {path}'s kept ranks");
                        let key = format!("{path}.lora_E");
                        assert!(
                            matches!(&pattern.as_ref().unwrap()[&key], RankValue::Mask(m) if *m == w)
                        );
                        masked_steps += 1;
                    }
                    (None, None) => {}
                    (w, got) => panic!("step {step}: PEFT's pattern {w:?}, petal's {got:?}"),
                }
            }
        }
        // the fixture's patterns exist from step 2 on (both modules each step: 20 checks) and
        // change at steps 4 and 8
        assert_eq!(masked_steps, 20);
    }
}
