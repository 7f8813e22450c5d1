//! L4Q (Jeon et al., ACL 2025, arXiv 2402.04902, "L4Q: Parameter Efficient Quantization-Aware
//! Fine-Tuning on Large Language Models"; no official code): LoRA inside quantization-aware
//! training. The weight the model runs is the quantization of the merged weight,
//! `Ŵ = Q(W + s B A)`, with a learnable step size γ and offset β per group of `group_size`
//! input columns of each row (LSQ+, asymmetric): `Ŵ = γ round(clamp((v - β) / γ, 0, 2^bits - 1))
//! + β`, v = W + s B A. Rounding passes gradients straight through (STE) inside the grid and none
//! outside it; γ and β get LSQ+'s gradients (`q - u` and 0 inside, the clip bound and 1
//! outside). They are learned relative to their min-max init γ0, β0, as `γ = γ0 exp(θ)` and
//! `β = β0 + γ0 φ` with θ = φ = 0 at the start: Adam moves each parameter by about the learning
//! rate a step, which the absolute γ (about 1e-3) could not take, and which this makes a
//! relative change (LSQ's gradient scale does the same for SGD). Ŵ - W is one graph node
//! (the paper's memory-optimised layer) that keeps only A, B and θ, φ: its backward computes
//! v, the grid and the masks again from them and gives A's, B's, θ's and φ's gradients in
//! closed form, so no (out, in) intermediate is held between forward and backward beyond the
//! update itself; a composed twin (`quantized`) is the reference in the tests. After training
//! the adapter is merged and the model is exactly quantized: every group of every adapted row
//! holds at most 2^bits values on its grid, with γ and β kept in f16 (they are rounded to f16
//! in the forward pass too, straight through), so 4-bit groups of 32 are GGUF's Q4_1 blocks
//! (`d = γ`, `m = β`) value for value.
//!
//! Init: B = 0 and γ, β from each group's minimum and maximum, so training starts from the
//! round-to-nearest quantization of W. Decisions the paper leaves open (no code): LSQ+ for the
//! "LoRA-wise LSQ" quantizer, min-max init, the relative parameterisation, the f16 grid. γ0 and
//! β0 are computed again from W when the adapter is loaded (they are not saved). Not yet the paper's
//! memory-optimised layer: Ŵ's (out, in) intermediates are kept for backward (about six f32
//! copies of each adapted weight), so L4Q trains small models here. petal's own adapter:
//! `peft_type: "L4Q"`, tensors `lora_A.weight`, `lora_B.weight`, `l4q_grid` (θ and φ stacked).

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, WeightUpdate,
};
use crate::config::{finite, spec, AdapterConfig, Spec};
use crate::methods::{add_dense_delta, dense_linear, param};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

/// θ and φ stacked (2, out, in / group).
pub const GRID: &str = "l4q_grid";

pub struct L4q;

crate::method_options! {
    /// L4Q's options (petal's own method).
    pub struct L4qOptions {
        /// LoRA rank
        pub r: usize = 8,
        /// LoRA alpha (scale alpha / r)
        pub alpha as "lora_alpha": f64 = 16.0,
        /// Bits of the quantized weight (2 ..= 8)
        pub bits: usize = 4,
        /// Input columns sharing one step size and offset (32: GGUF's Q4_1 blocks at 4 bits)
        pub group_size: usize = 32,
        /// Train the step sizes and offsets (false: the min-max grid stays fixed)
        pub learn_grid: bool = true,
        /// true: B starts at zero (training starts from W rounded to the grid); false: B
        /// random too (a testing switch)
        pub init_weights: bool = true,
    }
}

impl AdapterMethod for L4q {
    fn in_peft(&self) -> bool {
        false
    }

    fn peft_type(&self) -> &'static str {
        "L4Q"
    }

    fn options(&self) -> Spec {
        spec::<L4qOptions>()
    }

    fn default_targets(&self) -> Option<&'static str> {
        Some("all-linear") // the whole model is quantized
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: L4qOptions = cfg.options()?;
        finite("lora_alpha", o.alpha, None)?;
        if o.r == 0 {
            return Err(Error::config("adapter config", "r", "must be at least 1"));
        }
        if !(2..=8).contains(&o.bits) {
            return Err(Error::config(
                "adapter config",
                "bits",
                format!("{} is not in 2..=8", o.bits),
            ));
        }
        if o.group_size == 0 {
            return Err(Error::config(
                "adapter config",
                "group_size",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        // A, B, the grid, and Ŵ's (out, in) intermediates a step keeps
        let o: L4qOptions = cfg.options()?;
        Ok(dims.low_rank(o.r) + 2 * (dims.full() / o.group_size as u64) + 6 * dims.full())
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: L4qOptions = cfg.options()?;
        let (out, inp) = (base.out_features, base.in_features);
        if !inp.is_multiple_of(o.group_size) {
            return Err(Error::config(
                path,
                "group_size",
                format!(
                    "{} does not divide the module's {inp} input features",
                    o.group_size
                ),
            ));
        }
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let a = param((o.r, inp), false, &mut g, dev)?;
        let b = param((out, o.r), o.init_weights, &mut g, dev)?;
        let w0 = base.weight.to_dtype(DType::F32)?;
        let (step0, offset0) = min_max_grid(&w0, o.group_size, o.bits)?;
        Ok(Box::new(L4qLayer {
            a,
            b,
            grid: Var::zeros((2, out, inp / o.group_size), DType::F32, dev)?,
            step0,
            offset0,
            w0,
            scale: o.alpha / o.r as f64,
            levels: ((1usize << o.bits) - 1) as f64,
            group: o.group_size,
            learn_grid: o.learn_grid,
        }))
    }
}

/// Each group's round-to-nearest grid: offset = the group's minimum, step = its range over the
/// levels (a tiny step where the group is constant), both (out, in / group) and f16 values.
fn min_max_grid(w: &Tensor, group: usize, bits: usize) -> Result<(Tensor, Tensor)> {
    let (out, inp) = w.dims2()?;
    let g = w.reshape((out, inp / group, group))?;
    let (lo, hi) = (g.min(2)?, g.max(2)?);
    let levels = ((1usize << bits) - 1) as f64;
    let step = ((hi - &lo)? / levels)?.maximum(1e-6)?;
    let f16 = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F16)?.to_dtype(DType::F32)?) };
    Ok((f16(step)?, f16(lo)?))
}

#[derive(Debug)]
struct L4qLayer {
    a: Var,          // (r, in)
    b: Var,          // (out, r)
    grid: Var,       // (2, out, in / group): θ (γ = γ0 exp(θ)), φ (β = β0 + γ0 φ)
    step0: Tensor,   // γ0
    offset0: Tensor, // β0
    w0: Tensor,      // (out, in) f32, frozen
    scale: f64,
    levels: f64,
    group: usize,
    learn_grid: bool,
}

/// `t` rounded to f16 values in the forward pass, its gradient passed straight through.
fn f16_ste(t: &Tensor) -> Result<Tensor> {
    let r = t.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
    Ok((t + (r - t)?.detach())?)
}

/// What a layer's quantizer needs, cloned into the lean node's closures.
#[derive(Debug, Clone)]
struct Grid {
    w0: Tensor,
    step0: Tensor,
    offset0: Tensor,
    scale: f64,
    levels: f64,
    group: usize,
}

impl Grid {
    /// (γ, β) from θ, φ stacked in `g` (2, out, groups), both f16 values (straight through),
    /// and γ before rounding (for θ's gradient).
    fn params(&self, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let step = (&self.step0 * g.get(0)?.exp()?)?;
        let offset = (&self.offset0 + (&self.step0 * g.get(1)?)?)?;
        Ok((f16_ste(&step)?, f16_ste(&offset)?, step))
    }

    /// v = W + s B A as (out, groups, group).
    fn merged(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (out, inp) = self.w0.dims2()?;
        let v = (&self.w0 + (b.matmul(a)? * self.scale)?)?;
        Ok(v.reshape((out, inp / self.group, self.group))?)
    }

    /// Ŵ - W (out, in) with no graph, and for backward: u = (v - β) / γ unclipped, the codes
    /// q, and γ unrounded.
    fn delta_parts(&self, a: &Tensor, b: &Tensor, g: &Tensor) -> Result<[Tensor; 4]> {
        let (step, offset, raw) = self.params(g)?;
        let (step, offset) = (step.unsqueeze(2)?, offset.unsqueeze(2)?);
        let u = self
            .merged(a, b)?
            .broadcast_sub(&offset)?
            .broadcast_div(&step)?;
        let q = u.clamp(0.0, self.levels)?.round()?;
        let w = q.broadcast_mul(&step)?.broadcast_add(&offset)?;
        let d = (w.reshape(self.w0.shape())? - &self.w0)?;
        Ok([d, u, q, raw])
    }

    /// A's, B's and the grid's gradients from the update's gradient `dy` (out, in): STE inside
    /// the grid, LSQ+ for γ and β, through the relative parameterisation.
    fn backward(
        &self,
        [a, b, g]: [&Tensor; 3],
        need: [bool; 3],
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let [_, u, q, raw] = self.delta_parts(a, b, g)?;
        let g3 = dy.reshape(u.shape())?;
        let inside =
            (u.ge(0.0)?.to_dtype(DType::F32)? * u.le(self.levels)?.to_dtype(DType::F32)?)?;
        let gv = (&g3 * &inside)?.reshape(self.w0.shape())?;
        let da = need[0]
            .then(|| b.t()?.matmul(&gv)? * self.scale)
            .transpose()?;
        let db = need[1]
            .then(|| gv.matmul(&a.t()?)? * self.scale)
            .transpose()?;
        let dg = need[2]
            .then(|| -> Result<Tensor> {
                // dŴ/dγ = q - u inside, q outside; dŴ/dβ = 0 inside, 1 outside
                let dstep = (&g3 * (&q - (&u * &inside)?)?)?.sum(2)?;
                let doff = (&g3 * (1.0 - &inside)?)?.sum(2)?;
                let dtheta = (dstep * raw)?;
                let dphi = (doff * &self.step0)?;
                Ok(Tensor::stack(&[dtheta, dphi], 0)?)
            })
            .transpose()?;
        Ok([da, db, dg])
    }
}

impl L4qLayer {
    fn spec(&self) -> Grid {
        Grid {
            w0: self.w0.clone(),
            step0: self.step0.clone(),
            offset0: self.offset0.clone(),
            scale: self.scale,
            levels: self.levels,
            group: self.group,
        }
    }

    fn grid_var(&self) -> Tensor {
        match self.learn_grid {
            true => self.grid.as_tensor().clone(),
            false => self.grid.as_tensor().detach(),
        }
    }

    /// The readable twin: Ŵ = γ round(clamp((W + s B A - β) / γ, 0, levels)) + β (out, in)
    /// composed of candle's ops, rounding straight through (autograd keeps every
    /// intermediate).
    #[cfg(test)]
    fn quantized(&self) -> Result<Tensor> {
        let spec = self.spec();
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        let v = spec.merged(a, b)?;
        let (step, offset, _) = spec.params(&self.grid_var())?;
        let (step, offset) = (step.unsqueeze(2)?, offset.unsqueeze(2)?);
        // clipped, then rounded (LSQ): values past the grid pass no gradient to v
        let u = v
            .broadcast_sub(&offset)?
            .broadcast_div(&step)?
            .clamp(0.0, self.levels)?;
        let q = (&u + (u.round()? - &u)?.detach())?;
        Ok(q.broadcast_mul(&step)?
            .broadcast_add(&offset)?
            .reshape(self.w0.shape())?)
    }

    /// Ŵ - W (out, in) as one graph node keeping A, B and the grid only.
    fn delta(&self) -> Result<Tensor> {
        let (fwd, bwd) = (self.spec(), self.spec());
        let g = self.grid_var();
        Ok(petal_ops::lean::lean3(
            [self.a.as_tensor(), self.b.as_tensor(), &g],
            move |[a, b, g]| {
                let [d, ..] = fwd.delta_parts(a, b, g).map_err(candle_core::Error::msg)?;
                Ok(d)
            },
            move |xs, need, _, dy| bwd.backward(xs, need, dy).map_err(candle_core::Error::msg),
        )?)
    }
}

impl AdapterLayer for L4qLayer {
    fn forward(&self, x: &Tensor, y: Tensor, _ctx: &crate::Ctx) -> Result<Tensor> {
        add_dense_delta(x, y, &self.delta()?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        dense_linear(ctx.kernels(), x, w, b, || Ok(Some(self.delta()?)))
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Add(self.delta()?.detach()))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "lora_A.weight",
                var: &self.a,
            },
            NamedTensor {
                name: "lora_B.weight",
                var: &self.b,
            },
            NamedTensor {
                name: GRID,
                var: &self.grid,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use petal_ops::testing::{max_rel, rand};

    fn toy_config() -> AdapterConfig {
        // the toy model's 10 and 12 input features: groups of 2
        let mut c = AdapterConfig::for_method("l4q", 2, 4.0, crate::testing::toy_targets());
        c.set("group_size", 2).unwrap();
        c
    }

    #[test]
    fn merging_gives_the_quantized_weight_unmerging_restores_w_and_it_saves_bitwise() {
        crate::testing::check_merge_equals_unmerged_and_unmerge_restores(&toy_config());
        crate::testing::check_save_load_bitwise(&toy_config());
    }

    fn layer(w0: Tensor, bits: usize) -> L4qLayer {
        let (step0, offset0) = min_max_grid(&w0, 8, bits).unwrap();
        let (out, inp) = w0.dims2().unwrap();
        L4qLayer {
            a: Var::from_tensor(&(rand(&[2, inp], 1) * 0.1).unwrap()).unwrap(),
            b: Var::from_tensor(&(rand(&[out, 2], 2) * 0.1).unwrap()).unwrap(),
            grid: Var::zeros((2, out, inp / 8), DType::F32, &candle_core::Device::Cpu).unwrap(),
            step0,
            offset0,
            w0,
            scale: 2.0,
            levels: ((1 << bits) - 1) as f64,
            group: 8,
            learn_grid: true,
        }
    }

    #[test]
    fn every_group_of_the_quantized_weight_lies_on_its_f16_grid() {
        let l = layer(rand(&[6, 24], 3), 3);
        let w = l.quantized().unwrap().reshape((6, 3, 8)).unwrap();
        let (step, offset, _) = l.spec().params(&l.grid_var()).unwrap();
        let (step, offset) = (&step, &offset);
        let codes = w
            .broadcast_sub(&offset.unsqueeze(2).unwrap())
            .unwrap()
            .broadcast_div(&step.unsqueeze(2).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for c in codes {
            assert!(
                (c - c.round()).abs() < 1e-3 && (-1e-3..=7.001).contains(&c),
                "{c}"
            );
        }
        let f16 = step
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(max_rel(&f16, step), 0.0, "f16 steps");
        assert_eq!(max_rel(step, &l.step0), 0.0, "θ = 0: the min-max grid");
    }

    #[test]
    fn gradients_are_lsq_plus_by_the_straight_through_estimator() {
        // closed forms, element by element, for a loss sum(Ŵ ⊙ G):
        // dŴ/dv = 1 inside the grid, 0 outside; dŴ/dγ = q - u inside, the clipped code outside;
        // dŴ/dβ = 0 inside, 1 outside; through γ = γ0 exp(θ), β = β0 + γ0 φ:
        // dθ = γ dγ, dφ = γ0 dβ
        let mut l = layer(rand(&[4, 16], 5), 2);
        // θ, φ away from zero: their gradients go through exp(θ) and γ0
        l.grid = Var::from_tensor(&(rand(&[2, 4, 2], 11) * 0.1).unwrap()).unwrap();
        // move some values outside the grid: a narrower grid than the weights span
        let narrower = (&l.step0 * 0.7).unwrap().to_dtype(DType::F16).unwrap();
        l.step0 = narrower.to_dtype(DType::F32).unwrap();
        let g = rand(&[4, 16], 9);
        let v = (&l.w0 + (l.b.as_tensor().matmul(l.a.as_tensor()).unwrap() * 2.0).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let (st, of, raw) = l.spec().params(&l.grid_var()).unwrap();
        let (st, of) = (st.to_vec2::<f32>().unwrap(), of.to_vec2::<f32>().unwrap());
        let (raw, s0) = (
            raw.to_vec2::<f32>().unwrap(),
            l.step0.to_vec2::<f32>().unwrap(),
        );
        let gv = g.to_vec2::<f32>().unwrap();
        let (mut dstep, mut doff) = (vec![vec![0f32; 2]; 4], vec![vec![0f32; 2]; 4]);
        let mut dv = vec![vec![0f32; 16]; 4];
        for i in 0..4 {
            for j in 0..16 {
                let (s, o) = (st[i][j / 8], of[i][j / 8]);
                let u = (v[i][j] - o) / s;
                let inside = (0.0..=3.0).contains(&u);
                let q = u.round().clamp(0.0, 3.0);
                dv[i][j] = if inside { gv[i][j] } else { 0.0 };
                let (raw, s0) = (raw[i][j / 8], s0[i][j / 8]);
                dstep[i][j / 8] += gv[i][j] * if inside { q - u } else { q } * raw;
                doff[i][j / 8] += gv[i][j] * if inside { 0.0 } else { 1.0 } * s0;
            }
        }
        let want_grid = Tensor::stack(
            &[
                Tensor::new(dstep, &candle_core::Device::Cpu).unwrap(),
                Tensor::new(doff, &candle_core::Device::Cpu).unwrap(),
            ],
            0,
        )
        .unwrap();
        let dvt = Tensor::new(dv, &candle_core::Device::Cpu).unwrap();
        let want_b = (dvt.matmul(&l.a.as_tensor().t().unwrap()).unwrap() * 2.0).unwrap();
        let want_a = (l.b.as_tensor().t().unwrap().matmul(&dvt).unwrap() * 2.0).unwrap();
        // the composed twin (autograd) and the lean node (closed-form backward) alike
        let composed = l.quantized().unwrap();
        let lean = (l.delta().unwrap() + &l.w0).unwrap();
        assert!(max_rel(&lean, &composed) < 1e-6, "the same Ŵ");
        for (name, w) in [("composed", composed), ("lean", lean)] {
            let grads = (&w * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_rel(grads.get(l.grid.as_tensor()).unwrap(), &want_grid);
            assert!(d < 1e-4, "{name}: grid {d}");
            assert!(
                max_rel(grads.get(l.b.as_tensor()).unwrap(), &want_b) < 1e-4,
                "{name}: B"
            );
            assert!(
                max_rel(grads.get(l.a.as_tensor()).unwrap(), &want_a) < 1e-4,
                "{name}: A"
            );
        }
    }

    /// Against `tools/golden/l4q_oracle.py`, a PyTorch transcription of the quantizer written
    /// apart from this file: Ŵ - W and the gradients of A, B, θ, φ at 4, 3 and 2 bits (with
    /// 10-40% of the values clipped).
    #[test]
    fn the_lean_node_equals_the_pytorch_transcription_in_value_and_gradients() {
        let t = crate::testing::golden_fixture("l4q");
        for c in ["b4", "b3", "b2"] {
            let get = |k: &str| t[&format!("{c}.{k}")].clone();
            let p = get("params").to_vec1::<f32>().unwrap();
            let (s, group, bits) = (p[0] as f64, p[1] as usize, p[2] as usize);
            let w0 = get("w0");
            let (step0, offset0) = min_max_grid(&w0, group, bits).unwrap();
            let grid = Tensor::stack(&[get("theta"), get("phi")], 0).unwrap();
            let l = L4qLayer {
                a: Var::from_tensor(&get("a")).unwrap(),
                b: Var::from_tensor(&get("b")).unwrap(),
                grid: Var::from_tensor(&grid).unwrap(),
                step0,
                offset0,
                w0,
                scale: s,
                levels: ((1 << bits) - 1) as f64,
                group,
                learn_grid: true,
            };
            let d = l.delta().unwrap();
            assert!(max_rel(&d, &get("delta")) < 1e-5, "{c}: delta");
            let grads = (&d * &get("gout"))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = grads.get(l.grid.as_tensor()).unwrap();
            for (name, got, want) in [
                ("A", grads.get(l.a.as_tensor()).unwrap().clone(), get("d_a")),
                ("B", grads.get(l.b.as_tensor()).unwrap().clone(), get("d_b")),
                ("theta", g.get(0).unwrap(), get("d_theta")),
                ("phi", g.get(1).unwrap(), get("d_phi")),
            ] {
                let e = max_rel(&got, &want);
                assert!(e < 1e-4, "{c}: d{name} {e}");
            }
        }
    }
}
