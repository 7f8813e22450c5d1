//! LoKr: a Kronecker-product update (Yeh et al., 2024, "Navigating Text-To-Image Customization:
//! From LyCORIS Fine-Tuning to Model Evaluation"; KronA, Edalati et al., 2022), as LyCORIS and
//! PEFT implement it (PEFT `tuners/lokr/layer.py`, linear layers).
//!
//! `dW = s * W1 ⊗ W2` with out = a·b, in = c·d split by `factorization` (divisors near the
//! square root, or around `decompose_factor`), `W1 (a, c)`, `W2 (b, d)`, `s = alpha / r`.
//! W2 is itself low rank, `W2a (b, r) W2b (r, d)`, unless r >= max(b, d)/2; W1 likewise only
//! with `decompose_both`. Init (`init_weights = true`): W1 (or W1a) = 0, the rest
//! kaiming-uniform, so dW = 0; `false`: all random. Saved as `lokr_w1` | `lokr_w1_a`,
//! `lokr_w1_b`, and `lokr_w2` | `lokr_w2_a`, `lokr_w2_b`.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, Flag, NamedTensor, NewAdapter, WeightUpdate,
};
use crate::config::{spec, AdapterConfig, InitWeights, RankValue, Spec};
use crate::methods::{
    add_dense_delta, alpha_for, check_lycoris, dense_linear, init_nonzero, param, rank_for,
    LycorisDropout,
};
use crate::Result;
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use std::collections::BTreeMap;

pub struct Lokr;

crate::method_options! {
    /// LoKr's options (PEFT `LoKrConfig`).
    pub struct LokrOptions {
        /// Rank of the low-rank factors (a factor is kept whole when r is at least half its size)
        pub r: usize = 8,
        /// Scale numerator: dW is scaled by alpha / r
        pub alpha: f64 = 8.0,
        /// true: the left factor starts at zero (dW = 0); false: random
        pub init_weights: InitWeights = InitWeights::Flag(true),
        /// Drop rows of dW in training with this probability
        pub rank_dropout: f64 = 0.0,
        /// Skip the adapter for a forward call with this probability
        pub module_dropout: f64 = 0.0,
        /// Rescale the kept rows under rank dropout (petal's training default: on)
        pub rank_dropout_scale: bool = false,
        /// Also factor the left Kronecker factor into two low-rank matrices
        pub decompose_both: bool = false,
        /// Split dimensions around this divisor (-1: near the square root)
        pub decompose_factor: i64 = -1,
        /// Ranks per module
        pub rank_pattern: BTreeMap<String, RankValue> = BTreeMap::new(),
        /// Alphas per module
        pub alpha_pattern: BTreeMap<String, f64> = BTreeMap::new(),
    }
}

/// One Kronecker factor: a full matrix or the product of two low-rank ones.
#[derive(Debug)]
enum Factor {
    Full(Var),
    LowRank(Var, Var),
}

impl Factor {
    fn matrix(&self) -> Result<Tensor> {
        Ok(match self {
            Factor::Full(w) => w.as_tensor().clone(),
            Factor::LowRank(a, b) => a.as_tensor().matmul(b.as_tensor())?,
        })
    }
}

#[derive(Debug)]
pub struct LokrLayer {
    w1: Factor,
    w2: Factor,
    scaling: f64,
    drop: LycorisDropout,
}

/// `s · x (W1 ⊗ W2)ᵀ` on rows of x (.., c d), as (rows, a b) in f32: each row read as a (c, d)
/// matrix X gives `W1 X W2ᵀ`, an (a, b) matrix whose row-major values are the row's update. A
/// row costs `b c (a + d)` products against dW's `a b c d`, and no (out, in) gradient of dW is
/// ever formed.
fn kron_rows(x: &Tensor, w1: &Tensor, w2: &Tensor, s: f64) -> candle_core::Result<Tensor> {
    let ((a, c), (b, d)) = (w1.dims2()?, w2.dims2()?);
    let n = x.elem_count() / (c * d);
    let p = x
        .to_dtype(DType::F32)?
        .reshape((n * c, d))?
        .matmul(&w2.t()?)?; // X W2ᵀ, (n c, b)
    let p = p.reshape((n, c, b))?.transpose(1, 2)?.contiguous()?;
    let u = p.reshape((n * b, c))?.matmul(&w1.t()?)?; // (W1 X W2ᵀ)ᵀ, (n b, a)
    let u = u.reshape((n, b, a))?.transpose(1, 2)?.contiguous()?;
    u.reshape((n, a * b))? * s
}

/// [`kron_rows`]' gradients from `dy` (rows, a b), each row G (a, b): with `Q = W1ᵀ G`,
/// `dX = s Q W2`, `dW1 = s Σ G (X W2ᵀ)ᵀ`, `dW2 = s Σ Qᵀ X`.
fn kron_grads(
    x: &Tensor,
    w1: &Tensor,
    w2: &Tensor,
    s: f64,
    need: [bool; 3],
    dy: &Tensor,
) -> candle_core::Result<[Option<Tensor>; 3]> {
    let ((a, c), (b, d)) = (w1.dims2()?, w2.dims2()?);
    let n = x.elem_count() / (c * d);
    let xf = x.to_dtype(DType::F32)?.reshape((n * c, d))?;
    let g = dy.to_dtype(DType::F32)?.reshape((n, a, b))?;
    // Q for every row, (n c, b): Gᵀ W1 = Qᵀ, row by row
    let q = g
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * b, a))?
        .matmul(w1)?;
    let q = q
        .reshape((n, b, c))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * c, b))?;
    let dx = need[0]
        .then(|| (q.matmul(w2)? * s)?.to_dtype(x.dtype())?.reshape(x.shape()))
        .transpose()?;
    let dw1 = need[1]
        .then(|| {
            let p = xf.matmul(&w2.t()?)?.reshape((n, c, b))?; // X W2ᵀ
            let p = p.transpose(1, 2)?.contiguous()?.reshape((n * b, c))?;
            let ga = g.permute((1, 0, 2))?.contiguous()?.reshape((a, n * b))?;
            ga.matmul(&p)? * s
        })
        .transpose()?;
    let dw2 = need[2].then(|| q.t()?.matmul(&xf)? * s).transpose()?;
    Ok([dx, dw1, dw2])
}

/// PEFT's (LyCORIS's) `factorization`: dimension = m * n with m <= n, m as close to `factor`
/// (or to the square root when -1) as the divisors allow.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension % factor as usize == 0 {
        let m = factor as usize;
        return (m, dimension / m);
    }
    let factor = if factor == -1 {
        dimension
    } else {
        factor.max(0) as usize
    };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while dimension % new_m != 0 {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (m, n) = (n, m);
    }
    (m, n)
}

impl AdapterMethod for Lokr {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // a term next to the base output
    }

    fn peft_type(&self) -> &'static str {
        "LOKR"
    }

    fn options(&self) -> Spec {
        spec::<LokrOptions>()
    }

    fn writes_layer_selection(&self) -> bool {
        true
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: LokrOptions = cfg.options()?;
        check_lycoris(o.r, o.rank_dropout, o.module_dropout, &o.init_weights)
    }

    fn flags(&self) -> Vec<Flag> {
        vec![
            Flag::new("rank-dropout", "rank_dropout"),
            Flag::new("module-dropout", "module_dropout"),
            Flag::new("decompose-factor", "decompose_factor"),
            Flag::new("decompose-both", "decompose_both"),
        ]
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        // petal rescales the kept rows under rank dropout unless told otherwise (PEFT: off)
        let o: LokrOptions = cfg.options()?;
        if o.rank_dropout > 0.0 && !new.given("rank_dropout_scale") {
            cfg.set("rank_dropout_scale", true)?;
        }
        Ok(())
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: LokrOptions = cfg.options()?;
        let r = rank_for(o.r, &o.rank_pattern, path);
        let (c, d) = factorization(base.in_features, o.decompose_factor);
        let (a, b) = factorization(base.out_features, o.decompose_factor);
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let zero = !init_nonzero(&o.init_weights);
        let use_w1 = !(o.decompose_both && (r as f64) < a.max(c) as f64 / 2.0);
        let use_w2 = (r as f64) >= b.max(d) as f64 / 2.0;
        let w1 = if use_w1 {
            Factor::Full(param((a, c), zero, &mut g, dev)?)
        } else {
            Factor::LowRank(
                param((a, r), zero, &mut g, dev)?,
                param((r, c), false, &mut g, dev)?,
            )
        };
        let w2 = if use_w2 {
            Factor::Full(param((b, d), false, &mut g, dev)?)
        } else {
            Factor::LowRank(
                param((b, r), false, &mut g, dev)?,
                param((r, d), false, &mut g, dev)?,
            )
        };
        Ok(Box::new(LokrLayer {
            w1,
            w2,
            scaling: alpha_for(o.alpha, &o.alpha_pattern, path) / r as f64,
            drop: LycorisDropout {
                rank: o.rank_dropout,
                module: o.module_dropout,
                scale: o.rank_dropout_scale,
            },
        }))
    }
}

impl LokrLayer {
    /// dW = s * kron(W1, W2), (a*b, c*d) = (out, in), in f32.
    fn delta(&self) -> Result<Tensor> {
        let (w1, w2) = (self.w1.matrix()?, self.w2.matrix()?);
        let ((a, c), (b, d)) = (w1.dims2()?, w2.dims2()?);
        let k = w1
            .reshape((a, 1, c, 1))?
            .broadcast_mul(&w2.reshape((1, b, 1, d))?)?; // (a, b, c, d)
        Ok((k.reshape((a * b, c * d))? * self.scaling)?)
    }

    /// `y + s · x dWᵀ` without dW ([`kron_rows`]): one graph node over x, y and the two
    /// factors (end to end in one tensor) whose backward ([`kron_grads`]) keeps none of its
    /// products, nor the update apart from y.
    fn kron_add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let (w1, w2) = (self.w1.matrix()?, self.w2.matrix()?);
        let (s, d1, d2) = (self.scaling, w1.dims2()?, w2.dims2()?);
        let flat = Tensor::cat(&[w1.flatten_all()?, w2.flatten_all()?], 0)?;
        let split = move |flat: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
            let n1 = d1.0 * d1.1;
            Ok((
                flat.narrow(0, 0, n1)?.reshape(d1)?,
                flat.narrow(0, n1, d2.0 * d2.1)?.reshape(d2)?,
            ))
        };
        Ok(petal_ops::lean::lean3(
            [x, y, &flat],
            |[x, y, flat]| {
                let (w1, w2) = split(flat)?;
                let d = kron_rows(x, &w1, &w2, s)?.reshape(y.shape())?;
                y + d.to_dtype(y.dtype())?
            },
            move |[x, _, flat], need, _, dy| {
                let (w1, w2) = split(flat)?;
                let rows = dy.reshape((dy.elem_count() / (d1.0 * d2.0), d1.0 * d2.0))?;
                let [dx, dw1, dw2] =
                    kron_grads(x, &w1, &w2, s, [need[0], need[2], need[2]], &rows)?;
                let dflat = match (dw1, dw2) {
                    (Some(a), Some(b)) => {
                        Some(Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?)
                    }
                    _ => None,
                };
                Ok([dx, need[1].then(|| dy.clone()), dflat])
            },
        )?)
    }

    /// Whether this forward takes the Kronecker form: not where training drops rows of dW or
    /// the whole adapter (the dense form draws those masks).
    fn kron_form(&self, ctx: &crate::Ctx) -> bool {
        !(ctx.is_train() && (self.drop.rank > 0.0 || self.drop.module > 0.0))
    }
}

impl AdapterLayer for LokrLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        if self.kron_form(ctx) {
            return self.kron_add(x, &y);
        }
        match self.drop.apply(ctx, || self.delta())? {
            Some(d) => add_dense_delta(x, y, &d),
            None => Ok(y),
        }
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        if self.kron_form(ctx) {
            return None; // `forward`'s Kronecker form beats folding dW into W
        }
        dense_linear(ctx.kernels(), x, w, b, || {
            self.drop.apply(ctx, || self.delta())
        })
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Add(self.delta()?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let mut v = Vec::new();
        match &self.w1 {
            Factor::Full(w) => v.push(NamedTensor {
                name: "lokr_w1",
                var: w,
            }),
            Factor::LowRank(a, b) => {
                v.push(NamedTensor {
                    name: "lokr_w1_a",
                    var: a,
                });
                v.push(NamedTensor {
                    name: "lokr_w1_b",
                    var: b,
                });
            }
        }
        match &self.w2 {
            Factor::Full(w) => v.push(NamedTensor {
                name: "lokr_w2",
                var: w,
            }),
            Factor::LowRank(a, b) => {
                v.push(NamedTensor {
                    name: "lokr_w2_a",
                    var: a,
                });
                v.push(NamedTensor {
                    name: "lokr_w2_b",
                    var: b,
                });
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn factorization_matches_peft_docstring_examples() {
        // From PEFT's `factorization` docstring and hand-run cases.
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        assert_eq!(factorization(48, -1), (6, 8));
    }

    #[test]
    fn the_kronecker_update_has_the_block_structure_of_w1_times_w2() {
        let w1 = Var::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let w2 = Var::new(&[[0f32, 1., 5.]], &Device::Cpu).unwrap();
        let l = LokrLayer {
            w1: Factor::Full(w1),
            w2: Factor::Full(w2),
            scaling: 2.0,
            drop: LycorisDropout {
                rank: 0.0,
                module: 0.0,
                scale: false,
            },
        };
        let k = l.delta().unwrap().to_vec2::<f32>().unwrap();
        // kron([[1,2],[3,4]], [[0,1,5]]) = [[0,1,5,0,2,10],[0,3,15,0,4,20]], times 2
        assert_eq!(
            k,
            vec![
                vec![0., 2., 10., 0., 4., 20.],
                vec![0., 6., 30., 0., 8., 40.]
            ]
        );
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    // r = 2 < max(b, d)/2 on both toy linears, so W2 is low rank; fc2 gets its own alpha
    let mut c = AdapterConfig::for_method("LOKR", 2, 5.0, crate::testing::toy_targets());
    c.set("alpha_pattern", serde_json::json!({"fc2": 3.0}))
        .unwrap();
    c
}

#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |inp, out, cfg: &AdapterConfig| {
        let ((c, d), (a, b)) = (factorization(inp, -1), factorization(out, -1));
        let w2 = if crate::testing::opt_usize(cfg, "r") as f64 >= b.max(d) as f64 / 2.0 {
            b * d
        } else {
            crate::testing::opt_usize(cfg, "r") * (b + d)
        };
        a * c + w2
    }
);
