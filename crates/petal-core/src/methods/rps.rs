//! Randomised parameter sharing as an adapter (ROAST, Desai et al., 2022; STABLE-RPS, Desai and
//! Shrivastava, ICLR 2024, "In defense of parameter sharing for model compression"; no official
//! code found): every entry of every dW is read from one small shared trained array M through
//! hashed tiles with sign hashes.
//!
//! For the targeted linear at position `offset` among the targeted weights laid end to end, its
//! dW flattened row-major is cut into tiles of `tile` entries; the tile whose first entry is at
//! global position p (= offset + t tile) starts at `h = splitmix(seed ^ splitmix(p)) mod m` in M
//! (an index past M wraps), and its entry j is `dW = σ M[(h + j) mod m]`, the sign `σ = ±1` bit 0
//! of `splitmix(seed ^ splitmix(!q))` for the entry's global position q (`!` the bitwise not).
//! splitmix is SplitMix64's finaliser (`crate::rng::splitmix`). M starts at zero
//! (identity). M's gradient is the scatter-add of σ dL/dW over the entries that read each slot.
//! Mergeable. petal's own adapter `peft_type: "RPS"`: `base_model.rps_weights` (m) and the seed
//! in the config.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, WeightUpdate,
};
use crate::config::{spec, AdapterConfig, Spec};
use crate::methods::{add_dense_delta, dense_linear, KeptDelta};
use crate::rng::splitmix;
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub const WEIGHTS: &str = "rps_weights";

pub struct Rps;

crate::method_options! {
    /// The shared-array adapter's options.
    pub struct RpsOptions {
        /// Values in the shared array M (the adapter's whole budget)
        pub budget: usize = 100_000,
        /// Entries of dW read from consecutive slots of M (ROAST's tiles)
        pub tile: usize = 64,
        /// Seed of the hashes (saved; the mapping is regenerated from it)
        pub hash_seed: u64 = 0,
        /// true: M starts at zero (identity); false: random (a testing switch)
        pub init_weights: bool = true,
    }
}

/// The slot and sign of every entry of a (out, in) linear at `offset`, row-major.
pub fn mapping(o: &RpsOptions, offset: usize, numel: usize) -> (Vec<u32>, Vec<f32>) {
    let m = o.budget as u64;
    let tile = o.tile.max(1);
    let mut slots = Vec::with_capacity(numel);
    let mut signs = Vec::with_capacity(numel);
    for i in 0..numel {
        let (t, j) = (i / tile, i % tile);
        let start = splitmix(o.hash_seed ^ splitmix((offset + t * tile) as u64)) % m;
        slots.push(((start + j as u64) % m) as u32);
        let s = splitmix(o.hash_seed ^ splitmix(!((offset + i) as u64))) & 1;
        signs.push(if s == 1 { 1.0 } else { -1.0 });
    }
    (slots, signs)
}

impl AdapterMethod for Rps {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // the update is added to the base output; W is never read
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn peft_type(&self) -> &'static str {
        "RPS"
    }

    fn options(&self) -> Spec {
        spec::<RpsOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: RpsOptions = cfg.options()?;
        if o.budget == 0 || o.budget > u32::MAX as usize {
            return Err(Error::config(
                "adapter config",
                "budget",
                format!("{} is out of range: 1..={}", o.budget, u32::MAX),
            ));
        }
        if o.tile == 0 {
            return Err(Error::config(
                "adapter config",
                "tile",
                "0 is out of range: tile >= 1",
            ));
        }
        Ok(())
    }

    fn layer_values(&self, _cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        // slots and signs of every entry, and the dense dW a step builds
        Ok(3 * dims.full())
    }

    fn shared_values(&self, cfg: &AdapterConfig, _dims: &ModuleDims) -> Result<u64> {
        Ok(cfg.options::<RpsOptions>()?.budget as u64)
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        _path: &str,
        base: &BaseLinear,
        _seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: RpsOptions = cfg.options()?;
        let (out, inp) = (base.out_features, base.in_features);
        let dev = base.weight.device();
        let sh = base.shared;
        let weights = sh.get_or_init(WEIGHTS, || {
            if o.init_weights {
                Ok(Tensor::zeros(o.budget, DType::F32, dev)?)
            } else {
                let mut g = rand::rngs::StdRng::seed_from_u64(o.hash_seed ^ 0x5a5a);
                Ok(crate::methods::normal((1, o.budget), 0.3, &mut g, dev)?.reshape(o.budget)?)
            }
        })?;
        let offset = sh.claim(out * inp);
        let (slots, signs) = mapping(&o, offset, out * inp);
        Ok(Box::new(RpsLayer {
            weights,
            slots: Tensor::from_vec(slots, out * inp, dev)?,
            signs: Tensor::from_vec(signs, (out, inp), dev)?,
            out,
            inp,
            kept: KeptDelta::default(),
        }))
    }
}

#[derive(Debug)]
struct RpsLayer {
    weights: Var,  // shared M (m,)
    slots: Tensor, // (out in,) u32
    signs: Tensor, // (out, in) ±1
    out: usize,
    inp: usize,
    /// Inference's dW.
    kept: KeptDelta,
}

impl RpsLayer {
    /// dW = σ ⊙ M[slots] (autograd's backward of the gather is M's scatter-add).
    /// dW for a forward under `ctx` (kept for inference).
    fn delta_for(&self, ctx: &crate::Ctx) -> Result<Tensor> {
        self.kept
            .get(ctx, self.weights.as_tensor(), || self.delta())
    }

    fn delta(&self) -> Result<Tensor> {
        let g = self.weights.as_tensor().index_select(&self.slots, 0)?;
        Ok((g.reshape((self.out, self.inp))? * &self.signs)?)
    }
}

impl AdapterLayer for RpsLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        add_dense_delta(x, y, &self.delta_for(ctx)?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        dense_linear(ctx.kernels(), x, w, b, || Ok(Some(self.delta_for(ctx)?)))
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Add(self.delta()?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        Vec::new()
    }

    fn shared_trained(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: WEIGHTS,
            var: &self.weights,
        }]
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("rps", 1, 1.0, crate::testing::toy_targets());
    c.set("budget", 23).unwrap();
    c.set("tile", 5).unwrap();
    c
}

// M is shared: counted once, with fc1 (whose input is 10).
#[cfg(test)]
crate::conformance!(conformance, conformance_config, |inp, _out, _cfg| {
    if inp == 10 {
        23
    } else {
        0
    }
});

#[cfg(test)]
mod oracle {
    use super::*;
    use candle_core::Device;

    /// dW and M's gradient against `tools/golden/rps_oracle.py`, a NumPy transcription of the
    /// mapping as documented above (tiles, wrap, signs) and of ROAST's gather and scatter-add,
    /// written apart from this file.
    #[test]
    fn the_update_and_the_shared_gradient_equal_the_transcription() {
        let t = crate::testing::golden_fixture("rps");
        let o = RpsOptions {
            budget: 50,
            tile: 8,
            hash_seed: 7,
            init_weights: true,
        };
        let m = Var::from_tensor(&t["m"]).unwrap();
        let mut grads: Option<Tensor> = None;
        let mut offset = 0;
        for (name, out, inp) in [("a", 6, 10), ("b", 9, 4)] {
            let (slots, signs) = mapping(&o, offset, out * inp);
            offset += out * inp;
            let layer = RpsLayer {
                weights: m.clone(),
                slots: Tensor::from_vec(slots, out * inp, &Device::Cpu).unwrap(),
                signs: Tensor::from_vec(signs, (out, inp), &Device::Cpu).unwrap(),
                out,
                inp,
                kept: KeptDelta::default(),
            };
            let dw = layer.delta().unwrap();
            let e = crate::testing::max_rel(&dw, &t[&format!("{name}.delta")]);
            assert!(e < 1e-6, "{name}: dW {e:e}");
            let g = (dw * &t[&format!("{name}.proj")])
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gm = g.get(m.as_tensor()).unwrap().clone();
            grads = Some(match grads {
                Some(a) => (a + gm).unwrap(),
                None => gm,
            });
        }
        let e = crate::testing::max_rel(&grads.unwrap(), &t["dm"]);
        assert!(e < 1e-5, "dL/dM {e:e}");
    }

    #[test]
    fn a_zero_budget_or_tile_is_refused_naming_the_option() {
        for key in ["budget", "tile"] {
            let mut c = conformance_config();
            c.set(key, 0).unwrap();
            assert!(Rps.validate(&c).unwrap_err().to_string().contains(key));
        }
    }
}

/// Over a quantized base: the update meets the blocks' product as it meets W dequantized.
#[test]
fn rps_over_quantized_blocks_equals_rps_over_them_dequantized() {
    let c = conformance_config();
    crate::testing::check_over_quantized_blocks(&Rps, &c, (12, 32), &|_| {});
}
