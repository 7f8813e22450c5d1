//! MoS, mixture of shards (Wang et al., ICLR 2025, arXiv 2410.00938, "MoS: Unleashing Parameter
//! Efficiency of Low-Rank Adaptation with Mixture of Shards"; code Forence1999/MoS, not read in
//! full): every layer's LoRA factors are assembled from shards of two global pools.
//!
//! Each layer has LoRA of rank r, `dW = (alpha / r) B A`. A row of A (length `in`) is the
//! concatenation of `in / s` shards of length `s = shard_len`, a column of B (length `out`) of
//! `out / s` shards. The first `private_rank` rows of A and columns of B are the layer's own
//! (shard privatisation); the others are gathered from the global pools `mos_A` and `mos_B`,
//! shared by every layer (inter-layer sharing), one pool per factor (pair dissociation), each layer
//! picking its shards by a fixed random index drawn without repeats (subset selection), each shard
//! chosen on its own (vector sharding). The pools hold `equivalent_rank - private_rank` ranks per
//! module, so the adapter trains what LoRA of rank `equivalent_rank` trains while every layer uses
//! rank r. A's pool and private rows start kaiming-uniform, B's at zero (identity). Mergeable.
//! petal's own adapter `peft_type: "MOS"`: `base_model.mos_A` (shards, s), `base_model.mos_B`
//! (shards, s), per module `mos_A_private` (p, in), `mos_B_private` (out, p) and the index
//! buffers `mos_A_index` (r - p, in / s), `mos_B_index` (r - p, out / s).

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, WeightUpdate,
};
use crate::config::{spec, AdapterConfig, Spec};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub struct Mos;

crate::method_options! {
    /// MoS's options.
    pub struct MosOptions {
        /// Rank every layer uses
        pub r: usize = 8,
        /// Scale numerator: the update is (alpha / r) B A
        pub lora_alpha: f64 = 16.0,
        /// Trained values as LoRA of this rank would have (the pools' size)
        pub equivalent_rank: usize = 2,
        /// Ranks per layer from the layer's own (private) shards
        pub private_rank: usize = 1,
        /// Shard length s (must divide every targeted module's in and out)
        pub shard_len: usize = 64,
        /// true: B starts at zero (identity); false: random (a testing switch)
        pub init_weights: bool = true,
    }
}

impl Mos {
    fn check_dims(o: &MosOptions, path: &str, out: usize, inp: usize) -> Result<()> {
        if !inp.is_multiple_of(o.shard_len) || !out.is_multiple_of(o.shard_len) {
            return Err(Error::config(
                "adapter config",
                "shard_len",
                format!(
                    "{} does not divide `{path}`'s in {inp} and out {out}: shards must tile every \
                     targeted module",
                    o.shard_len
                ),
            ));
        }
        Ok(())
    }
}

impl AdapterMethod for Mos {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // the shards' low-rank update is added to the base output; W is never read
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[("shard_len", "64")])
    }

    fn peft_type(&self) -> &'static str {
        "MOS"
    }

    fn options(&self) -> Spec {
        spec::<MosOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: MosOptions = cfg.options()?;
        let bad = |k: &str, m: String| Err(Error::config("adapter config", k, m));
        if o.r == 0 {
            return bad("r", "0 is out of range: r >= 1".into());
        }
        if o.shard_len == 0 {
            return bad("shard_len", "0 is out of range: shard_len >= 1".into());
        }
        if !(1..=o.r).contains(&o.equivalent_rank) {
            return bad(
                "equivalent_rank",
                format!("{} is out of range: 1..=r ({})", o.equivalent_rank, o.r),
            );
        }
        if o.private_rank >= o.equivalent_rank.min(o.r) && o.private_rank > 0 {
            return bad(
                "private_rank",
                format!(
                    "{} is out of range: below equivalent_rank ({}), so the pools hold something",
                    o.private_rank, o.equivalent_rank
                ),
            );
        }
        crate::config::finite("lora_alpha", o.lora_alpha, None)
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        // private rows and columns, the index buffers, and A and B assembled per step
        let o: MosOptions = cfg.options()?;
        let io = (dims.inp + dims.out) as u64;
        Ok((o.private_rank as u64 + 2 * o.r as u64) * io)
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: MosOptions = cfg.options()?;
        let (out, inp) = (base.out_features, base.in_features);
        Self::check_dims(&o, path, out, inp)?;
        let (s, p, shared) = (o.shard_len, o.private_rank, o.r - o.private_rank);
        let sh = base.shared;
        let dev = base.weight.device();
        // the pools: (equivalent_rank - p) ranks of every targeted module, in shards
        let (na, nb) = (
            (o.equivalent_rank - p) * sh.sum_in / s,
            (o.equivalent_rank - p) * sh.sum_out / s,
        );
        let pool_seed = seed ^ 0x6d6f73; // the first layer's seed makes the pools
        let pool_a = sh.get_or_init("mos_A", || {
            let mut g = rand::rngs::StdRng::seed_from_u64(pool_seed);
            let bound = 1.0 / (sh.max_in.max(1) as f64).sqrt();
            uniform((na.max(1), s), bound, &mut g, dev)
        })?;
        let pool_b = sh.get_or_init("mos_B", || {
            if o.init_weights {
                Ok(Tensor::zeros((nb.max(1), s), DType::F32, dev)?)
            } else {
                let mut g = rand::rngs::StdRng::seed_from_u64(pool_seed ^ 1);
                uniform((nb.max(1), s), 0.5, &mut g, dev)
            }
        })?;
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let priv_a = crate::methods::kaiming_uniform((p, inp), &mut g, dev)?;
        let priv_b = if o.init_weights {
            Tensor::zeros((out, p), DType::F32, dev)?
        } else {
            uniform((out, p), 0.5, &mut g, dev)?
        };
        let idx_a = pick(na.max(1), shared * (inp / s), &mut g);
        let idx_b = pick(nb.max(1), shared * (out / s), &mut g);
        Ok(Box::new(MosLayer {
            pool_a,
            pool_b,
            priv_a: Var::from_tensor(&priv_a)?,
            priv_b: Var::from_tensor(&priv_b)?,
            idx_a: Var::from_tensor(&Tensor::from_vec(idx_a, (shared, inp / s), dev)?)?,
            idx_b: Var::from_tensor(&Tensor::from_vec(idx_b, (shared, out / s), dev)?)?,
            scale: o.lora_alpha / o.r as f64,
            out,
            inp,
        }))
    }
}

/// U(-bound, bound) values.
fn uniform(
    shape: (usize, usize),
    bound: f64,
    g: &mut impl rand::Rng,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| g.gen_range(-bound..bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// `n` shard ids from a pool of `pool`: without repeats while the pool lasts, then again.
fn pick(pool: usize, n: usize, g: &mut impl rand::Rng) -> Vec<i64> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let take = (n - out.len()).min(pool);
        out.extend(
            rand::seq::index::sample(g, pool, take)
                .into_iter()
                .map(|i| i as i64),
        );
    }
    out
}

#[derive(Debug)]
struct MosLayer {
    pool_a: Var, // shared (shards, s)
    pool_b: Var, // shared (shards, s)
    priv_a: Var, // (p, in)
    priv_b: Var, // (out, p)
    idx_a: Var,  // (r - p, in / s) int64
    idx_b: Var,  // (r - p, out / s) int64
    scale: f64,
    out: usize,
    inp: usize,
}

impl MosLayer {
    /// A (r, in) and B (out, r), assembled from the private rows and the pools' shards.
    fn factors(&self) -> Result<(Tensor, Tensor)> {
        let gather = |pool: &Var, idx: &Var, len: usize| -> Result<Tensor> {
            let (rows, _) = idx.as_tensor().dims2()?;
            let flat = idx.as_tensor().flatten_all()?;
            Ok(pool
                .as_tensor()
                .index_select(&flat, 0)?
                .reshape((rows, len))?)
        };
        let a_shared = gather(&self.pool_a, &self.idx_a, self.inp)?; // (r - p, in)
        let b_shared = gather(&self.pool_b, &self.idx_b, self.out)?.t()?; // (out, r - p)
        let a = Tensor::cat(&[self.priv_a.as_tensor(), &a_shared], 0)?;
        let b = Tensor::cat(&[self.priv_b.as_tensor(), &b_shared], 1)?;
        Ok((a, b.contiguous()?))
    }
}

impl AdapterLayer for MosLayer {
    fn forward(&self, x: &Tensor, y: Tensor, _ctx: &crate::Ctx) -> Result<Tensor> {
        let (a, b) = self.factors()?;
        let x2 = crate::methods::flat_input(x)?;
        let d = crate::methods::low_rank(&x2, &a, &b, self.scale)?;
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        let run = || -> Result<Tensor> {
            let (fa, fb) = self.factors()?;
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
        let (a, b) = self.factors()?;
        Ok(WeightUpdate::Add((b.matmul(&a)? * self.scale)?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "mos_A_private",
                var: &self.priv_a,
            },
            NamedTensor {
                name: "mos_B_private",
                var: &self.priv_b,
            },
        ]
    }

    fn buffers(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "mos_A_index",
                var: &self.idx_a,
            },
            NamedTensor {
                name: "mos_B_index",
                var: &self.idx_b,
            },
        ]
    }

    fn shared_trained(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "mos_A",
                var: &self.pool_a,
            },
            NamedTensor {
                name: "mos_B",
                var: &self.pool_b,
            },
        ]
    }

    fn check_loaded(&self) -> Result<()> {
        for (name, idx, pool) in [
            ("mos_A_index", &self.idx_a, &self.pool_a),
            ("mos_B_index", &self.idx_b, &self.pool_b),
        ] {
            let n = pool.dim(0)? as i64;
            let v = idx.as_tensor().flatten_all()?.to_vec1::<i64>()?;
            if let Some(i) = v.iter().find(|&&i| i < 0 || i >= n) {
                return Err(Error::msg(format!(
                    "`{name}` holds {i}: shard ids must be in 0..{n} (the pool's shards)"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("mos", 1, 1.0, crate::testing::toy_targets());
    c.set("r", 4).unwrap();
    c.set("lora_alpha", 6.0).unwrap();
    c.set("equivalent_rank", 2).unwrap();
    c.set("private_rank", 1).unwrap();
    c.set("shard_len", 2).unwrap();
    c
}

// Per module the private rank's rows and columns; the pools (one rank of every module, in
// shards of 2) counted once, with fc1: (10 + 12) + (12 + 6) values.
#[cfg(test)]
crate::conformance!(conformance, conformance_config, |inp, out, _cfg| {
    (inp + out) + if inp == 10 { 10 + 12 + 12 + 6 } else { 0 }
});

#[cfg(test)]
mod oracle {
    use super::*;

    /// dW and the gradients of the pools and private factors against
    /// `tools/golden/mos_oracle.py`, a PyTorch transcription of the paper's assembly.
    #[test]
    fn the_assembled_update_and_its_gradients_equal_the_transcription() {
        let t = crate::testing::golden_fixture("mos");
        let v = |k: &str| Var::from_tensor(&t[k]).unwrap();
        let layer = MosLayer {
            pool_a: v("pool_a"),
            pool_b: v("pool_b"),
            priv_a: v("priv_a"),
            priv_b: v("priv_b"),
            idx_a: v("idx_a"),
            idx_b: v("idx_b"),
            scale: 6.0 / 4.0,
            out: 6,
            inp: 8,
        };
        layer.check_loaded().unwrap();
        let WeightUpdate::Add(dw) = layer.weight_update().unwrap() else {
            panic!("additive")
        };
        let e = crate::testing::max_rel(&dw, &t["delta"]);
        assert!(e < 1e-5, "dW {e:e}");
        let g = (dw * &t["proj"])
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (var, want) in [
            (&layer.pool_a, "dpool_a"),
            (&layer.pool_b, "dpool_b"),
            (&layer.priv_a, "dpriv_a"),
            (&layer.priv_b, "dpriv_b"),
        ] {
            let e = crate::testing::max_rel(g.get(var.as_tensor()).unwrap(), &t[want]);
            assert!(e < 1e-5, "{want}: {e:e}");
        }
    }

    #[test]
    fn shards_that_do_not_tile_a_module_and_bad_ranks_are_refused() {
        let mut c = conformance_config();
        c.set("shard_len", 4).unwrap(); // fc1 has in 10
        let mut t = crate::testing::Toy::new();
        let e = crate::inject_adapter(&mut t, "default", &c, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shard_len") && e.contains("10"), "{e}");
        for (key, v) in [
            ("equivalent_rank", 5),
            ("equivalent_rank", 0),
            ("private_rank", 2),
        ] {
            let mut c = conformance_config();
            c.set(key, v).unwrap();
            assert!(
                Mos.validate(&c).unwrap_err().to_string().contains(key),
                "{key}"
            );
        }
    }
}

/// Over a quantized base: the update meets the blocks' product as it meets W dequantized.
#[test]
fn mos_over_quantized_blocks_equals_mos_over_them_dequantized() {
    let c = conformance_config();
    crate::testing::check_over_quantized_blocks(&Mos, &c, (12, 32), &|_| {});
}
