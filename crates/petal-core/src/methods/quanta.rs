//! QuanTA (Chen et al., NeurIPS 2024, arXiv 2406.00132, "QuanTA: Efficient High-Rank
//! Fine-Tuning of LLMs with Quantum-Informed Tensor Adaptation"; official code
//! quanta-fine-tuning/quanta): a high-rank update from a few small gates.
//!
//! The feature axis of length P = n_1 ⋯ n_D (>= the module's in and out; x is zero-padded to
//! P, the result cut to `out`) is viewed as D axes. One gate per pair of axes (a, b), a 4-index
//! tensor `(n_b, n_a, n_b, n_a)` acting jointly on the two axes as an `(n_b n_a) x (n_b n_a)`
//! matrix, applied in the official order: pairs of axes counted from the end, `(-1,-2), (-1,-3),
//! …, (-2,-3), …`. The chain `Q_θ` is a P x P operator of high rank from `Σ (n_a n_b)²`
//! values. A frozen copy θ₀ of the initial gates is subtracted, so the update
//! `dW = (Q_θ - Q_θ₀)[:out, :in]` is zero at init (the official `sum_opposite_freeze_one`, the
//! only mode it implements; petal keeps W frozen and subtracts on the fly instead of merging
//! `-Q_θ₀` into W). Gates start kaiming-uniform as (n_b n_a, n_b n_a) matrices. Mergeable.
//! petal's own adapter: `peft_type: "QUANTA"`, tensors `<module>.quanta_weights.-1 -2` (θ, the
//! official names) and the buffers `<module>.quanta_weights2.-1 -2` (θ₀).

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, WeightUpdate,
};
use crate::config::{probability, spec, AdapterConfig, Spec};
use crate::methods::{add_dense_delta, dense_linear, flat_input, kaiming_uniform, KeptDelta};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

/// The most axes a factorisation may have (28 gates).
pub const MAX_AXES: usize = 8;

pub struct Quanta;

crate::method_options! {
    /// QuanTA's options (the official `QuanTAConfig` keys).
    pub struct QuantaOptions {
        /// Number of axes D when `per_dim_features` is not given (2..=8)
        pub d: usize = 4,
        /// Axis sizes n_1..n_D (product >= every targeted module's in and out); empty: chosen per module
        [crate::config::parse_list]
        pub per_dim_features: Vec<usize> = Vec::new(),
        /// Dropout on the adapter's input
        pub quanta_dropout: f64 = 0.0,
        /// true: θ₀ is a copy of the initial gates (dW = 0); false: θ₀ drawn apart (a testing switch)
        pub init_weights: bool = true,
    }
}

/// The axis sizes for a module (out, in): the given ones, checked, or petal's choice: among
/// the factorisations of `max(in, out)` into `d` factors (each >= 2) and the official rule (every axis
/// `ceil(max^(1/d))`, padded), the one with the fewest gate values; sizes largest first.
pub fn axes(o: &QuantaOptions, out: usize, inp: usize) -> Result<Vec<usize>> {
    let big = out.max(inp);
    if !o.per_dim_features.is_empty() {
        let p: usize = o.per_dim_features.iter().product();
        if p < big {
            return Err(Error::config(
                "adapter config",
                "per_dim_features",
                format!(
                    "{:?} spans {p} features, fewer than the module's {big} (the product must \
                     be at least max(in, out) = {big}, the rest padded)",
                    o.per_dim_features
                ),
            ));
        }
        return Ok(o.per_dim_features.clone());
    }
    let d = o.d;
    let c = (1..=big).find(|c| c.pow(d as u32) >= big).unwrap_or(big);
    let mut best = vec![c; d];
    let mut cur = Vec::with_capacity(d);
    factorisations(big, d, big, &mut cur, &mut |f| {
        if gate_values(f) < gate_values(&best) {
            best = f.to_vec();
        }
    });
    Ok(best)
}

/// Every factorisation of `n` into `left` factors of at least 2, each at most `cap`,
/// non-increasing.
fn factorisations(
    n: usize,
    left: usize,
    cap: usize,
    cur: &mut Vec<usize>,
    f: &mut impl FnMut(&[usize]),
) {
    if left == 1 {
        if (2..=cap).contains(&n) {
            cur.push(n);
            f(cur);
            cur.pop();
        }
        return;
    }
    for k in (2..=cap.min(n)).rev().filter(|&k| n.is_multiple_of(k)) {
        cur.push(k);
        factorisations(n / k, left - 1, k, cur, f);
        cur.pop();
    }
}

/// Trained values for axis sizes `n`: `Σ_{a<b} (n_a n_b)²`.
pub fn gate_values(n: &[usize]) -> usize {
    pairs(n.len()).map(|(a, b)| (n[a] * n[b]).pow(2)).sum()
}

/// The gates' axis pairs as positions `(a, b)` in `0..d`, a the later axis, in the official
/// order (`itertools.combinations(range(-1, -d - 1, -1), 2)`).
fn pairs(d: usize) -> impl Iterator<Item = (usize, usize)> {
    (1..=d).flat_map(move |i| (i + 1..=d).map(move |j| (d - i, d - j)))
}

/// The saved names of gate (-i, -j), trained and frozen.
fn gate_name(frozen: bool, i: usize, j: usize) -> &'static str {
    const T: [[&str; MAX_AXES]; MAX_AXES - 1] = names!("quanta_weights");
    const F: [[&str; MAX_AXES]; MAX_AXES - 1] = names!("quanta_weights2");
    if frozen {
        F[i - 1][j - 1]
    } else {
        T[i - 1][j - 1]
    }
}

macro_rules! names {
    ($p:literal) => {
        [
            row!($p, "1", "", ["2", "3", "4", "5", "6", "7", "8"]),
            row!($p, "2", "", "", ["3", "4", "5", "6", "7", "8"]),
            row!($p, "3", "", "", "", ["4", "5", "6", "7", "8"]),
            row!($p, "4", "", "", "", "", ["5", "6", "7", "8"]),
            row!($p, "5", "", "", "", "", "", ["6", "7", "8"]),
            row!($p, "6", "", "", "", "", "", "", ["7", "8"]),
            row!($p, "7", "", "", "", "", "", "", "", ["8"]),
        ]
    };
}
macro_rules! row {
    ($p:literal, $i:literal, $($e:literal,)* [$($j:literal),*]) => {
        [$($e,)* $(concat!($p, ".-", $i, " -", $j)),*]
    };
}
use {names, row};

impl AdapterMethod for Quanta {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // the gate chain's update is added to the base output; W is never read
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn peft_type(&self) -> &'static str {
        "QUANTA"
    }

    fn options(&self) -> Spec {
        spec::<QuantaOptions>()
    }

    fn shared_key(&self, o: crate::adapter::SharedOption) -> Option<&'static str> {
        (o == crate::adapter::SharedOption::Dropout).then_some("quanta_dropout")
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: QuantaOptions = cfg.options()?;
        probability("quanta_dropout", o.quanta_dropout)?;
        let d = if o.per_dim_features.is_empty() {
            o.d
        } else {
            o.per_dim_features.len()
        };
        let key = if o.per_dim_features.is_empty() {
            "d"
        } else {
            "per_dim_features"
        };
        if !(2..=MAX_AXES).contains(&d) {
            return Err(Error::config(
                "adapter config",
                key,
                format!("{d} axes is out of range: QuanTA takes 2..={MAX_AXES} axes"),
            ));
        }
        let span = o
            .per_dim_features
            .iter()
            .try_fold(1u64, |p, &n| p.checked_mul(n as u64));
        if o.per_dim_features.iter().any(|&n| n == 0 || n > 1 << 16)
            || span.is_none_or(|p| p > 1 << 31)
        {
            return Err(Error::config(
                "adapter config",
                "per_dim_features",
                "every axis size must be in 1..=65536 and their product at most 2^31",
            ));
        }
        Ok(())
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        // θ and θ₀, and the dense dW a step builds
        let n = axes(&cfg.options()?, dims.out, dims.inp)?;
        Ok(2 * gate_values(&n) as u64 + dims.full())
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        _path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: QuantaOptions = cfg.options()?;
        let (out, inp) = (base.out_features, base.in_features);
        let n = axes(&o, out, inp)?;
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let mut gates = Vec::new();
        let mut frozen = Vec::new();
        for (a, b) in pairs(n.len()) {
            let m = n[b] * n[a];
            let t = kaiming_uniform((m, m), &mut g, dev)?.reshape((n[b], n[a], n[b], n[a]))?;
            let t0 = if o.init_weights {
                t.copy()?
            } else {
                kaiming_uniform((m, m), &mut g, dev)?.reshape((n[b], n[a], n[b], n[a]))?
            };
            gates.push(Var::from_tensor(&t)?);
            frozen.push(Var::from_tensor(&t0)?);
        }
        Ok(Box::new(QuantaLayer {
            gates,
            frozen,
            n,
            out,
            inp,
            dropout: o.quanta_dropout,
            kept: KeptDelta::default(),
        }))
    }
}

#[derive(Debug)]
struct QuantaLayer {
    gates: Vec<Var>,  // θ, one per pair, (n_b, n_a, n_b, n_a)
    frozen: Vec<Var>, // θ₀, never trained
    n: Vec<usize>,
    out: usize,
    inp: usize,
    dropout: f64,
    /// Inference's dW.
    kept: KeptDelta,
}

impl QuantaLayer {
    fn width(&self) -> usize {
        self.n.iter().product()
    }

    /// `(Q_θ - Q_θ₀)` on rows of `inp` features (f32), cut or padded to `out`: one graph node
    /// over the rows and the gates whose backward runs both chains again with a graph, so a
    /// step keeps none of the chains' intermediates (`rows · P` values per gate).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.width();
        let x = x.pad_with_zeros(1, 0, p - self.inp)?;
        let (n, out) = (self.n.clone(), self.out.min(p));
        let frozen: Vec<Tensor> = self.frozen.iter().map(|v| v.as_tensor().detach()).collect();
        let unflat = self.unflatten();
        let run = std::sync::Arc::new(
            move |x: &Tensor, flat: &Tensor| -> candle_core::Result<Tensor> {
                let q = (chain(&n, x, &unflat(flat)?, false)? - chain(&n, x, &frozen, false)?)?;
                q.narrow(1, 0, out)?.contiguous() // a lean node's value is read as contiguous
            },
        );
        let again = run.clone();
        Ok(petal_ops::lean::lean2(
            [&x, &self.flat()?],
            |[x, flat]| run(x, flat),
            move |[x, flat], need, _, dy| {
                let (xv, fv) = (Var::from_tensor(x)?, Var::from_tensor(flat)?);
                let y = again(xv.as_tensor(), fv.as_tensor())?;
                let g = (y * dy.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
                let grad = |v: &Var, like: &Tensor| match g.get(v.as_tensor()) {
                    Some(d) => Ok(d.clone()),
                    None => like.zeros_like(),
                };
                Ok([
                    need[0].then(|| grad(&xv, x)).transpose()?,
                    need[1].then(|| grad(&fv, flat)).transpose()?,
                ])
            },
        )?)
    }

    /// The gates' values end to end.
    fn flat(&self) -> Result<Tensor> {
        let parts = self
            .gates
            .iter()
            .map(|v| v.as_tensor().flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The gates back from their values end to end.
    fn unflatten(&self) -> impl Fn(&Tensor) -> candle_core::Result<Vec<Tensor>> + Send + Sync {
        let shapes: Vec<Vec<usize>> = self.gates.iter().map(|g| g.dims().to_vec()).collect();
        move |flat: &Tensor| {
            let mut at = 0;
            let mut gates = Vec::with_capacity(shapes.len());
            for s in &shapes {
                let k: usize = s.iter().product();
                gates.push(flat.narrow(0, at, k)?.reshape(s.as_slice())?);
                at += k;
            }
            Ok(gates)
        }
    }

    /// Whether a forward runs the chain on x's rows (the official form) rather than build dW:
    /// in training with dropout. Not for fewer rows than dW's chain (`min(in, out)`): the rows
    /// form runs both chains again in backward, for both gradients, about 8 chain passes
    /// against dW's 5 (measured: 0.8-0.95x at 256 rows against 384; docs/methods/quanta.md).
    fn on_rows(&self, ctx: &crate::Ctx) -> bool {
        ctx.is_train() && self.dropout > 0.0
    }

    /// dW for a forward under `ctx`: kept for inference while the gates hold (an unmerged
    /// evaluation otherwise runs every module's chain again on every forward).
    fn delta_for(&self, ctx: &crate::Ctx) -> Result<Tensor> {
        self.kept.get(ctx, &self.flat()?, || self.delta())
    }

    /// dW (out, in): the update applied to the first `in` unit vectors, transposed; or, where
    /// `out < in`, the transposed chain (gates transposed, in reverse order) applied to the
    /// first `out` unit vectors, which is dW's rows directly: the chain runs on min(in, out)
    /// rows. One graph node from the gates (flattened end to end) to dW whose backward rebuilds
    /// the chain with a graph and differentiates it, so a step keeps dW and the gates per
    /// module, none of the chain's intermediates (activation checkpointing for one op).
    fn delta(&self) -> Result<Tensor> {
        let dev = self.gates[0].device().clone();
        let (n, out, inp) = (self.n.clone(), self.out, self.inp);
        let p = self.width();
        let rows_out = out < inp;
        let eye =
            Tensor::eye(out.min(inp), DType::F32, &dev)?.pad_with_zeros(1, 0, p - out.min(inp))?;
        let frozen: Vec<Tensor> = self.frozen.iter().map(|v| v.as_tensor().detach()).collect();
        let base = chain(&n, &eye, &frozen, rows_out)?;
        let flat = self.flat()?;
        let unflat = self.unflatten();
        let build = std::sync::Arc::new(move |flat: &Tensor| -> candle_core::Result<Tensor> {
            let q = (chain(&n, &eye, &unflat(flat)?, rows_out)? - &base)?;
            if rows_out {
                return q.narrow(1, 0, inp)?.contiguous();
            }
            q.narrow(1, 0, out.min(p))?.t()?.contiguous()
        });
        let again = build.clone();
        Ok(petal_ops::lean::lean(
            &flat,
            |v| build(v),
            move |v, _, dy| {
                let var = Var::from_tensor(v)?;
                let y = again(var.as_tensor())?;
                let g = (y * dy.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
                match g.get(var.as_tensor()) {
                    Some(g) => Ok(g.clone()),
                    None => v.zeros_like(),
                }
            },
        )?)
    }
}

/// The gate chain on rows of P = Π n features: (rows, P) -> (rows, P), gates in the official
/// pair order; `transposed`: the transposed operator (each gate transposed, in reverse order).
fn chain(
    n: &[usize],
    x: &Tensor,
    gates: &[Tensor],
    transposed: bool,
) -> candle_core::Result<Tensor> {
    let d = n.len();
    let rows = x.dim(0)?;
    let width: usize = n.iter().product();
    let mut shape = vec![rows];
    shape.extend(n);
    let mut h = x.reshape(shape.as_slice())?;
    let mut steps: Vec<((usize, usize), &Tensor)> = pairs(d).zip(gates).collect();
    if transposed {
        steps.reverse();
    }
    for ((a, b), gate) in steps {
        // axes b and a (1-based after the row axis) to the end, in that order
        let (pa, pb) = (a + 1, b + 1);
        let mut perm: Vec<usize> = (0..=d).filter(|&i| i != pa && i != pb).collect();
        perm.extend([pb, pa]);
        let moved = h.permute(perm.as_slice())?;
        let lead: Vec<usize> = moved.dims()[..d - 1].to_vec();
        let m = n[a] * n[b];
        let g = gate.reshape((m, m))?;
        let flat = moved.contiguous()?.reshape((moved.elem_count() / m, m))?;
        // rows times G^T applies G to each row; rows times G applies G^T
        let y = if transposed {
            flat.matmul(&g)?
        } else {
            flat.matmul(&g.t()?)?
        };
        let mut dims = lead;
        dims.extend([n[b], n[a]]);
        let y = y.reshape(dims.as_slice())?;
        // back to the original axis order
        let mut inv = vec![0; d + 1];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i;
        }
        h = y.permute(inv.as_slice())?;
    }
    h.contiguous()?.reshape((rows, width))
}

impl AdapterLayer for QuantaLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        if !self.on_rows(ctx) {
            return add_dense_delta(x, y, &self.delta_for(ctx)?);
        }
        // the official form: the gate chain on the (dropped-out) input itself
        self.kept.clear();
        let x2 = flat_input(x)?.to_dtype(DType::F32)?;
        let x2 = crate::methods::lora::dropout(&x2, self.dropout, ctx)?;
        let d = self.apply(&x2)?.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        if self.on_rows(ctx) {
            return None;
        }
        dense_linear(ctx.kernels(), x, w, b, || Ok(Some(self.delta_for(ctx)?)))
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Add(self.delta()?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        self.named(&self.gates, false)
    }

    fn buffers(&self) -> Vec<NamedTensor<'_>> {
        self.named(&self.frozen, true)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl QuantaLayer {
    fn named<'a>(&'a self, vars: &'a [Var], frozen: bool) -> Vec<NamedTensor<'a>> {
        let d = self.n.len();
        (1..=d)
            .flat_map(|i| (i + 1..=d).map(move |j| (i, j)))
            .zip(vars)
            .map(|((i, j), var)| NamedTensor {
                name: gate_name(frozen, i, j),
                var,
            })
            .collect()
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("quanta", 1, 1.0, crate::testing::toy_targets());
    // P = 12: fc1 (12, 10) pads its input, fc2 (6, 12) cuts its output
    c.set("per_dim_features", serde_json::json!([3, 4]))
        .unwrap();
    c
}

#[cfg(test)]
fn conformance_three_axes() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("quanta", 1, 1.0, crate::testing::toy_targets());
    c.set("d", 3).unwrap();
    c
}

#[cfg(test)]
crate::conformance!(conformance, conformance_config, |_inp, _out, _cfg| {
    gate_values(&[3, 4])
});

#[cfg(test)]
crate::conformance!(three_axes, conformance_three_axes, |inp, out, cfg| {
    let o: QuantaOptions = cfg.options().unwrap();
    gate_values(&axes(&o, out, inp).unwrap())
});

#[cfg(test)]
#[path = "quanta_tests.rs"]
mod tests;

/// Over a quantized base: the update meets the blocks' product as it meets W dequantized.
#[test]
fn quanta_over_quantized_blocks_equals_quanta_over_them_dequantized() {
    let c = {
        let mut c = conformance_config();
        c.set("per_dim_features", serde_json::json!([4, 8]))
            .unwrap();
        c
    };
    crate::testing::check_over_quantized_blocks(&Quanta, &c, (12, 32), &|_| {});
}
