//! AdamW with decoupled weight decay, exactly as torch.optim.AdamW (non-amsgrad), with state
//! that can be saved and restored bit for bit.

use candle_core::{Tensor, Var};
use petal_core::Result;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

pub struct AdamW {
    pub params: AdamWParams,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub t: usize,
    /// m and v of every parameter as two flat buffers after a step that had every gradient
    /// (`m[i]`, `v[i]` are then views into them); None after any other change of state
    flat: Option<(Tensor, Tensor)>,
    /// whether petal's CUDA AdamW kernel may take the update (the model's kernels)
    kernels: petal_ops::Kernels,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        // m and v each their own buffers: the CUDA kernel updates them in place, and a clone
        // would share one buffer between them (which once made every GPU step after the first
        // read v as m)
        let zeros = || {
            vars.iter()
                .map(|x| x.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        let (m, v) = (zeros()?, zeros()?);
        Ok(AdamW {
            params,
            vars,
            m,
            v,
            t: 0,
            flat: None,
            kernels: petal_ops::Kernels::default(),
        })
    }

    /// The update through `kernels` (a model's choice: petal's CUDA AdamW kernel where its
    /// family is on).
    pub fn with_kernels(mut self, kernels: petal_ops::Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// Moments to zero and the step count to 0, as a new optimizer over the same variables.
    pub fn reset(&mut self) -> Result<()> {
        for (m, v) in self.m.iter_mut().zip(self.v.iter_mut()) {
            *m = m.zeros_like()?;
            *v = v.zeros_like()?;
        }
        self.t = 0;
        self.flat = None;
        Ok(())
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// One update with gradients `grads[i]` for `vars[i]` (None: no gradient, skipped).
    /// With every gradient present and one dtype, all parameters update at once through flat
    /// buffers: a handful of operations instead of a dozen per parameter (on a GPU each is a
    /// kernel launch, and hundreds of small LoRA matrices made the update launch-bound). The
    /// arithmetic is the same, element for element.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let every = grads.len() == self.vars.len() && grads.iter().all(Option::is_some);
        if every && self.multi_ok() {
            return self.step_multi(grads, lr);
        }
        let one_dtype = self.vars.windows(2).all(|p| p[0].dtype() == p[1].dtype());
        if every && one_dtype && self.vars.len() > 1 {
            return self.step_flat(grads, lr);
        }
        self.flat = None;
        self.step_each(grads, lr)
    }

    /// Whether petal's CUDA AdamW kernel takes this step: f32 parameters and state on a GPU,
    /// the kernel switched on in this optimizer's kernels.
    fn multi_ok(&self) -> bool {
        let Some(first) = self.vars.first() else {
            return false;
        };
        let f32c = |t: &Tensor| t.dtype() == candle_core::DType::F32 && t.is_contiguous();
        petal_ops::cuda::usable(
            self.kernels,
            first.as_tensor(),
            petal_ops::cuda::Family::Adamw,
        ) && self.vars.iter().all(|v| f32c(v.as_tensor()))
            && self.m.iter().chain(&self.v).all(f32c)
    }

    /// Every parameter in one launch of the CUDA kernel, parameters and m, v in place.
    fn step_multi(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        let p = self.params;
        let step = petal_ops::cuda::AdamStep {
            lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
            bc1: 1.0 - p.beta1.powi(self.t as i32),
            bc2: 1.0 - p.beta2.powi(self.t as i32),
        };
        let w: Vec<Tensor> = self.vars.iter().map(|v| v.as_tensor().clone()).collect();
        let g = grads
            .iter()
            .flatten()
            .map(|g| g.detach().to_dtype(candle_core::DType::F32)?.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        petal_ops::cuda::adamw_step(&w, &g, &self.m, &self.v, step)?;
        self.flat = None;
        Ok(())
    }

    fn step_flat(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        let flat = |ts: Vec<Tensor>| -> candle_core::Result<Tensor> {
            let parts = ts
                .iter()
                .map(|t| t.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        };
        let g = flat(grads.iter().flatten().map(|g| g.detach()).collect())?;
        let w = flat(self.vars.iter().map(|v| v.as_tensor().detach()).collect())?;
        let (m, v) = match self.flat.take() {
            Some(mv) => mv,
            None => (flat(self.m.clone())?, flat(self.v.clone())?),
        };
        let w = (w * (1.0 - lr * p.weight_decay))?;
        let m = ((m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
        let v = ((v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
        let denom = ((&v / bc2)?.sqrt()? + p.eps)?;
        let upd = ((&m / bc1)? / denom)?;
        let w = (w - (upd * lr)?)?;
        let mut at = 0;
        for (i, var) in self.vars.iter().enumerate() {
            let n = var.elem_count();
            let part = |t: &Tensor| t.narrow(0, at, n)?.reshape(var.shape());
            var.set(&part(&w)?)?;
            self.m[i] = part(&m)?;
            self.v[i] = part(&v)?;
            at += n;
        }
        self.flat = Some((m, v));
        Ok(())
    }

    fn step_each(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let g = &g.detach(); // optimizer state must never hold a backprop graph
            let w = var.as_tensor();
            let w = (w * (1.0 - lr * p.weight_decay))?;
            self.m[i] = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            self.v[i] = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((&self.v[i] / bc2)?.sqrt()? + p.eps)?;
            let upd = ((&self.m[i] / bc1)? / denom)?;
            var.set(&(w - (upd * lr)?)?)?;
        }
        Ok(())
    }

    /// State as named tensors ("m.3", "v.3") plus the step count.
    pub fn state(&self) -> (HashMap<String, Tensor>, usize) {
        let mut s = HashMap::new();
        for i in 0..self.vars.len() {
            s.insert(format!("m.{i}"), self.m[i].clone());
            s.insert(format!("v.{i}"), self.v[i].clone());
        }
        (s, self.t)
    }

    pub fn load_state(&mut self, s: &HashMap<String, Tensor>, t: usize) -> Result<()> {
        for i in 0..self.vars.len() {
            let get = |k: String| {
                s.get(&k).cloned().ok_or_else(|| {
                    petal_core::Error::msg(format!(
                        "optimizer state lacks `{k}` (checkpoint of another adapter?)"
                    ))
                })
            };
            let (m, v) = (get(format!("m.{i}"))?, get(format!("v.{i}"))?);
            if m.dims() != self.vars[i].as_tensor().dims() {
                return Err(petal_core::Error::Shape {
                    tensor: format!("optimizer m.{i}"),
                    expected: self.vars[i].as_tensor().dims().to_vec(),
                    found: m.dims().to_vec(),
                });
            }
            self.m[i] = m;
            self.v[i] = v;
        }
        self.t = t;
        self.flat = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Whether two tensors are views of one buffer.
    fn same_buffer(a: &Tensor, b: &Tensor) -> bool {
        let (sa, _) = a.storage_and_layout();
        let (sb, _) = b.storage_and_layout();
        std::ptr::eq(&*sa, &*sb)
    }

    #[test]
    fn the_moments_are_buffers_of_their_own_as_the_in_place_cuda_update_needs() {
        let vars: Vec<Var> = (0..3)
            .map(|i| Var::new(&[i as f32, 1.0, -1.0], &Device::Cpu).unwrap())
            .collect();
        let mut opt = AdamW::new(vars.clone(), AdamWParams::default()).unwrap();
        let apart = |o: &AdamW| {
            let all: Vec<&Tensor> = o.m.iter().chain(&o.v).collect();
            all.iter().enumerate().all(|(i, a)| {
                all[i + 1..].iter().all(|b| !same_buffer(a, b))
                    && vars.iter().all(|w| !same_buffer(a, w.as_tensor()))
            })
        };
        assert!(apart(&opt), "after new");
        assert!(
            same_buffer(&opt.m[0], &opt.m[0].clone()),
            "the check sees a clone"
        );
        opt.reset().unwrap();
        assert!(apart(&opt), "after reset");
    }

    #[test]
    fn two_adamw_steps_match_a_hand_worked_computation() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let p = AdamWParams {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.5,
        };
        let mut opt = AdamW::new(vec![var.clone()], p).unwrap();
        let g = Tensor::new(&[0.5f32, 0.25], &Device::Cpu).unwrap();
        opt.step(&[Some(g.clone())], 0.1).unwrap();
        // step 1: w <- w (1 - lr wd); m = 0.1 g; v = 0.01 g^2; mhat = g, vhat = g^2
        // update = g / (|g| + eps) = sign(g) -> w = w*0.95 - 0.1
        let w1 = [1.0 * 0.95 - 0.1, -2.0 * 0.95 - 0.1];
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] - w1[0] as f32).abs() < 1e-6 && (got[1] - w1[1] as f32).abs() < 1e-6);
        let g2 = [1.0f64, -0.25];
        opt.step(
            &[Some(Tensor::new(&[1.0f32, -0.25], &Device::Cpu).unwrap())],
            0.1,
        )
        .unwrap();
        let g1 = [0.5f64, 0.25];
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            let m = 0.9 * 0.1 * g1[i] + 0.1 * g2[i];
            let v = 0.99 * 0.01 * g1[i] * g1[i] + 0.01 * g2[i] * g2[i];
            let (mh, vh) = (m / (1.0 - 0.81), v / (1.0 - 0.9801));
            let want = w1[i] * 0.95 - 0.1 * mh / (vh.sqrt() + 1e-8);
            assert!(
                (got[i] as f64 - want).abs() < 1e-5,
                "{i}: {} vs {want}",
                got[i]
            );
        }
    }

    #[test]
    fn the_flat_update_of_all_parameters_equals_per_parameter_updates_bit_for_bit() {
        let init = |seed| {
            [3usize, 5, 1]
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    Var::from_tensor(&petal_ops::testing::rand(&[n, 2], seed + i as u64)).unwrap()
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (init(1), init(1));
        let p = AdamWParams::default();
        let (mut fa, mut fb) = (
            AdamW::new(a.clone(), p).unwrap(),
            AdamW::new(b.clone(), p).unwrap(),
        );
        for step in 0..4u64 {
            let g: Vec<Option<Tensor>> = [3usize, 5, 1]
                .iter()
                .map(|&n| Some(petal_ops::testing::rand(&[n, 2], 10 * step + n as u64)))
                .collect();
            // step 2 lacks a gradient: the per-parameter path, then flat buffers rebuilt
            let g = if step == 2 {
                vec![g[0].clone(), None, g[2].clone()]
            } else {
                g
            };
            fa.step(&g, 0.01).unwrap();
            fb.step_each(&g, 0.01).unwrap();
            for (x, y) in a.iter().zip(&b) {
                let (x, y) = (
                    x.as_tensor().to_vec2::<f32>().unwrap(),
                    y.as_tensor().to_vec2::<f32>().unwrap(),
                );
                assert_eq!(x, y, "step {step}");
            }
        }
        assert!(
            fa.flat.is_some(),
            "the last step went through the flat buffers"
        );
        let (sa, sb) = (fa.state().0, fb.state().0);
        for (k, t) in &sa {
            assert_eq!(
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                sb[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{k}"
            );
        }
    }
}
