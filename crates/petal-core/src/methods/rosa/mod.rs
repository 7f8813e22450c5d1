//! RoSA, robust adaptation (Nikdan et al., ICML 2024, arXiv 2401.04679, "RoSA: Accurate
//! Parameter-Efficient Fine-Tuning via Robust Adaptation"; official code IST-DASLab/peft-rosa):
//! LoRA plus a sparse update S with a fixed mask.
//!
//! `y = x W^T + b + s B A dropout(x) + x S^T`, `s = alpha / r` (or `alpha / sqrt(r)`), the
//! sparse term not scaled. S holds `k = int(d out in)` values (zero at init) at positions chosen
//! once: the schedule `wlN` trains LoRA alone for N steps (the paper's `wl64`), then for
//! `spa_num_grads` steps (LoRA still training) accumulates the mean of the squared full-weight
//! gradient `G = dy^T x` of each module (captured in backward: W is never a variable), takes its
//! top k per module as the mask, and from then on trains LoRA and S's values. The sparse product
//! and its gradient never build S or a dense dW (`petal_ops::sparse::sparse_delta`: SpMM forward,
//! SDDMM for the values). Mergeable: `s B A + S`. petal's own adapter `peft_type: "ROSA"` with
//! the official names: `rosa_A.weight`, `rosa_B.weight`, `rosa_spa.values`, and S's mask as CSR
//! buffers `rosa_spa.row_offs` (out + 1) and `rosa_spa.col_idx` (k), int64 (the official int32
//! and int16).

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, NewAdapter, TrainingHook,
    WeightUpdate,
};
use crate::config::{spec, AdapterConfig, Spec};
use crate::methods::grad_mask::{top_k, GradSquares};
use crate::methods::lora::{dropout, LoraCore};
use crate::methods::{alpha_for, kaiming_uniform, rank_for};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

pub struct Rosa;

crate::method_options! {
    /// RoSA's options (the official `RosaConfig` keys petal implements).
    pub struct RosaOptions {
        flatten core: LoraCore;
        /// Scale by alpha / sqrt(r)
        pub rslora as "use_rslora": bool = false,
        /// Alphas per module
        pub alpha_pattern: std::collections::BTreeMap<String, f64> = Default::default(),
        /// Density of the sparse part per module, in (0, 1]: k = int(d out in) values
        pub d: f64 = 0.003,
        /// When the mask is chosen: wlN = LoRA alone for N steps, then gradients are collected (default, spa_only: wl0)
        pub schedule: String = "wl64".into(),
        /// Steps whose squared gradients choose the mask
        pub spa_num_grads: usize = 1,
        /// How gradients accumulate: mean_squared (the diagonal empirical Fisher)
        pub grad_acc_mode: String = "mean_squared".into(),
    }
}

/// The LoRA-only warm-up of a schedule: `wlN` -> N (`default` = `wl0`).
fn warmup(schedule: &str) -> Option<usize> {
    match schedule {
        "default" | "spa_only" => Some(0),
        s => s.strip_prefix("wl")?.parse().ok(),
    }
}

/// The phases of a RoSA layer.
const WARMUP: u8 = 0;
const COLLECT: u8 = 1;
const SPARSE: u8 = 2;

fn values_for(d: f64, out: usize, inp: usize) -> usize {
    (d * (out * inp) as f64) as usize
}

impl AdapterMethod for Rosa {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // RoSA adds its low-rank and sparse terms to the base output; W is never read
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[("schedule", "\"wl0\"")])
    }

    fn peft_type(&self) -> &'static str {
        "ROSA"
    }

    fn options(&self) -> Spec {
        spec::<RosaOptions>()
    }

    fn writes_layer_selection(&self) -> bool {
        true
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: RosaOptions = cfg.options()?;
        o.core.check(&["none"], |_| false)?;
        if !(o.d > 0.0 && o.d <= 1.0) {
            return Err(Error::config(
                "adapter config",
                "d",
                format!("{} is out of range: the density must be in (0, 1]", o.d),
            ));
        }
        if warmup(&o.schedule).is_none() {
            return Err(Error::config(
                "adapter config",
                "schedule",
                format!(
                    "{:?} is not a schedule petal knows: wlN (LoRA alone for N steps, then the \
                     mask; the paper's wl64), default or spa_only (wl0)",
                    o.schedule
                ),
            ));
        }
        if o.spa_num_grads == 0 {
            return Err(Error::config(
                "adapter config",
                "spa_num_grads",
                "0 is out of range: the mask needs at least 1 step of gradients",
            ));
        }
        if o.grad_acc_mode != "mean_squared" {
            return Err(crate::config::unsupported(
                "grad_acc_mode",
                format!("{:?}", o.grad_acc_mode),
            ));
        }
        Ok(())
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        let o: RosaOptions = cfg.options()?;
        let need = warmup(&o.schedule).unwrap_or(0) + o.spa_num_grads;
        if new.max_steps <= need {
            return Err(Error::config(
                "adapter config",
                "schedule",
                format!(
                    "{} with spa_num_grads {} chooses the mask after step {need}, but the run \
                     has {} steps (give a shorter warm-up, e.g. --set schedule=wl{}, or more \
                     steps)",
                    o.schedule,
                    o.spa_num_grads,
                    new.max_steps,
                    new.max_steps / 4
                ),
            ));
        }
        Ok(())
    }

    fn layer_values(&self, cfg: &AdapterConfig, path: &str, dims: &ModuleDims) -> Result<u64> {
        // LoRA, S's values and columns, its row offsets, and the squared-gradient accumulator
        let o: RosaOptions = cfg.options()?;
        let r = rank_for(o.core.r, &o.core.rank_pattern, path);
        let k = values_for(o.d, dims.out, dims.inp) as u64;
        Ok(dims.low_rank(r) + 2 * k + dims.out as u64 + 1 + dims.full())
    }

    fn training(
        &self,
        model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
    ) -> Result<Option<Box<dyn TrainingHook>>> {
        let o: RosaOptions = cfg.options()?;
        let layers = model
            .linears()
            .into_iter()
            .filter_map(|l| l.layer(name)?.as_any()?.downcast_ref::<RosaLayer>())
            .map(RosaLayer::handle)
            .collect();
        Ok(Some(Box::new(RosaTraining {
            layers,
            warmup: warmup(&o.schedule).unwrap_or(0),
            grads: o.spa_num_grads,
        })))
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: RosaOptions = cfg.options()?;
        let r = rank_for(o.core.r, &o.core.rank_pattern, path);
        let alpha = alpha_for(o.core.alpha, &o.alpha_pattern, path);
        let (out, inp) = (base.out_features, base.in_features);
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        // r = 0: the sparse part alone (the paper's SpA); A and B are then placeholders
        let a = Var::from_tensor(&kaiming_uniform((r.max(1), inp), &mut g, dev)?)?;
        let nonzero = crate::methods::init_nonzero(&o.core.init);
        let b = crate::methods::param((out, r.max(1)), !nonzero || r == 0, &mut g, dev)?;
        let k = values_for(o.d, out, inp);
        let first = if warmup(&o.schedule) == Some(0) {
            COLLECT
        } else {
            WARMUP
        };
        let layer = RosaLayer {
            a,
            b,
            lora: r > 0,
            scale: if o.rslora {
                alpha / (r as f64).sqrt()
            } else {
                alpha / r as f64
            },
            dropout: o.core.dropout,
            values: Var::zeros(k, DType::F32, dev)?,
            row_offs: Var::zeros(out + 1, DType::I64, dev)?,
            col_idx: Var::zeros(k, DType::I64, dev)?,
            phase: Arc::new(AtomicU8::new(first)),
            grads: Arc::default(),
            positions: Arc::default(),
            out,
            inp,
        };
        if nonzero {
            // the testing switch also gives S a random mask and random values, so the checks
            // that start from a non-zero adapter exercise the sparse part
            let mut flat: Vec<i64> = (0..(out * inp) as i64).collect();
            rand::seq::SliceRandom::shuffle(flat.as_mut_slice(), &mut g);
            flat.truncate(k);
            flat.sort_unstable();
            let handle = layer.handle();
            handle.set(&flat)?;
            layer
                .values
                .set(&crate::methods::normal((1, k), 0.5, &mut g, dev)?.reshape(k)?)?;
            layer.phase.store(SPARSE, Ordering::Relaxed);
        }
        Ok(Box::new(layer))
    }
}

#[derive(Debug)]
struct RosaLayer {
    a: Var, // (r, in)
    b: Var, // (out, r)
    /// r > 0 (else S alone)
    lora: bool,
    scale: f64,
    dropout: f64,
    values: Var,   // (k,)
    row_offs: Var, // (out + 1,) int64: S's mask as CSR, all zero until it is chosen
    col_idx: Var,  // (k,) int64
    phase: Arc<AtomicU8>,
    grads: Arc<GradSquares>,
    /// S's flat positions, derived from the CSR buffers
    positions: Arc<Mutex<Option<Tensor>>>,
    out: usize,
    inp: usize,
}

impl RosaLayer {
    /// S's flat positions (row * in + col) in CSR order, once its mask is chosen.
    /// Built from the CSR buffers once per mask (a new mask or a load clears the cache).
    fn positions(&self) -> Result<Option<Tensor>> {
        if self.phase.load(Ordering::Relaxed) != SPARSE || self.values.elem_count() == 0 {
            return Ok(None);
        }
        let mut cached = self.positions.lock().expect("rosa positions");
        if let Some(p) = cached.as_ref() {
            return Ok(Some(p.clone()));
        }
        let offs = self.row_offs.as_tensor().to_vec1::<i64>()?;
        let cols = self.col_idx.as_tensor().to_vec1::<i64>()?;
        let mut flat = Vec::with_capacity(cols.len());
        for r in 0..self.out {
            for &c in &cols[offs[r] as usize..offs[r + 1] as usize] {
                flat.push(r as i64 * self.inp as i64 + c);
            }
        }
        let pos = Tensor::from_vec(flat, cols.len(), self.values.device())?;
        *cached = Some(pos.clone());
        Ok(Some(pos))
    }

    /// `+ x S^T` where S exists, then the gradient capture while the mask is being chosen.
    fn finish(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        let mut y = y;
        if let Some(pos) = self.positions()? {
            let s = petal_ops::sparse::sparse_delta(
                ctx.kernels(),
                x,
                self.values.as_tensor(),
                &pos,
                self.out,
            )?;
            let s = s.to_dtype(y.dtype())?;
            y = (y + s)?;
        }
        if ctx.is_train() && self.phase.load(Ordering::Relaxed) == COLLECT {
            y = self.grads.capture(x, y, &self.values, false)?;
        }
        Ok(y)
    }

    fn handle(&self) -> MaskHandle {
        MaskHandle {
            row_offs: self.row_offs.clone(),
            col_idx: self.col_idx.clone(),
            positions: self.positions.clone(),
            phase: self.phase.clone(),
            grads: self.grads.clone(),
            k: self.values.elem_count(),
            inp: self.inp,
        }
    }
}

impl AdapterLayer for RosaLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        if !self.lora {
            return self.finish(x, y, ctx);
        }
        let x2 = crate::methods::flat_input(x)?;
        let xd = if self.dropout > 0.0 && ctx.is_train() {
            dropout(&x2, self.dropout, ctx)?
        } else {
            x2
        };
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        let d = crate::methods::low_rank(&xd, a, b, self.scale)?;
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        self.finish(x, (y + d)?, ctx)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        if self.dropout > 0.0 && ctx.is_train() {
            return None;
        }
        let run = || -> Result<Tensor> {
            let (a, bm) = (self.a.as_tensor(), self.b.as_tensor());
            let y = match self.lora {
                true => petal_ops::lora(ctx.kernels(), x, w, b, a, bm, self.scale)?,
                false => petal_ops::frozen_linear(ctx.kernels(), x, w, b)?,
            };
            self.finish(x, y, ctx)
        };
        Some(run())
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        let mut dw = match self.lora {
            true => (self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?,
            false => Tensor::zeros((self.out, self.inp), DType::F32, self.values.device())?,
        };
        if let Some(pos) = self.positions()? {
            dw = (dw
                + petal_ops::sparse::dense(self.values.as_tensor(), &pos, self.out, self.inp)?)?;
        }
        Ok(WeightUpdate::Add(dw))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let mut v = Vec::new();
        if self.lora {
            v.push(NamedTensor {
                name: "rosa_A.weight",
                var: &self.a,
            });
            v.push(NamedTensor {
                name: "rosa_B.weight",
                var: &self.b,
            });
        }
        v.push(NamedTensor {
            name: "rosa_spa.values",
            var: &self.values,
        });
        v
    }

    fn buffers(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "rosa_spa.row_offs",
                var: &self.row_offs,
            },
            NamedTensor {
                name: "rosa_spa.col_idx",
                var: &self.col_idx,
            },
        ]
    }

    fn check_loaded(&self) -> Result<()> {
        let offs = self.row_offs.as_tensor().to_vec1::<i64>()?;
        let cols = self.col_idx.as_tensor().to_vec1::<i64>()?;
        let k = cols.len() as i64;
        let last = *offs.last().unwrap_or(&0);
        if last == 0 {
            return Ok(()); // saved before its mask was chosen: LoRA alone so far
        }
        let ordered = offs[0] == 0 && offs.windows(2).all(|w| w[0] <= w[1]) && last == k;
        if !ordered {
            return Err(Error::msg(format!(
                "`rosa_spa.row_offs` is not a CSR row index of {k} values over {} rows (it must \
                 start at 0, not decrease, and end at {k})",
                self.out
            )));
        }
        if let Some(c) = cols.iter().find(|&&c| c < 0 || c as usize >= self.inp) {
            return Err(Error::msg(format!(
                "`rosa_spa.col_idx` holds {c}: columns must be in 0..{}",
                self.inp
            )));
        }
        *self.positions.lock().expect("rosa positions") = None;
        self.phase.store(SPARSE, Ordering::Relaxed);
        Ok(())
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// What the schedule needs of one layer (its variables are shared handles).
struct MaskHandle {
    row_offs: Var,
    col_idx: Var,
    positions: Arc<Mutex<Option<Tensor>>>,
    phase: Arc<AtomicU8>,
    grads: Arc<GradSquares>,
    k: usize,
    inp: usize,
}

impl MaskHandle {
    /// The mask from the accumulated squares: the top k positions.
    /// A module that saw no gradient keeps LoRA alone.
    fn choose(&self) -> Result<()> {
        if let Some(mean) = self.grads.take_mean()? {
            self.set(&top_k(&mean, self.k)?)?;
            self.phase.store(SPARSE, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The mask at ascending flat positions `keep`, as CSR.
    fn set(&self, keep: &[i64]) -> Result<()> {
        let out = self.row_offs.elem_count() - 1;
        let mut offs = vec![0i64; out + 1];
        for &p in keep {
            offs[p as usize / self.inp + 1] += 1;
        }
        for r in 0..out {
            offs[r + 1] += offs[r];
        }
        let cols: Vec<i64> = keep.iter().map(|&p| p % self.inp as i64).collect();
        let dev = self.row_offs.device();
        self.row_offs.set(&Tensor::from_vec(offs, out + 1, dev)?)?;
        self.col_idx.set(&Tensor::from_vec(cols, self.k, dev)?)?;
        *self.positions.lock().expect("rosa positions") = None;
        Ok(())
    }
}

struct RosaTraining {
    layers: Vec<MaskHandle>,
    warmup: usize,
    grads: usize,
}

impl TrainingHook for RosaTraining {
    fn single_process_only(&self) -> Option<&'static str> {
        Some("its mask is chosen from squared gradients each process gathers on its own data")
    }
    fn after_step(
        &mut self,
        _model: &dyn crate::Adaptable,
        step: usize,
        _grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        let done = step + 1;
        if done == self.warmup {
            self.layers
                .iter()
                .for_each(|l| l.phase.store(COLLECT, Ordering::Relaxed));
        }
        if done == self.warmup + self.grads {
            self.layers.iter().try_for_each(MaskHandle::choose)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        let p = self
            .layers
            .first()
            .map(|l| l.phase.load(Ordering::Relaxed))
            .unwrap_or(WARMUP);
        Ok(HashMap::from([(
            "rosa.phase".to_string(),
            Tensor::new(&[p as u32], &Device::Cpu)?,
        )]))
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let p = state
            .get("rosa.phase")
            .ok_or_else(|| Error::msg("checkpoint lacks `rosa.phase`"))?
            .to_vec1::<u32>()?[0] as u8;
        self.layers
            .iter()
            .for_each(|l| l.phase.store(p.min(SPARSE), Ordering::Relaxed));
        Ok(())
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("rosa", 2, 3.0, crate::testing::toy_targets());
    c.set("d", 0.1).unwrap();
    c
}

#[cfg(test)]
crate::conformance!(conformance, conformance_config, |inp, out, _cfg| {
    2 * (inp + out) + values_for(0.1, out, inp)
});

#[cfg(test)]
mod tests;

/// r = 0: the sparse part alone (the paper's SpA baseline), through the same checks.
#[cfg(test)]
fn sparse_only_config() -> AdapterConfig {
    let mut c = conformance_config();
    c.set("r", 0).unwrap();
    c.set("schedule", "spa_only").unwrap();
    c
}

#[cfg(test)]
crate::conformance!(sparse_only, sparse_only_config, |inp, out, _cfg| {
    values_for(0.1, out, inp)
});

/// Over a quantized base: the update meets the blocks' product as it meets W dequantized.
#[test]
fn rosa_over_quantized_blocks_equals_rosa_over_them_dequantized() {
    let c = conformance_config();
    crate::testing::check_over_quantized_blocks(&Rosa, &c, (12, 32), &|_| {});
}
