//! Attaching a named adapter to every targeted linear of a model, and counting parameters.

use crate::adapter::{AdapterMethod, BaseLinear, InputAdapter, InputShape, Shared};
use crate::config::{AdapterConfig, Targets, TokenIndices};
use crate::linear::AdaptableLinear;
use crate::memory::{self, MemoryLimit};
use crate::methods::bias::BiasCopy;
use crate::methods::modules_to_save::{self, ModuleCopy};
use crate::methods::trainable_tokens::TrainableTokens;
use crate::norm::AdaptableNorm;
use crate::{registry, rng, target, AdapterLayer, Error, Result};
use candle_core::Var;

/// What a model exposes to the adapter machinery: its linears, by HF module path.
pub trait Adaptable {
    fn linears(&self) -> Vec<&AdaptableLinear>;
    fn linears_mut(&mut self) -> Vec<&mut AdaptableLinear>;
    /// HF path of the output head (`all-linear` skips it).
    fn output_head(&self) -> Option<&str> {
        Some("lm_head")
    }
    /// Parameters of the base model, counted once even where weights are tied.
    fn base_param_count(&self) -> usize;
    /// Norm layers a selective method may tune (LN tuning), by HF module path.
    fn norms(&self) -> Vec<&AdaptableNorm> {
        Vec::new()
    }
    fn norms_mut(&mut self) -> Vec<&mut AdaptableNorm> {
        Vec::new()
    }
    /// The linears that read norm `norm`'s output directly (HF paths), where a shift after
    /// the norm can be folded into their biases (SSF's merge); empty for a norm that has none
    /// (a model's final norm, whose head has no bias in transformers), which SSF leaves alone.
    fn norm_consumers(&self, _norm: &str) -> Vec<String> {
        Vec::new()
    }
    /// What input-side adapters need of the model (None: the model takes none).
    fn input_shape(&self) -> Option<InputShape> {
        None
    }
    /// The input-side adapter (prompt tuning, …) and its name, if any.
    fn input_adapter(&self) -> Option<(&str, &dyn InputAdapter)> {
        None
    }
    fn set_input_adapter(&mut self, _name: &str, _adapter: Box<dyn InputAdapter>) -> Result<()> {
        Err(Error::Unsupported(
            "this model takes no input-side adapters".into(),
        ))
    }
}

/// One row of the injection report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Injected {
    pub path: String,
    pub in_features: usize,
    pub out_features: usize,
    pub params: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InjectionReport {
    pub adapter: String,
    pub peft_type: String,
    pub modules: Vec<Injected>,
}

impl InjectionReport {
    pub fn params(&self) -> usize {
        self.modules.iter().map(|m| m.params).sum()
    }
}

/// Attach adapter `name` built from `cfg` to every linear `cfg` targets, and make it active.
/// Refused before anything is allocated when the adapter would need more memory than half
/// of this machine's (see [`inject_adapter_within`]).
pub fn inject_adapter(
    model: &mut dyn Adaptable,
    name: &str,
    cfg: &AdapterConfig,
    seed: u64,
) -> Result<InjectionReport> {
    inject_adapter_within(model, name, cfg, seed, &MemoryLimit::default())
}

/// `inject_adapter` under `limit`: the adapter's size is computed from `cfg` and the model
/// first ([`memory::estimate`]), and an adapter over the limit is refused with its size, the
/// option that makes it so and the limit.
pub fn inject_adapter_within(
    model: &mut dyn Adaptable,
    name: &str,
    cfg: &AdapterConfig,
    seed: u64,
    limit: &MemoryLimit,
) -> Result<InjectionReport> {
    cfg.validate("adapter config")?;
    let method = registry::method(&cfg.peft_type)
        .ok_or_else(|| Error::Unsupported(format!("unknown peft_type `{}`", cfg.peft_type)))?;
    limit.check(name, cfg, &memory::estimate(model, cfg)?)?;
    if let Some(shape) = model.input_shape() {
        let dev = model
            .linears()
            .first()
            .map(|l| l.weight().device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        if let Some(input) = method.build_input(cfg, &shape, seed, &dev)? {
            let params = input
                .tensors()
                .iter()
                .map(|t| t.var.as_tensor().elem_count())
                .sum();
            let n = input.num_virtual_tokens();
            let width = input
                .key_values()?
                .map(|kv| kv.elem_count() / n.max(1))
                .unwrap_or(shape.hidden);
            model.set_input_adapter(name, input)?;
            let row = Injected {
                path: "prompt_encoder".into(),
                in_features: n,
                out_features: width,
                params,
            };
            let mut modules = vec![row];
            let shared = Shared::default();
            attach_module_copies(model, name, cfg, (method, &shared, seed), &mut modules)?;
            return Ok(InjectionReport {
                adapter: name.to_string(),
                peft_type: cfg.peft_type.clone(),
                modules,
            });
        }
    }
    if let Some(tensor) = method.tunes_norms() {
        let mut modules = Vec::new();
        for n in model.norms_mut() {
            if target::is_target(cfg, n.path(), false) {
                let params = n.add_copy(name, tensor)?;
                modules.push(Injected {
                    path: n.path().to_string(),
                    in_features: params,
                    out_features: params,
                    params,
                });
            }
        }
        if modules.is_empty() {
            return Err(Error::msg(format!(
                "target_modules {:?} matched no norm layer of the model",
                cfg.target_modules
            )));
        }
        let shared = Shared::default();
        attach_module_copies(model, name, cfg, (method, &shared, seed), &mut modules)?;
        return Ok(InjectionReport {
            adapter: name.to_string(),
            peft_type: cfg.peft_type.clone(),
            modules,
        });
    }
    let head = model.output_head().map(str::to_string);
    let targeted = |lin: &AdaptableLinear| is_targeted(cfg, lin, head.as_deref());
    let linears = targeted_linears(model, cfg);
    let (max_in, max_out) = extent(&linears);
    let sizes: Vec<(usize, usize)> = linears
        .iter()
        .map(|l| (l.out_features(), l.in_features()))
        .collect();
    let shared = Shared::new(max_in, max_out).with_sizes(&sizes);
    let seed_of = |i: usize| rng::splitmix(seed ^ rng::splitmix(i as u64));
    // layers whose build is an SVD of their own W: built on all cores first (the others, and
    // any that cannot be, in the loop below, where the checks give their errors)
    let mut built: Vec<Option<Result<Box<dyn AdapterLayer>>>> = match method.builds_apart(cfg) {
        true => {
            use rayon::prelude::*;
            model
                .linears()
                .par_iter()
                .enumerate()
                .map(|(i, lin)| {
                    let skip = !targeted(lin) || lin.is_embedding() || lin.quant().is_some();
                    let base = BaseLinear::of(lin, &shared);
                    (!skip).then(|| method.build(cfg, lin.path(), &base, seed_of(i)))
                })
                .collect()
        }
        false => Vec::new(),
    };
    let mut modules = Vec::new();
    for (i, lin) in model.linears_mut().into_iter().enumerate() {
        let path = lin.path().to_string();
        if !targeted(lin) {
            continue;
        }
        if lin.is_embedding() && !method.adapts_embeddings() {
            return Err(Error::Unsupported(format!(
                "{path}: {} cannot adapt a token embedding (LoRA can)",
                cfg.peft_type
            )));
        }
        if let (Some(fmt), Some(why)) = (lin.quant(), method.needs_dense_base(cfg)) {
            return Err(Error::Unsupported(format!(
                "{path}: {} cannot train over a quantized base weight ({}): {why}; load the \
                 model with --dtype f32 or bf16 (see docs/quantized.md for the methods that can)",
                cfg.peft_type,
                fmt.name()
            )));
        }
        if lin.quant().is_some() && lin.is_embedding() {
            return Err(Error::Unsupported(format!(
                "{path}: {} cannot adapt a quantized token embedding; load the model with \
                 --dtype f32 or bf16",
                cfg.peft_type
            )));
        }
        let base = BaseLinear::of(lin, &shared);
        let layer = match built.get_mut(i).and_then(Option::take) {
            Some(layer) => layer?,
            None => method.build(cfg, &path, &base, seed_of(i))?,
        };
        let params = layer
            .tensors()
            .iter()
            .map(|t| t.var.as_tensor().elem_count())
            .sum();
        modules.push(Injected {
            path: path.clone(),
            in_features: lin.in_features(),
            out_features: lin.out_features(),
            params,
        });
        if let Some(offset) = layer.base_offset() {
            lin.subtract_from_base(&offset)?;
        }
        attach(lin, name, layer)?;
    }
    if modules.is_empty() {
        let layers = match (&cfg.layers_to_transform, model.input_shape()) {
            (None, _) => String::new(),
            (Some(l), shape) => format!(
                " in layers_to_transform {}{}",
                serde_json::to_string(l).unwrap_or_default(),
                shape.map_or(String::new(), |s| format!(
                    " (the model's layers: 0..={})",
                    s.layers.saturating_sub(1)
                ))
            ),
        };
        return Err(Error::msg(format!(
            "target_modules {:?} matched no linear layer of the model{layers} (its linears end in: {})",
            cfg.target_modules,
            linear_suffixes(model).join(", ")
        )));
    }
    attach_norm_affines(model, name, cfg, method, seed, &mut modules)?;
    attach_module_copies(model, name, cfg, (method, &shared, seed), &mut modules)?;
    attach_trainable_tokens(model, name, cfg, &mut modules, &shared)?;
    if method.trains_all_biases(cfg) {
        for lin in model.linears_mut() {
            let Some(b) = lin.bias().filter(|_| lin.layer(name).is_none()) else {
                continue;
            };
            let copy = BiasCopy::new(b)?;
            modules.push(Injected {
                path: lin.path().to_string(),
                in_features: 0,
                out_features: lin.out_features(),
                params: lin.out_features(),
            });
            attach(lin, name, Box::new(copy))?;
        }
    }
    Ok(InjectionReport {
        adapter: name.to_string(),
        peft_type: cfg.peft_type.clone(),
        modules,
    })
}

/// A method's scale and shift on every norm that feeds linears (SSF with `norms`).
fn attach_norm_affines(
    model: &mut dyn Adaptable,
    name: &str,
    cfg: &AdapterConfig,
    method: &dyn AdapterMethod,
    seed: u64,
    modules: &mut Vec<Injected>,
) -> Result<()> {
    let feeding: Vec<String> = model
        .norms()
        .iter()
        .map(|n| n.path().to_string())
        .filter(|p| !model.norm_consumers(p).is_empty())
        .collect();
    for (i, n) in model.norms_mut().into_iter().enumerate() {
        if !feeding.iter().any(|p| p == n.path()) {
            continue;
        }
        let width = n.base().elem_count();
        let seed = rng::splitmix(seed ^ rng::splitmix(!(i as u64)));
        let Some((scale, shift, names)) =
            method.norm_affine(cfg, width, seed, n.base().device())?
        else {
            return Ok(());
        };
        let params = n.add_affine(name, scale, shift, names)?;
        modules.push(Injected {
            path: n.path().to_string(),
            in_features: width,
            out_features: width,
            params,
        });
    }
    Ok(())
}

/// The linears of `model` that `cfg` targets, in model order.
pub(crate) fn targeted_linears<'a>(
    model: &'a dyn Adaptable,
    cfg: &AdapterConfig,
) -> Vec<&'a AdaptableLinear> {
    let head = model.output_head().map(str::to_string);
    model
        .linears()
        .into_iter()
        .filter(|l| is_targeted(cfg, l, head.as_deref()))
        .collect()
}

/// The largest `in_features` and `out_features` over `linears` (0 for none).
pub(crate) fn extent(linears: &[&AdaptableLinear]) -> (usize, usize) {
    let max_in = linears.iter().map(|l| l.in_features()).max().unwrap_or(0);
    let max_out = linears.iter().map(|l| l.out_features()).max().unwrap_or(0);
    (max_in, max_out)
}

/// Whether `cfg` targets `lin` (`head`: the model's output head path). `all-linear` means
/// nn.Linear modules: never the embedding.
fn is_targeted(cfg: &AdapterConfig, lin: &AdaptableLinear, head: Option<&str>) -> bool {
    let all_linear = matches!(&cfg.target_modules, Some(Targets::Regex(r)) if r == "all-linear");
    let path = lin.path();
    !(lin.is_embedding() && all_linear) && target::is_target(cfg, path, head == Some(path))
}

/// Attach `layer` to `lin` under `name` and make it active there, next to the active ones.
fn attach(lin: &mut AdaptableLinear, name: &str, layer: Box<dyn AdapterLayer>) -> Result<()> {
    lin.add_adapter(name, layer)?;
    let mut active: Vec<String> = lin.active().to_vec();
    active.push(name.to_string());
    lin.set_active(&active.iter().map(String::as_str).collect::<Vec<_>>());
    Ok(())
}

/// `trainable_token_indices`: chosen rows of the embedding trained in full, and the same rows of
/// an output head tied to it.
fn attach_trainable_tokens(
    model: &mut dyn Adaptable,
    name: &str,
    cfg: &AdapterConfig,
    modules: &mut Vec<Injected>,
    shared: &Shared,
) -> Result<()> {
    let Some(spec) = &cfg.trainable_token_indices else {
        return Ok(());
    };
    let (module, indices): (String, Vec<u32>) = match spec {
        TokenIndices::List(v) => ("embed_tokens".into(), v.clone()),
        TokenIndices::PerModule(m) if m.len() == 1 => {
            let (k, v) = m.iter().next().expect("one entry");
            (k.clone(), v.clone())
        }
        TokenIndices::PerModule(_) => {
            return Err(Error::Unsupported(
                "trainable_token_indices for more than one embedding module".into(),
            ))
        }
    };
    if indices.is_empty() {
        return Ok(());
    }
    let table = model
        .linears()
        .into_iter()
        .find(|l| l.is_embedding() && l.path().ends_with(&module))
        .map(|l| l.weight().clone())
        .ok_or_else(|| {
            Error::msg(format!(
                "trainable_token_indices: no embedding module `{module}`"
            ))
        })?;
    for lin in model.linears_mut() {
        let tied = !lin.is_embedding() && lin.weight().id() == table.id();
        if !(lin.is_embedding() && lin.path().ends_with(&module)) && !tied {
            continue;
        }
        if lin.layer(name).is_some() {
            return Err(Error::msg(format!(
                "{}: both adapted by the method and given trainable_token_indices",
                lin.path()
            )));
        }
        let layer = TrainableTokens::new(&lin.dense_weight()?, &indices, shared, tied)?;
        let params = layer
            .tensors()
            .iter()
            .map(|t| t.var.as_tensor().elem_count())
            .sum();
        modules.push(Injected {
            path: lin.path().to_string(),
            in_features: indices.len(),
            out_features: lin.out_features(),
            params,
        });
        attach(lin, name, Box::new(layer))?;
    }
    Ok(())
}

/// `modules_to_save`: a trained full copy of every listed linear, under the adapter's name (or
/// the method's own form of it, [`AdapterMethod::module_copy`], sharing `shared` with the
/// method's layers).
fn attach_module_copies(
    model: &mut dyn Adaptable,
    name: &str,
    cfg: &AdapterConfig,
    (method, shared, seed): (&dyn AdapterMethod, &Shared, u64),
    modules: &mut Vec<Injected>,
) -> Result<()> {
    let Some(list) = cfg.modules_to_save.as_ref().filter(|l| !l.is_empty()) else {
        return Ok(());
    };
    let mut found = 0;
    for lin in model.linears_mut() {
        if !modules_to_save::is_listed(cfg, lin.path()) {
            continue;
        }
        if lin.layer(name).is_some() {
            return Err(Error::msg(format!(
                "{}: both targeted by the method and listed in modules_to_save",
                lin.path()
            )));
        }
        let dense = lin.dense_weight()?;
        let base = BaseLinear {
            weight: &dense,
            bias: lin.bias(),
            in_features: lin.in_features(),
            out_features: lin.out_features(),
            shared,
            embedding: lin.is_embedding(),
            quant: None,
        };
        let own = method.module_copy(cfg, &base, rng::splitmix(seed ^ 0x636f_7079))?;
        let copy: Box<dyn AdapterLayer> = match own {
            Some(layer) => layer,
            None if lin.is_embedding() => Box::new(ModuleCopy::embedding(&dense)?),
            None => Box::new(ModuleCopy::new(&dense, lin.bias())?),
        };
        let params = copy
            .tensors()
            .iter()
            .map(|t| t.var.as_tensor().elem_count())
            .sum();
        modules.push(Injected {
            path: lin.path().to_string(),
            in_features: lin.in_features(),
            out_features: lin.out_features(),
            params,
        });
        attach(lin, name, copy)?;
        found += 1;
    }
    if found == 0 {
        return Err(Error::msg(format!(
            "modules_to_save {list:?} matched no linear layer of the model (its linears end in: {})",
            linear_suffixes(model).join(", ")
        )));
    }
    Ok(())
}

fn linear_suffixes(model: &dyn Adaptable) -> Vec<String> {
    let mut v: Vec<String> = model
        .linears()
        .iter()
        .map(|l| l.path().rsplit('.').next().unwrap_or("").to_string())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Make only `names` active on every module (linears and tuned norms).
pub fn set_active(model: &mut dyn Adaptable, names: &[&str]) {
    for l in model.linears_mut() {
        l.set_active(names);
    }
    for n in model.norms_mut() {
        n.set_active(names);
    }
}

/// All trainable variables of adapter `name`, in module order (the optimizer's list).
pub fn adapter_vars(model: &dyn Adaptable, name: &str) -> Vec<Var> {
    crate::walk::adapter_tensors(model, name)
        .into_iter()
        .filter(|t| t.trainable())
        .map(|t| t.var.clone())
        .collect()
}

/// Merge every adapter into the base weights and drop them (`petal merge`): each linear's
/// adapters by their `WeightUpdate`, tuned norms' copies (or scales) become the weights and a
/// shift after a norm (SSF) becomes `W β` added to the bias of each linear the norm feeds. An
/// input-side adapter (virtual tokens, prefixes) has no weight to merge into and is refused.
pub fn merge_and_unload_all(model: &mut dyn Adaptable) -> Result<()> {
    if let Some((n, a)) = model.input_adapter() {
        let what = match a.num_virtual_tokens() {
            0 => "shifts chosen tokens' hidden states (PASTA), which depends on the token",
            _ => "puts virtual tokens or keys and values in front of the input",
        };
        return Err(Error::Unsupported(format!(
            "adapter `{n}` {what}: it cannot be merged into the weights"
        )));
    }
    let names = crate::walk::adapter_names(model);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for l in model.linears_mut() {
        l.merge_and_unload(&names)?;
    }
    let mut shifts = Vec::new();
    for n in model.norms_mut() {
        if let Some(shift) = n.merge_and_unload()? {
            shifts.push((n.path().to_string(), shift));
        }
    }
    for (norm, shift) in shifts {
        let consumers = model.norm_consumers(&norm);
        for l in model.linears_mut() {
            if consumers.iter().any(|c| c == l.path()) {
                l.add_input_shift(&shift)?;
            }
        }
    }
    Ok(())
}

/// PEFT's `print_trainable_parameters`: trainable (the active adapters) vs all parameters.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ParamCount {
    pub trainable: usize,
    pub total: usize,
}

impl ParamCount {
    pub fn of(model: &dyn Adaptable) -> Self {
        let (mut trainable, mut adapters) = (0, 0);
        for name in crate::walk::adapter_names(model) {
            for t in crate::walk::adapter_tensors(model, &name) {
                if !t.trainable() {
                    continue; // frozen shared projections are not counted (as in PEFT)
                }
                let c = t.var.as_tensor().elem_count();
                adapters += c;
                if t.active {
                    trainable += c;
                }
            }
        }
        ParamCount {
            trainable,
            total: model.base_param_count() + adapters,
        }
    }

    pub fn percent(&self) -> f64 {
        100.0 * self.trainable as f64 / self.total.max(1) as f64
    }
}

impl std::fmt::Display for ParamCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            self.trainable,
            self.total,
            self.percent()
        )
    }
}
