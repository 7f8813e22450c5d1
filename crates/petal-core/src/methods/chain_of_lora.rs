//! Chain of LoRA, COLA (Xia et al., 2024, arXiv 2401.04151, "Chain of LoRA: Efficient
//! Fine-tuning of Language Models via Residual Learning"; no official code): a training schedule
//! of M LoRA links. Link k trains alone for `link_steps` steps; at each knot it is merged into
//! the base, a fresh LoRA (A kaiming-uniform, B = 0) starts, and the optimizer state is reset.
//!
//! petal never changes a base weight, so a finished link is kept frozen next to the base (its
//! product detached, never again trained, dropout-free as a merged weight is), which gives the
//! same function as merging it; the layer holds all M links from the start, and only link k
//! takes part in the graph and gets gradients. The chain is `s Σ_{i<=k} B_i A_i` with one
//! scaling `s = alpha / r`, which is one LoRA of rank `(k+1) r`: the trained adapter is saved as
//! plain PEFT LoRA (`peft_type: "LORA"`) of rank `M r` and alpha `M alpha` (the same scaling), the
//! links concatenated (`A = [A_0; …; A_{M-1}]`, `B = [B_0, …, B_{M-1}]`; links not reached are
//! zero in B). Checkpoints keep the links (`lora_A.<i>.weight`, `lora_B.<i>.weight`, petal's own
//! `peft_type: "CHAIN_OF_LORA"`) and the current link.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, NewAdapter, TrainingHook,
    WeightUpdate,
};
use crate::config::{spec, AdapterConfig, RankValue, Spec};
use crate::methods::lora::{dropout, LoraCore, LoraOptions};
use crate::methods::{kaiming_uniform, rank_for};
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The most links a chain may have.
pub const MAX_LINKS: usize = 16;

pub struct ChainOfLora;

crate::method_options! {
    /// Chain of LoRA's options: LoRA's, and the schedule.
    pub struct ChainOptions {
        flatten core: LoraCore;
        /// Number of links M (1..=16); the saved LoRA has rank M r
        pub links: usize = 3,
        /// Steps each link trains; 0: the run's steps over the links (set when training starts)
        pub link_steps: usize = 0,
    }
}

/// Checkpoint names of link i's factors.
fn names(i: usize) -> (&'static str, &'static str) {
    macro_rules! table {
        ($($i:literal),*) => {
            [$((concat!("lora_A.", $i, ".weight"), concat!("lora_B.", $i, ".weight"))),*]
        };
    }
    const T: [(&str, &str); MAX_LINKS] =
        table!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    T[i]
}

impl AdapterMethod for ChainOfLora {
    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        // one link for the whole bench (a knot would reset the optimizer mid-measurement)
        Some(&[("link_steps", "1000000")])
    }

    fn peft_type(&self) -> &'static str {
        "CHAIN_OF_LORA"
    }

    fn options(&self) -> Spec {
        spec::<ChainOptions>()
    }

    fn writes_layer_selection(&self) -> bool {
        true
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: ChainOptions = cfg.options()?;
        o.core.check(&["none"], |_| false)?;
        if o.core.r == 0 {
            return Err(Error::config("adapter config", "r", "must be at least 1"));
        }
        if !(1..=MAX_LINKS).contains(&o.links) {
            return Err(Error::config(
                "adapter config",
                "links",
                format!("{} is out of range: 1..={MAX_LINKS}", o.links),
            ));
        }
        Ok(())
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        let o: ChainOptions = cfg.options()?;
        if !new.given("link_steps") {
            cfg.set("link_steps", new.max_steps.div_ceil(o.links).max(1))?;
        }
        Ok(())
    }

    fn layer_values(&self, cfg: &AdapterConfig, path: &str, dims: &ModuleDims) -> Result<u64> {
        let o: ChainOptions = cfg.options()?;
        let r = rank_for(o.core.r, &o.core.rank_pattern, path);
        Ok(dims.low_rank(r).saturating_mul(o.links as u64))
    }

    fn training(
        &self,
        model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
    ) -> Result<Option<Box<dyn TrainingHook>>> {
        let o: ChainOptions = cfg.options()?;
        let links: Vec<Arc<AtomicUsize>> = model
            .linears()
            .into_iter()
            .filter_map(|l| l.layer(name)?.as_any()?.downcast_ref::<ChainLayer>())
            .map(|l| l.link.clone())
            .collect();
        Ok(Some(Box::new(ChainTraining {
            links,
            link_steps: o.link_steps.max(1),
            count: o.links,
        })))
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: ChainOptions = cfg.options()?;
        let r = rank_for(o.core.r, &o.core.rank_pattern, path);
        let (out, inp) = (base.out_features, base.in_features);
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let nonzero = crate::methods::init_nonzero(&o.core.init);
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..o.links {
            a.push(Var::from_tensor(&kaiming_uniform((r, inp), &mut g, dev)?)?);
            b.push(crate::methods::param((out, r), !nonzero, &mut g, dev)?);
        }
        Ok(Box::new(ChainLayer {
            a,
            b,
            scale: o.core.alpha / r as f64,
            dropout: o.core.dropout,
            link: Arc::new(AtomicUsize::new(0)),
        }))
    }
}

#[derive(Debug)]
struct ChainLayer {
    a: Vec<Var>, // (r, in) per link
    b: Vec<Var>, // (out, r) per link
    scale: f64,
    dropout: f64,
    /// The link being trained; those before it are finished (frozen)
    link: Arc<AtomicUsize>,
}

impl ChainLayer {
    fn current(&self) -> usize {
        self.link.load(Ordering::Relaxed).min(self.a.len() - 1)
    }

    /// The links as one LoRA, the current one attached and the others detached: in training,
    /// links 0..=k (rank (k+1) r), or with `finished_only` links 0..k (None when k = 0); outside
    /// training all M (links not reached yet have B = 0, so they add nothing, and a loaded
    /// checkpoint gives the whole chain).
    fn factors(&self, train: bool, finished_only: bool) -> Result<Option<(Tensor, Tensor)>> {
        let k = self.current();
        let n = match (train, finished_only) {
            (true, true) => k,
            (true, false) => k + 1,
            (false, _) => self.a.len(),
        };
        if n == 0 {
            return Ok(None);
        }
        let pick = |vs: &[Var]| -> Vec<Tensor> {
            (0..n)
                .map(|i| match i == k {
                    true => vs[i].as_tensor().clone(),
                    false => vs[i].as_tensor().detach(),
                })
                .collect()
        };
        Ok(Some((
            Tensor::cat(&pick(&self.a), 0)?,
            Tensor::cat(&pick(&self.b), 1)?,
        )))
    }

    /// All links (training or not), for forms that must not depend on the step.
    fn all(&self) -> Result<(Tensor, Tensor)> {
        Ok(self.factors(false, false)?.expect("at least one link"))
    }

    /// This call's links (see `factors`).
    fn active(&self, ctx: &crate::Ctx) -> Result<(Tensor, Tensor)> {
        Ok(self
            .factors(ctx.is_train(), false)?
            .expect("the current link"))
    }
}

impl AdapterLayer for ChainLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        let x2 = crate::methods::flat_input(x)?;
        let mut d = if self.dropout > 0.0 && ctx.is_train() {
            // dropout acts on the link in training only; finished links are part of the base
            let (a, b) = (
                self.a[self.current()].as_tensor(),
                self.b[self.current()].as_tensor(),
            );
            let cur =
                crate::methods::low_rank(&dropout(&x2, self.dropout, ctx)?, a, b, self.scale)?;
            match self.factors(true, true)? {
                Some((fa, fb)) => (cur + crate::methods::low_rank(&x2, &fa, &fb, self.scale)?)?,
                None => cur,
            }
        } else {
            let (a, b) = self.active(ctx)?;
            crate::methods::low_rank(&x2, &a, &b, self.scale)?
        };
        d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
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
            let (fa, fb) = self.active(ctx)?;
            Ok(petal_ops::lora(
                ctx.kernels(),
                x,
                w,
                b,
                &fa,
                &fb,
                self.scale,
            )?)
        };
        Some(run())
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        let (a, b) = self.all()?;
        Ok(WeightUpdate::Add((b.matmul(&a)? * self.scale)?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let mut v = Vec::new();
        for (i, (a, b)) in self.a.iter().zip(&self.b).enumerate() {
            let (na, nb) = names(i);
            v.push(NamedTensor { name: na, var: a });
            v.push(NamedTensor { name: nb, var: b });
        }
        v
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// The schedule: the knots, and the plain-LoRA form saved at the end.
struct ChainTraining {
    links: Vec<Arc<AtomicUsize>>,
    link_steps: usize,
    count: usize,
}

impl ChainTraining {
    fn set(&self, k: usize) {
        self.links
            .iter()
            .for_each(|l| l.store(k, Ordering::Relaxed));
    }

    /// Whether step `step` (0-based) ends a link that has a successor.
    fn knot(&self, step: usize) -> bool {
        (step + 1).is_multiple_of(self.link_steps) && (step + 1) / self.link_steps < self.count
    }
}

impl TrainingHook for ChainTraining {
    fn after_step(
        &mut self,
        _model: &dyn crate::Adaptable,
        step: usize,
        _grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        if self.knot(step) {
            self.set((step + 1) / self.link_steps);
        }
        Ok(())
    }

    fn reset_optimizer_after(&self, step: usize) -> bool {
        self.knot(step)
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        let k = self
            .links
            .first()
            .map(|l| l.load(Ordering::Relaxed))
            .unwrap_or(0);
        let t = Tensor::new(&[k as u32], &candle_core::Device::Cpu)?;
        Ok(HashMap::from([("chain_of_lora.link".to_string(), t)]))
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let k = state
            .get("chain_of_lora.link")
            .ok_or_else(|| Error::msg("checkpoint lacks `chain_of_lora.link`"))?
            .to_vec1::<u32>()?[0] as usize;
        if k >= self.count {
            return Err(Error::msg(format!(
                "checkpoint's chain_of_lora.link = {k}, but the chain has {} links",
                self.count
            )));
        }
        self.set(k);
        Ok(())
    }

    fn export(&self, cfg: &mut AdapterConfig, tensors: &mut HashMap<String, Tensor>) -> Result<()> {
        *cfg = as_lora(cfg, tensors)?;
        Ok(())
    }
}

/// A chain's tensors (module-relative names) and config as one plain LoRA of rank M r.
pub fn as_lora(
    cfg: &AdapterConfig,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<AdapterConfig> {
    let o: ChainOptions = cfg.options()?;
    let m = o.links;
    let modules: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(&format!(".{}", names(0).0)))
        .map(str::to_string)
        .collect();
    for p in modules {
        let mut take = |n: &str| {
            tensors
                .remove(&format!("{p}.{n}"))
                .ok_or_else(|| Error::msg(format!("{p}: the chain lacks `{n}`")))
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..m {
            a.push(take(names(i).0)?);
            b.push(take(names(i).1)?);
        }
        tensors.insert(format!("{p}.lora_A.weight"), Tensor::cat(&a, 0)?);
        tensors.insert(format!("{p}.lora_B.weight"), Tensor::cat(&b, 1)?);
    }
    let mut core = o.core.clone();
    core.r *= m;
    core.alpha *= m as f64;
    core.init = crate::config::InitWeights::Flag(true);
    for v in core.rank_pattern.values_mut() {
        *v = RankValue::Rank(m * v.rank());
    }
    let lora = LoraOptions {
        core,
        ..Default::default()
    };
    let mut c = cfg.clone();
    c.peft_type = "LORA".into();
    c.options = match serde_json::to_value(lora) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => return Err(Error::msg("LoRA options did not serialise")),
    };
    Ok(c)
}

/// The conformance checks on one link (every trainable tensor must get a gradient there; links
/// after the first only join at their knot): the chain's own tests cover three.
#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("chain_of_lora", 2, 3.0, crate::testing::toy_targets());
    c.set("links", 1).unwrap();
    c
}

#[cfg(test)]
crate::conformance!(conformance, conformance_config, |inp, out, cfg| {
    crate::testing::opt_usize(cfg, "links") * 2 * (inp + out)
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{adapted, max_rel, rand_tensor, Toy};
    use crate::Adaptable;

    fn chain_of(t: &Toy) -> Vec<&ChainLayer> {
        [&t.fc1, &t.fc2]
            .iter()
            .map(|l| {
                l.layer("default")
                    .and_then(|l| l.as_any())
                    .and_then(|a| a.downcast_ref::<ChainLayer>())
                    .unwrap()
            })
            .collect()
    }

    /// Links move on at the knots; the finished ones get no gradient; the saved plain LoRA of
    /// rank M r gives the chain's function, and it equals merging each link into W in turn.
    #[test]
    fn the_chain_equals_links_merged_in_turn_and_saves_as_one_lora() {
        let mut c = conformance_config();
        c.set("links", 3).unwrap();
        c.set("link_steps", 2).unwrap();
        let t = adapted(&c, true);
        let mut hook = ChainOfLora.training(&t, "default", &c).unwrap().unwrap();
        let none = |_: &Var| None;
        for step in 0..6 {
            let layers = chain_of(&t);
            assert_eq!(layers[0].current(), step / 2, "step {step}");
            // move the current link as a training step would
            for l in &layers {
                let k = l.current();
                l.a[k]
                    .set(&rand_tensor(l.a[k].dims(), 10 + step as u64))
                    .unwrap();
                l.b[k]
                    .set(&rand_tensor(l.b[k].dims(), 20 + step as u64))
                    .unwrap();
            }
            let x = Toy::input();
            let g = t.forward(&x).sum_all().unwrap().backward().unwrap();
            for l in &layers {
                for i in 0..3 {
                    let got = g.get(l.a[i].as_tensor()).is_some();
                    assert_eq!(got, i == l.current(), "link {i} at step {step}");
                }
            }
            assert_eq!(hook.reset_optimizer_after(step), step == 1 || step == 3);
            hook.after_step(&t, step, &none).unwrap();
        }
        // W + s B_0 A_0 + s B_1 A_1 + s B_2 A_2, by hand
        let x = rand_tensor(&[4, 10], 3);
        let l = chain_of(&t)[0];
        let mut want = x.matmul(&t.fc1.weight().t().unwrap()).unwrap();
        want = want.broadcast_add(t.fc1.bias().unwrap()).unwrap();
        for i in 0..3 {
            let ab = l.b[i].matmul(l.a[i].as_tensor()).unwrap();
            want = (want + (x.matmul(&ab.t().unwrap()).unwrap() * 1.5).unwrap()).unwrap();
        }
        let got = t.fc1.forward(&x, &crate::Ctx::eval()).unwrap();
        assert!(max_rel(&got, &want) < 1e-5, "{}", max_rel(&got, &want));
        // saved as LoRA: rank 6, alpha 9 (scale 1.5), the links concatenated
        let mut tensors: HashMap<String, Tensor> = crate::walk::adapter_tensors(&t, "default")
            .into_iter()
            .map(|x| (x.key, x.var.as_tensor().clone()))
            .collect();
        let mut saved = c.clone();
        hook.export(&mut saved, &mut tensors).unwrap();
        assert_eq!(saved.peft_type, "LORA");
        assert_eq!(crate::testing::opt_usize(&saved, "r"), 6);
        assert_eq!(saved.get("lora_alpha").and_then(|v| v.as_f64()), Some(9.0));
        let mut fresh = Toy::new();
        crate::inject_adapter(&mut fresh, "default", &saved, 0).unwrap();
        for lin in fresh.linears() {
            for nt in lin.layer("default").unwrap().tensors() {
                nt.var
                    .set(&tensors[&format!("{}.{}", lin.path(), nt.name)])
                    .unwrap();
            }
        }
        let xs = Toy::input();
        assert!(max_rel(&fresh.forward(&xs), &t.forward(&xs)) < 1e-5);
    }

    #[test]
    fn a_link_count_out_of_range_is_refused_naming_the_option() {
        for m in [0, 17] {
            let mut c = conformance_config();
            c.set("links", m).unwrap();
            let e = ChainOfLora.validate(&c).unwrap_err().to_string();
            assert!(e.contains("links"), "{e}");
        }
    }

    #[test]
    fn a_resumed_chain_continues_at_its_saved_link() {
        let mut c = conformance_config();
        c.set("links", 3).unwrap();
        let t = adapted(&c, false);
        let mut hook = ChainOfLora.training(&t, "default", &c).unwrap().unwrap();
        let mut state = HashMap::new();
        state.insert(
            "chain_of_lora.link".to_string(),
            Tensor::new(&[2u32], &candle_core::Device::Cpu).unwrap(),
        );
        hook.load_state(&state).unwrap();
        assert!(chain_of(&t).iter().all(|l| l.current() == 2));
        state.insert(
            "chain_of_lora.link".into(),
            Tensor::new(&[3u32], &candle_core::Device::Cpu).unwrap(),
        );
        let e = hook.load_state(&state).unwrap_err().to_string();
        assert!(e.contains("has 3 links"), "{e}");
    }
}
