//! The seam: an adapter is a function of the frozen base weight.

use crate::{AdapterConfig, Result};
use candle_core::{Tensor, Var};
use std::fmt::Debug;

mod input;
pub use input::{InputAdapter, InputShape};

/// How an adapter changes the frozen base weight W (out, in). `AdaptableLinear` applies and
/// inverts it; methods never mutate base weights themselves.
#[derive(Debug, Clone)]
pub enum WeightUpdate {
    /// W + dW: LoRA, LoHa, LoKr, VeRA, sparse deltas.
    Add(Tensor),
    /// `W' = (W R^T) ⊙ s`: the input rotated by R (in, in) before W, then an optional
    /// per-output scale s (out, 1): OFT, BOFT. The bias is left as it is. `r_inv` is R^-1, given
    /// by the method (R is only nearly orthogonal under the Cayley-Neumann series).
    Rotate {
        r: Tensor,
        r_inv: Tensor,
        s: Option<Tensor>,
    },
    /// `W' = M W`, `b' = M b`: the output transformed by M (out, out): RoAd. `m_inv` = M^-1.
    Transform { m: Tensor, m_inv: Tensor },
    /// `W + dW`, `b + db`: an additive update that also moves the bias (LoRA with a trained
    /// bias, `bias = "all" | "lora_only"`).
    AddBias { dw: Option<Tensor>, db: Tensor },
    /// W and b replaced by trained copies (`modules_to_save`); the inverse restores the old.
    Replace {
        w: Tensor,
        b: Option<Tensor>,
        old_w: Tensor,
        old_b: Option<Tensor>,
    },
    /// W * l (l broadcast over rows or columns): IA3-style scaling.
    Scale(Tensor),
    /// `W' = diag(s) W`, `b' = s ⊙ b + t` for s and t (out,): an affine map of the output
    /// (SSF's scale and shift); a linear without a bias gets `t`.
    Affine { scale: Tensor, shift: Tensor },
}

/// A tensor an adapter layer owns, under its PEFT name relative to the module
/// (e.g. "lora_A.weight").
pub struct NamedTensor<'a> {
    pub name: &'static str,
    pub var: &'a Var,
}

/// Frozen base of one targeted linear, as seen by a method when it builds its layer.
pub struct BaseLinear<'a> {
    pub weight: &'a Tensor,       // (out, in)
    pub bias: Option<&'a Tensor>, // (out)
    pub in_features: usize,
    pub out_features: usize,
    /// What this adapter's layers share across the model.
    pub shared: &'a Shared,
    /// The module is a token embedding: `weight` is (vocab, hidden), the input is ids, and
    /// `in_features` = vocab, `out_features` = hidden.
    pub embedding: bool,
    /// The weight is kept quantized: `weight` is its raw blocks (`petal_ops::quant`), which
    /// only [`crate::linear::frozen_xwt`] multiplies by.
    pub quant: Option<petal_ops::quant::QFormat>,
}

impl<'a> BaseLinear<'a> {
    /// The base of a model's linear, with what the adapter's layers share.
    pub fn of(lin: &'a crate::AdaptableLinear, shared: &'a Shared) -> Self {
        BaseLinear {
            weight: lin.weight(),
            bias: lin.bias(),
            in_features: lin.in_features(),
            out_features: lin.out_features(),
            shared,
            embedding: lin.is_embedding(),
            quant: lin.quant(),
        }
    }
}

/// The sizes of one targeted linear (`out`, `inp`) and the largest over the adapter's targets,
/// as the memory estimate (`AdapterMethod::layer_values`) sees them.
#[derive(Debug, Clone, Copy)]
pub struct ModuleDims {
    pub out: usize,
    pub inp: usize,
    pub max_in: usize,
    pub max_out: usize,
}

impl ModuleDims {
    /// A full (out, in) matrix and a bias.
    pub fn full(&self) -> u64 {
        (self.out as u64) * (self.inp as u64) + self.out as u64
    }

    /// Two rank-`r` factors, (r, in) and (out, r), as saturating arithmetic (a rank read from
    /// a file may be absurd).
    pub fn low_rank(&self, r: usize) -> u64 {
        (r as u64).saturating_mul(self.inp as u64 + self.out as u64)
    }
}

/// State the layers of one adapter share across the model (VeRA's frozen random projections):
/// made by the first layer that asks for it and handed to the others.
#[derive(Debug, Default)]
pub struct Shared {
    /// Largest `in_features` and `out_features` over the targeted linears.
    pub max_in: usize,
    pub max_out: usize,
    /// Weights over all targeted linears (`Σ out in`), and their `Σ in`, `Σ out`.
    pub numel: usize,
    pub sum_in: usize,
    pub sum_out: usize,
    vars: std::sync::Mutex<Vec<(&'static str, Var)>>,
    /// Weights of the layers built so far (`claim`).
    claimed: std::sync::atomic::AtomicUsize,
}

impl Shared {
    pub fn new(max_in: usize, max_out: usize) -> Self {
        Shared {
            max_in,
            max_out,
            ..Default::default()
        }
    }

    /// With the targeted linears' sizes (out, in).
    pub fn with_sizes(mut self, sizes: &[(usize, usize)]) -> Self {
        self.numel = sizes.iter().map(|(o, i)| o * i).sum();
        self.sum_in = sizes.iter().map(|s| s.1).sum();
        self.sum_out = sizes.iter().map(|s| s.0).sum();
        self
    }

    /// The offset of a layer's `numel` weights in the targeted weights laid end to end, in the
    /// order layers are built (module order): FISH's global positions.
    pub fn claim(&self, numel: usize) -> usize {
        self.claimed
            .fetch_add(numel, std::sync::atomic::Ordering::Relaxed)
    }

    /// The shared tensor `key`, made by `init` on first use.
    pub fn get_or_init(
        &self,
        key: &'static str,
        init: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Var> {
        let mut vars = self.vars.lock().expect("shared adapter state");
        if let Some((_, v)) = vars.iter().find(|(k, _)| *k == key) {
            return Ok(v.clone());
        }
        let v = Var::from_tensor(&init()?)?;
        vars.push((key, v.clone()));
        Ok(v)
    }
}

/// A quantized weight as codes on a grid per group of input columns: the weight is
/// `step * codes + offset`, group by group.
#[derive(Debug, Clone)]
pub struct QuantGrid {
    /// (out, in) integer codes in 0..2^bits, as f32
    pub codes: Tensor,
    /// (out, in / group) steps and offsets (f16 values)
    pub step: Tensor,
    pub offset: Tensor,
    pub bits: usize,
}

/// One method's state on ONE targeted linear, e.g. model.layers.3.self_attn.q_proj.
pub trait AdapterLayer: Debug + Send + Sync {
    /// Adapted output from input x (.., in) and base output y (.., out), without building dW
    /// where the method allows it.
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor>;
    /// The whole output `x W^T + b` + this adapter in one fused op, where the method has one
    /// (used when this is the only active, unmerged adapter of the module).
    fn fused_forward(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _b: Option<&Tensor>,
        _ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        None
    }
    /// `fused_forward` over a base weight kept quantized (`w`: raw blocks in `fmt`, see
    /// `petal_ops::quant`), where the method has one.
    fn fused_forward_quant(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _fmt: petal_ops::quant::QFormat,
        _b: Option<&Tensor>,
        _ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        None
    }
    /// The change to W, for merge, unmerge and equivalence tests (an error for a method whose
    /// update depends on the input: the mixtures).
    fn weight_update(&self) -> Result<WeightUpdate>;
    /// A router's load over the training forwards since it was last read (the mixtures), for
    /// the training metrics; reading resets it.
    fn router_load(&self) -> Option<crate::methods::mixture::RouterLoad> {
        None
    }
    /// Owned tensors under their PEFT names.
    fn tensors(&self) -> Vec<NamedTensor<'_>>;
    /// Frozen tensors of this layer that are saved and loaded with it but never trained or
    /// counted (PaCA's column indices, QuanTA's copy of the initial gates).
    fn buffers(&self) -> Vec<NamedTensor<'_>> {
        Vec::new()
    }
    /// Checks after a load has set the tensors and buffers (an index buffer in range, a mask
    /// that fits the module): a one-line cause, or Ok.
    fn check_loaded(&self) -> Result<()> {
        Ok(())
    }
    /// Trained tensors shared by all layers of the adapter and saved once, at the model level
    /// (`base_model.<name>`: FISH's values); trained and counted once.
    fn shared_trained(&self) -> Vec<NamedTensor<'_>> {
        Vec::new()
    }
    /// Frozen tensors shared by all layers of the adapter and saved once, at the model level
    /// (`base_model.<name>`, e.g. VeRA's `vera_A`); not trained, not counted.
    fn shared(&self) -> Vec<NamedTensor<'_>> {
        Vec::new()
    }
    /// Initialisations that start from the base weight's structure (PiSSA, OLoRA) move that
    /// part out of the base: attaching the layer sets `W = W - offset`, once.
    fn base_offset(&self) -> Option<Tensor> {
        None
    }
    /// The concrete layer, for training-loop machinery that needs it (AdaLoRA's allocator).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// The weight this layer makes as codes on a grid, where the method quantizes it (L4Q):
    /// for exports that store the codes themselves rather than quantize the merge again.
    fn grid(&self) -> Result<Option<QuantGrid>> {
        Ok(None)
    }
    /// Whether the layer reads each row's frozen-model query ([`crate::Ctx::query`], FedIns).
    fn wants_query(&self) -> bool {
        false
    }
    /// What the optimizer sees.
    fn vars(&self) -> Vec<Var> {
        self.tensors().into_iter().map(|t| t.var.clone()).collect()
    }
}

/// The sizes `petal train` and `petal bench` take for every method (`--r`, `--alpha`,
/// `--dropout`); each method maps them onto its own keys (`AdapterMethod::shared_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedOption {
    Rank,
    Alpha,
    Dropout,
}

/// A command-line flag of a method kept from before options were namespaced
/// (`--road-variant` for RoAd's `variant`; `name` as written after `--`, and as a TOML key with
/// `_` for `-`); `invert` negates a boolean (`--exact-cayley`).
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    pub name: &'static str,
    pub key: &'static str,
    pub invert: bool,
}

impl Flag {
    pub const fn new(name: &'static str, key: &'static str) -> Self {
        Flag {
            name,
            key,
            invert: false,
        }
    }
}

/// The model a new adapter is made for (by `petal train` / `petal bench`) and the run's length.
#[derive(Debug, Clone)]
pub struct NewAdapter {
    /// The model's sizes, as input-side adapters see them.
    pub shape: InputShape,
    /// Query heads (PEFT records them for prompt methods).
    pub attention_heads: usize,
    pub max_steps: usize,
    /// The option keys the user gave (the others hold the method's defaults).
    pub given: Vec<String>,
    /// The tasks of the training data, sorted (empty: single-task data).
    pub tasks: Vec<String>,
    /// The tokenizer's special tokens that occur in the training data (its unknown token
    /// excepted), ascending.
    pub special_tokens: Vec<u32>,
}

impl NewAdapter {
    pub fn given(&self, key: &str) -> bool {
        self.given.iter().any(|k| k == key)
    }
}

/// One method: its options, construction, and hooks; listed once in `registry::METHODS`.
/// Everything the CLI, TOML run files, `petal bench` and the trainer know of a method comes
/// from here.
pub trait AdapterMethod: Sync {
    /// HF `peft_type`, as written in adapter_config.json (e.g. "LORA").
    fn peft_type(&self) -> &'static str;
    /// The method's own options (`crate::config::spec::<ItsOptions>()`): PEFT's keys, help,
    /// defaults. adapter_config.json holds these next to the shared fields.
    fn options(&self) -> crate::config::Spec;
    /// Checks of the method's option values beyond their types (ranges, combinations).
    fn validate(&self, _cfg: &AdapterConfig) -> Result<()> {
        Ok(())
    }
    /// Whether building a layer is heavy work of its own module alone (an SVD of W: PiSSA,
    /// LoftQ, MiCA), so that `inject` builds the layers on all cores at once; a method whose
    /// build shares state across layers (`Shared::claim`) must keep `false`.
    fn builds_apart(&self, _cfg: &AdapterConfig) -> bool {
        false
    }
    /// Settings of a new adapter that are valid but likely not what the user meant, one line
    /// each, for `petal train` to print (LoftQ's start away from W when alpha / r is not 1).
    fn notes(&self, _cfg: &AdapterConfig) -> Vec<String> {
        Vec::new()
    }
    /// The method's key for a shared size (`--r`, `--alpha`, `--dropout`), if it has one.
    fn shared_key(&self, o: SharedOption) -> Option<&'static str> {
        let names: &[&str] = match o {
            SharedOption::Rank => &["r"],
            SharedOption::Alpha => &["lora_alpha", "alpha"],
            SharedOption::Dropout => &["lora_dropout"],
        };
        let spec = self.options();
        names.iter().find_map(|n| spec.key(n)).map(|s| s.key)
    }
    /// Set rank `r` and alpha where the method has them.
    fn set_size(
        &self,
        opts: &mut serde_json::Map<String, serde_json::Value>,
        r: usize,
        alpha: f64,
    ) {
        if let Some(k) = self.shared_key(SharedOption::Rank) {
            opts.insert(k.into(), r.into());
        }
        if let Some(k) = self.shared_key(SharedOption::Alpha) {
            opts.insert(k.into(), alpha.into());
        }
    }
    /// Command-line flags kept for some options (`--road-variant`); `--set KEY=VALUE` reaches
    /// every option.
    fn flags(&self) -> Vec<Flag> {
        vec![]
    }
    /// Other names `--method` takes for this method with options set, as (name, key, JSON
    /// value): LoRA's ("dora", "use_dora", "true").
    fn variants(&self) -> &'static [(&'static str, &'static str, &'static str)] {
        &[]
    }
    /// `target_modules` when the user gives none (Llama-family names); `None`: the method
    /// targets no module (input-side methods).
    fn default_targets(&self) -> Option<&'static str> {
        Some("all-linear")
    }
    /// Fill what a new adapter needs from the model or the run (prompt widths, AdaLoRA's
    /// schedule) and petal's training defaults where they differ from PEFT's, leaving the keys
    /// in `new.given` as the user set them.
    fn prepare(&self, _cfg: &mut AdapterConfig, _new: &NewAdapter) -> Result<()> {
        Ok(())
    }
    /// Whether Hugging Face PEFT has this method (false for petal's own adapter types: BitFit
    /// and the research methods), so that a comparison with PEFT can be refused up front.
    fn in_peft(&self) -> bool {
        true
    }
    /// Options `petal bench` trains the method with (those of its docs page) as (key, JSON
    /// value); `None`: not benchmarked.
    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        None
    }
    /// Switch the init to the method's non-zero variant (PEFT's testing switch: `init_weights`
    /// or `init_lora_weights` false).
    fn set_init_nonzero(&self, opts: &mut serde_json::Map<String, serde_json::Value>) {
        let spec = self.options();
        for key in ["init_weights", "init_lora_weights"] {
            if spec.has(key) {
                opts.insert(key.into(), false.into());
            }
        }
    }
    /// The method's work around a training run of adapter `name` (AdaLoRA's rank allocation);
    /// `None`: plain training.
    fn training(
        &self,
        _model: &dyn crate::Adaptable,
        _name: &str,
        _cfg: &AdapterConfig,
    ) -> Result<Option<Box<dyn TrainingHook>>> {
        Ok(None)
    }
    /// The trained adapter converted for saving, where the method has another saved form
    /// (PiSSA / OLoRA as plain LoRA for the original base: `petal train --save-as-lora`):
    /// rewrites `tensors` (module-relative PEFT names) and returns the config to save.
    fn convert_for_save(
        &self,
        _model: &dyn crate::Adaptable,
        _name: &str,
        cfg: &AdapterConfig,
        _tensors: &mut std::collections::HashMap<String, Tensor>,
    ) -> Result<AdapterConfig> {
        Err(crate::Error::Unsupported(format!(
            "{} has no other saved form to convert to",
            cfg.peft_type
        )))
    }
    /// Whether the method's PEFT config carries `layers_to_transform` / `layers_pattern` (the
    /// LoRA and LyCORIS families, OFT, BOFT, VeRA): petal writes them, null when unset, as
    /// PEFT does.
    fn writes_layer_selection(&self) -> bool {
        false
    }
    /// Whether the method can adapt a token embedding (else targeting one is refused).
    fn adapts_embeddings(&self) -> bool {
        false
    }
    /// Whether every bias of the model is trained next to the adapter (LoRA's `bias = "all"`).
    fn trains_all_biases(&self, _cfg: &AdapterConfig) -> bool {
        false
    }
    /// Selective methods that train copies of norm weights (LN tuning) instead of adapting
    /// linears: the PEFT name a copy is saved under, relative to the norm's path.
    fn tunes_norms(&self) -> Option<&'static str> {
        None
    }
    /// Methods that also put a scale and shift on each norm whose output feeds linears (SSF):
    /// the initial (scale, shift) for a norm of `width` features and the names they are saved
    /// under, relative to the norm's path; None where `cfg` leaves norms alone.
    #[allow(clippy::type_complexity)]
    fn norm_affine(
        &self,
        _cfg: &AdapterConfig,
        _width: usize,
        _seed: u64,
        _dev: &candle_core::Device,
    ) -> Result<Option<(Tensor, Tensor, [&'static str; 2])>> {
        Ok(None)
    }
    /// The method's own trained form of a `modules_to_save` module (`base`; FedIns pools the
    /// classifier head), or None for PEFT's whole copy.
    fn module_copy(
        &self,
        _cfg: &AdapterConfig,
        _base: &BaseLinear,
        _seed: u64,
    ) -> Result<Option<Box<dyn AdapterLayer>>> {
        Ok(None)
    }
    /// Input-side methods (prompt tuning, prefix tuning, …) build one `InputAdapter` for the
    /// whole model instead of layers.
    fn build_input(
        &self,
        _cfg: &AdapterConfig,
        _shape: &InputShape,
        _seed: u64,
        _dev: &candle_core::Device,
    ) -> Result<Option<Box<dyn InputAdapter>>> {
        Ok(None)
    }
    /// How many values this method's layer on the module at `path` of `dims` will hold (its
    /// tensors and any copy of the base it keeps), from the config alone: the memory check
    /// before anything is allocated (`inject::check_memory`). The default, one full matrix of
    /// the module plus a bias, bounds every method whose sizes the module bounds; methods with
    /// a free size (a rank) give their exact count.
    fn layer_values(&self, _cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        Ok(dims.full())
    }
    /// Values one adapter of this method shares across all its layers (VeRA's projections).
    fn shared_values(&self, _cfg: &AdapterConfig, _dims: &ModuleDims) -> Result<u64> {
        Ok(0)
    }
    /// Values an input-side adapter will hold (virtual tokens, prefix keys and values, an
    /// encoder), for the same check.
    fn input_values(&self, _cfg: &AdapterConfig, _shape: &InputShape) -> Result<u64> {
        Ok(0)
    }
    /// Build this method's layer for the module at `path`. `seed` makes init reproducible.
    /// Methods that adapt no linear (input-side ones, norm tuning) keep this refusal.
    /// Why this method cannot train over a quantized base weight (it reads or rewrites W:
    /// DoRA's norm, rotations, PiSSA's SVD, merges in the loop), or `None` when it only adds a
    /// term next to the base output. Unless a method says otherwise, it needs W.
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        Some("it reads or rewrites the base weight W, or has not been checked without it")
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        _base: &BaseLinear,
        _seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        Err(crate::Error::Unsupported(format!(
            "{}: the method does not adapt linear layers such as `{path}`",
            cfg.peft_type
        )))
    }
}

/// A method's work around training, made once per run (`AdapterMethod::training`): the trainer
/// calls it at fixed points and knows nothing else of the method.
pub trait TrainingHook: Send {
    /// Why the hook cannot train data-parallel, if so: it gathers statistics on this process's
    /// own data outside the gradients the ranks sum (RoSA's and FISH's squared gradients).
    fn single_process_only(&self) -> Option<&'static str> {
        None
    }
    /// A term added to each micro-batch's loss (AdaLoRA's orthogonal regulariser); the trainer
    /// divides it by the number of micro-batches per step.
    fn regulariser(&self, _model: &dyn crate::Adaptable) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// After the optimizer step `step` (0-based), with the step's clipped gradients.
    fn after_step(
        &mut self,
        _model: &dyn crate::Adaptable,
        _step: usize,
        _grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        Ok(())
    }
    /// Whether the optimizer's state (moments and step count) starts afresh after step `step`
    /// (Chain of LoRA's knots).
    fn reset_optimizer_after(&self, _step: usize) -> bool {
        false
    }
    /// State kept in checkpoints next to the optimizer's (names must not clash with it).
    fn state(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        Ok(Default::default())
    }
    /// Multi-objective training (PaLoRA): the preference rays of step `step` (0-based) of
    /// `max_steps`, one weight per task of [`Rays::tasks`]. The trainer sets each ray on the
    /// model in turn (`set_ray`) and takes, for each micro-batch, one forward and backward per
    /// ray of the loss `Σ_k ω_k L_k`, L_k the token-mean loss of task k's examples of the step.
    fn rays(&self, _step: usize, _max_steps: usize) -> Option<Rays> {
        None
    }
    /// Put preference `ray` on the model's layers of this adapter.
    fn set_ray(&self, _model: &dyn crate::Adaptable, _ray: &[f64]) -> Result<()> {
        Ok(())
    }
    /// Small text files written into the saved adapter's folder next to it (KS-Lottery's
    /// `tickets.json`): (file name, contents).
    fn files(&self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }
    /// Restore from a checkpoint's state.
    fn load_state(&mut self, _state: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
    /// The saved form of the trained adapter (AdaLoRA: tensors cut to the kept ranks, the
    /// masks as `rank_pattern`).
    fn export(
        &self,
        _cfg: &mut AdapterConfig,
        _tensors: &mut std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        Ok(())
    }
}

/// One training step's preference rays (see [`TrainingHook::rays`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Rays {
    /// The tasks, in the order of each ray's weights.
    pub tasks: Vec<String>,
    pub rays: Vec<Vec<f64>>,
}
