//! The conformance suite every method runs (see `conformance!`), on a toy two-linear model.
//! Each check compares numbers with an independent computation: the merged weight against
//! the unmerged forward, finite differences against backprop, a formula against the count.

use crate::config::AdapterConfig;
use crate::{inject_adapter, Adaptable, AdaptableLinear, ParamCount};
use candle_core::{DType, Device, Tensor, Var};

pub struct Toy {
    pub fc1: AdaptableLinear,
    pub fc2: AdaptableLinear,
}

pub use petal_ops::testing::{central_differences, max_rel, rand as rand_tensor};

impl Toy {
    pub fn new() -> Self {
        Toy {
            fc1: AdaptableLinear::new(
                "layers.0.fc1",
                rand_tensor(&[12, 10], 1),
                Some(rand_tensor(&[12], 2)),
            ),
            fc2: AdaptableLinear::new("layers.1.fc2", rand_tensor(&[6, 12], 3), None),
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_ctx(x, &crate::Ctx::eval())
    }
    pub fn forward_ctx(&self, x: &Tensor, ctx: &crate::Ctx) -> Tensor {
        let h = self.fc1.forward(x, ctx).unwrap().silu().unwrap();
        self.fc2.forward(&h, ctx).unwrap()
    }
    pub fn input() -> Tensor {
        rand_tensor(&[2, 3, 10], 9)
    }
}

impl Default for Toy {
    fn default() -> Self {
        Self::new()
    }
}

impl Adaptable for Toy {
    fn linears(&self) -> Vec<&AdaptableLinear> {
        vec![&self.fc1, &self.fc2]
    }
    fn linears_mut(&mut self) -> Vec<&mut AdaptableLinear> {
        vec![&mut self.fc1, &mut self.fc2]
    }
    fn output_head(&self) -> Option<&str> {
        None
    }
    fn base_param_count(&self) -> usize {
        12 * 10 + 12 + 6 * 12
    }
}

/// A golden fixture of `tests/fixtures/golden/` by file stem (`"quanta"`), every tensor on the CPU.
pub fn golden_fixture(name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../tests/fixtures/golden/{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A whole-number option of `cfg` (tests).
pub fn opt_usize(cfg: &AdapterConfig, key: &str) -> usize {
    cfg.get(key)
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("option {key}")) as usize
}

/// `method`'s layer on a bias-free, unquantized linear of weight `w (out, in)` at `path`.
pub fn build_on(
    method: &dyn crate::AdapterMethod,
    cfg: &AdapterConfig,
    w: &Tensor,
    path: &str,
    seed: u64,
) -> crate::Result<Box<dyn crate::AdapterLayer>> {
    let (out, inp) = w.dims2()?;
    let base = crate::adapter::BaseLinear {
        weight: w,
        bias: None,
        in_features: inp,
        out_features: out,
        shared: &Default::default(),
        embedding: false,
        quant: None,
    };
    method.build(cfg, path, &base, seed)
}

/// What `prepare` hooks see of a new adapter on the toy model (hidden 10, one layer and head):
/// a run of `max_steps`, the options `given`, the data's `tasks`.
pub fn new_adapter(max_steps: usize, given: &[&str], tasks: &[&str]) -> crate::adapter::NewAdapter {
    crate::adapter::NewAdapter {
        shape: crate::adapter::InputShape {
            hidden: 10,
            layers: 1,
            kv_heads: 1,
            head_dim: 10,
        },
        attention_heads: 1,
        max_steps,
        given: given.iter().map(|s| s.to_string()).collect(),
        tasks: tasks.iter().map(|s| s.to_string()).collect(),
        special_tokens: vec![],
    }
}

/// Both toy linears as `target_modules`.
pub fn toy_targets() -> crate::config::Targets {
    crate::config::Targets::List(vec!["fc1".into(), "fc2".into()])
}

/// A toy with adapter "default" from `cfg`; with `nonzero`, the init is the method's
/// non-zero variant (`init_lora_weights = false`).
pub fn adapted(cfg: &AdapterConfig, nonzero: bool) -> Toy {
    let mut t = Toy::new();
    let mut c = cfg.clone();
    if nonzero {
        c.set_init_nonzero();
    }
    inject_adapter(&mut t, "default", &c, 42).unwrap();
    t
}

pub fn check_identity_at_init(cfg: &AdapterConfig) {
    let t = adapted(cfg, false);
    let x = Toy::input();
    let base = Toy::new().forward(&x);
    // equal up to the rounding of a different product kernel: a method that computes
    // x (W + dW)^T in one product (LoHa, LoKr) meets the base model's few-row kernel here
    let e = max_rel(&t.forward(&x), &base);
    assert!(
        e <= 1e-6,
        "zero-init adapter must not change the output: {e:e}"
    );
}

/// A method that cannot merge says so in one line (`cannot be merged`) and leaves W as it was.
pub fn check_merge_refused(cfg: &AdapterConfig) {
    let mut t = adapted(cfg, true);
    let x = Toy::input();
    let before = t.forward(&x);
    assert!(
        max_rel(&before, &Toy::new().forward(&x)) > 1e-3,
        "adapter must change the output"
    );
    let w0: Vec<Tensor> = t.linears().iter().map(|l| l.weight().clone()).collect();
    for l in t.linears_mut() {
        let e = l.merge("default", true).unwrap_err().to_string();
        assert!(e.contains("cannot be merged") && !e.contains('\n'), "{e}");
        assert!(l.merged_names().is_empty());
    }
    for (l, w) in t.linears().iter().zip(&w0) {
        assert_eq!(max_rel(l.weight(), w), 0.0, "a refused merge leaves W");
    }
    assert_eq!(max_rel(&t.forward(&x), &before), 0.0);
}

pub fn check_merge_equals_unmerged_and_unmerge_restores(cfg: &AdapterConfig) {
    let mut t = adapted(cfg, true);
    let x = Toy::input();
    let unmerged = t.forward(&x);
    assert!(
        max_rel(&unmerged, &Toy::new().forward(&x)) > 1e-3,
        "adapter must change the output"
    );
    let w0: Vec<Tensor> = t.linears().iter().map(|l| l.weight().clone()).collect();
    for l in t.linears_mut() {
        assert!(l.merge("default", true).unwrap());
        assert!(
            !l.merge("default", true).unwrap(),
            "merging twice is a no-op"
        );
    }
    let merged = t.forward(&x);
    assert!(
        max_rel(&merged, &unmerged) < 1e-5,
        "merged {} vs unmerged",
        max_rel(&merged, &unmerged)
    );
    for l in t.linears_mut() {
        l.set_disabled(true).unwrap(); // disabling unmerges first
    }
    for (l, w) in t.linears().iter().zip(&w0) {
        assert!(l.merged_names().is_empty());
        assert!(max_rel(l.weight(), w) < 1e-6, "unmerge must restore W");
    }
}

pub fn check_save_load_bitwise(cfg: &AdapterConfig) {
    let t = adapted(cfg, true);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let mut map = std::collections::HashMap::new();
    for l in t.linears() {
        let layer = l.layer("default").unwrap();
        for nt in layer.tensors().into_iter().chain(layer.buffers()) {
            map.insert(
                format!("{}.{}", l.path(), nt.name),
                nt.var.as_tensor().clone(),
            );
        }
        for nt in layer.shared().into_iter().chain(layer.shared_trained()) {
            map.insert(format!("shared.{}", nt.name), nt.var.as_tensor().clone());
        }
    }
    candle_core::safetensors::save(&map, &path).unwrap();
    let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut fresh = adapted(cfg, false);
    for l in fresh.linears_mut() {
        let p = l.path().to_string();
        let layer = l.layer("default").unwrap();
        for nt in layer.tensors().into_iter().chain(layer.buffers()) {
            nt.var.set(&back[&format!("{p}.{}", nt.name)]).unwrap();
        }
        for nt in layer.shared().into_iter().chain(layer.shared_trained()) {
            nt.var.set(&back[&format!("shared.{}", nt.name)]).unwrap();
        }
    }
    for l in fresh.linears() {
        l.layer("default").unwrap().check_loaded().unwrap(); // as `petal_io::load_into` does
    }
    let x = Toy::input();
    let (a, b) = (t.forward(&x), fresh.forward(&x));
    let bits = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        bits(&a),
        bits(&b),
        "reloaded adapter must give bitwise equal outputs"
    );
}

fn loss(t: &Toy, x: &Tensor) -> Tensor {
    let w = rand_tensor(&[2, 3, 6], 11);
    (t.forward(x) * w).unwrap().sum_all().unwrap()
}

/// Gradients reach every adapter tensor and no frozen weight; those named in `fd_only` (all
/// when `None`) also match finite differences. Methods that detach part of their graph by
/// design (DoRA's weight norm) list the tensors whose gradient stays exact.
pub fn check_gradients(cfg: &AdapterConfig, fd_only: Option<&[&str]>) {
    let t = adapted(cfg, true);
    let x = Toy::input();
    let g = loss(&t, &x).backward().unwrap();
    // every trained tensor (each layer's own, then the trained ones all layers share) with its
    // name without the module path (`lora_A.weight`, `fish_values`)
    let paths: Vec<String> = t
        .linears()
        .iter()
        .map(|l| format!("{}.", l.path()))
        .collect();
    let (vars, names): (Vec<Var>, Vec<String>) = crate::walk::adapter_tensors(&t, "default")
        .into_iter()
        .filter(|a| a.trainable())
        .map(|a| {
            let name = paths
                .iter()
                .find_map(|p| a.key.strip_prefix(p.as_str()))
                .or_else(|| a.key.strip_prefix(crate::walk::SHARED_PREFIX))
                .unwrap_or(&a.key)
                .to_string();
            (a.var.clone(), name)
        })
        .unzip();
    for v in &vars {
        let gv = g
            .get(v.as_tensor())
            .expect("every adapter variable gets a gradient");
        assert!(
            gv.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
    for l in t.linears() {
        assert!(
            g.get(l.weight()).is_none(),
            "frozen weight {} must get no gradient",
            l.path()
        );
    }
    // finite differences on a few entries of every variable, in f64 arithmetic over f32 data
    let mut checked = 0;
    for (v, name) in vars.iter().zip(&names) {
        if fd_only.is_some_and(|only| !only.contains(&name.as_str())) {
            continue;
        }
        checked += 1;
        let grad = g
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let idx = [0, grad.len() / 2, grad.len() - 1];
        let f = || {
            loss(&t, &x)
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for (&i, fd) in idx.iter().zip(central_differences(v, &idx, 1e-2, f)) {
            let fd = fd as f32;
            assert!(
                (fd - grad[i]).abs() < 2e-2 * (1.0 + fd.abs()),
                "{name} d/d[{i}]: finite difference {fd} vs backprop {}",
                grad[i]
            );
        }
    }
    assert!(checked > 0, "finite differences checked no tensor");
    for want in fd_only.unwrap_or_default() {
        assert!(
            names.iter().any(|n| n == want),
            "no adapter tensor named {want}"
        );
    }
}

pub fn check_param_count(cfg: &AdapterConfig, formula: fn(usize, usize, &AdapterConfig) -> usize) {
    let t = adapted(cfg, true);
    let want: usize = t
        .linears()
        .iter()
        .map(|l| formula(l.in_features(), l.out_features(), cfg))
        .sum();
    let c = ParamCount::of(&t);
    assert_eq!(c.trainable, want);
    assert_eq!(c.total, t.base_param_count() + want);
}

/// For a method that keeps its dense update for inference (`KeptDelta`): inference equals a
/// training forward, stays equal when run again, and follows the trained value `key` (its
/// name's ending) when a step moves it. `cfg` must make a nonzero update.
pub fn check_inference_follows_the_values(cfg: &AdapterConfig, key: &str) {
    let mut t = Toy::new();
    crate::inject_adapter(&mut t, "default", cfg, 0).unwrap();
    let x = Toy::input();
    let (eval, train) = (crate::Ctx::eval(), crate::Ctx::train(0));
    let first = t.forward_ctx(&x, &eval);
    assert!(max_rel(&first, &t.forward_ctx(&x, &train)) < 1e-6);
    assert!(max_rel(&t.forward_ctx(&x, &eval), &first) < 1e-6);
    // the value moves (an optimizer step): inference follows it
    let v = crate::walk::adapter_tensors(&t, "default")
        .into_iter()
        .find(|a| a.key.ends_with(key))
        .unwrap_or_else(|| panic!("no adapter tensor ends with {key}"))
        .var
        .clone();
    v.set(&(v.as_tensor() * 2.0).unwrap()).unwrap();
    let moved = t.forward_ctx(&x, &eval);
    assert!(max_rel(&moved, &first) > 1e-3);
    assert!(max_rel(&moved, &t.forward_ctx(&x, &train)) < 1e-6);
}

/// Where the method has a fused forward (one kernel for the frozen linear and the adapter), it
/// equals the composed `forward` in value and in the gradients of the input and every adapter
/// tensor (shared trained ones included), drawing the same dropout (`rank_dropout` /
/// `lora_dropout` set by the config).
pub fn check_fused_equals_composed(cfg: &AdapterConfig) {
    check_fused_equals_composed_on(&adapted(cfg, true));
}

/// The method's layers take a fused form on the toy (in training mode), so
/// `check_fused_equals_composed`, which skips layers without one, compared something.
pub fn assert_fused_taken(cfg: &AdapterConfig) {
    let t = adapted(cfg, true);
    let ctx = crate::Ctx::train(5);
    let taken = t
        .linears()
        .into_iter()
        .filter(|lin| {
            let x = rand_tensor(&[2, 3, lin.in_features()], 4);
            let layer = lin.layer("default").unwrap();
            layer
                .fused_forward(&x, lin.weight(), lin.bias(), &ctx)
                .is_some()
        })
        .count();
    assert!(taken > 0, "no layer took its fused form");
}

/// `check_fused_equals_composed` on a toy already adapted (a layer set up by hand).
pub fn check_fused_equals_composed_on(t: &Toy) {
    for lin in t.linears() {
        let layer = lin.layer("default").unwrap();
        let x = Var::from_tensor(&rand_tensor(&[2, 3, lin.in_features()], 4)).unwrap();
        let ctx = crate::Ctx::train(5);
        let Some(fused) = layer.fused_forward(x.as_tensor(), lin.weight(), lin.bias(), &ctx) else {
            continue;
        };
        let fused = fused.unwrap();
        let ctx = crate::Ctx::train(5);
        let y = petal_ops::frozen_linear(ctx.kernels(), x.as_tensor(), lin.weight(), lin.bias())
            .unwrap();
        let composed = layer.forward(x.as_tensor(), y, &ctx).unwrap();
        assert!(max_rel(&fused, &composed) < 1e-5, "{}: values", lin.path());
        let proj = rand_tensor(composed.dims(), 9);
        let grads = |t: &Tensor| (t * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        let (gc, gf) = (grads(&composed), grads(&fused));
        // the layer's own tensors and the trained ones all layers share (FISH's values, the
        // intrinsic theta)
        let mut vars: Vec<Var> = layer
            .tensors()
            .iter()
            .chain(&layer.shared_trained())
            .map(|t| t.var.clone())
            .collect();
        vars.push(x);
        for v in &vars {
            match (gc.get(v.as_tensor()), gf.get(v.as_tensor())) {
                (Some(a), Some(e)) => {
                    assert!(
                        max_rel(e, a) < 1e-4,
                        "{}: gradient {}",
                        lin.path(),
                        max_rel(e, a)
                    )
                }
                (None, None) => {} // module dropout skipped the adapter in both
                _ => panic!("{}: a gradient in one form only", lin.path()),
            }
        }
    }
}

/// Generates the conformance tests for one method configuration:
/// `conformance!(module_name, config_fn, count_formula)`.
#[macro_export]
macro_rules! conformance {
    ($name:ident, $cfg:expr, $count:expr) => {
        $crate::conformance!($name, $cfg, $count, None);
    };
    // a method whose update depends on the input (the mixtures): merging is refused instead
    ($name:ident, $cfg:expr, $count:expr, $fd:expr, unmergeable) => {
        $crate::conformance!(@suite $name, $cfg, $count, $fd,
            merging_is_refused_and_leaves_w_unchanged, check_merge_refused);
    };
    ($name:ident, $cfg:expr, $count:expr, $fd:expr) => {
        $crate::conformance!(@suite $name, $cfg, $count, $fd,
            merged_weights_give_the_unmerged_output_and_unmerge_restores_w,
            check_merge_equals_unmerged_and_unmerge_restores);
    };
    (@suite $name:ident, $cfg:expr, $count:expr, $fd:expr, $merge:ident, $check:ident) => {
        mod $name {
            use super::*;
            #[test]
            fn a_zero_initialised_adapter_leaves_the_output_unchanged() {
                $crate::testing::check_identity_at_init(&$cfg());
            }
            #[test]
            fn $merge() {
                $crate::testing::$check(&$cfg());
            }
            #[test]
            fn saved_and_reloaded_tensors_give_bitwise_equal_outputs() {
                $crate::testing::check_save_load_bitwise(&$cfg());
            }
            #[test]
            fn only_adapter_variables_get_gradients_and_they_match_finite_differences() {
                $crate::testing::check_gradients(&$cfg(), $fd);
            }
            #[test]
            fn a_fused_forward_equals_the_composed_one_in_value_and_gradients() {
                $crate::testing::check_fused_equals_composed(&$cfg());
            }
            #[test]
            fn trainable_parameters_equal_the_formula() {
                $crate::testing::check_param_count(&$cfg(), $count);
            }
        }
    };
}

/// The output of `method`'s layer (config `cfg`) over `weight` (out, in) (dense, or raw blocks
/// in `quant`) with a bias, for a fixed input in training (the same draws each call): through
/// its fused form (`fused`, where it has one for that base) or the composed one on the base's
/// output; and the gradients of its tensors and of the input. `prepare` moves the layer off its
/// initial values where they would hide a term. A tensor outside this pass's graph (RoSA's
/// sparse values before their mask is chosen) has no gradient.
pub fn layer_pass(
    method: &dyn crate::adapter::AdapterMethod,
    cfg: &AdapterConfig,
    (weight, quant): (&Tensor, Option<petal_ops::quant::QFormat>),
    fused: bool,
    prepare: &dyn Fn(&dyn crate::adapter::AdapterLayer),
) -> (Tensor, Vec<Option<Tensor>>) {
    let out = weight.dim(0).unwrap();
    let inp = quant.map_or_else(|| weight.dim(1).unwrap(), |f| f.cols);
    let bias = rand_tensor(&[out], 2);
    let base = crate::adapter::BaseLinear {
        weight,
        bias: Some(&bias),
        in_features: inp,
        out_features: out,
        shared: &crate::adapter::Shared::new(inp, out).with_sizes(&[(out, inp)]),
        embedding: false,
        quant,
    };
    let layer = method.build(cfg, "fc", &base, 7).unwrap();
    prepare(layer.as_ref());
    let x = Var::from_tensor(&rand_tensor(&[3, 4, inp], 3)).unwrap();
    let k = petal_ops::Kernels::REFERENCE; // f32 products (bf16 ones over a bf16 W)
    let ctx = crate::Ctx::train(5).with_kernels(k);
    let xt = x.as_tensor();
    let b = Some(&bias);
    let one = match (fused, quant) {
        (false, _) => None,
        (true, Some(f)) => layer.fused_forward_quant(xt, weight, f, b, &ctx),
        (true, None) => layer.fused_forward(xt, weight, b, &ctx),
    };
    let y = match one {
        Some(y) => y.unwrap(),
        None => {
            let base = match quant {
                Some(f) => petal_ops::quant::quant_linear(k, xt, weight, f, b).unwrap(),
                None => petal_ops::frozen_linear(k, xt, weight, b).unwrap(),
            };
            layer.forward(xt, base, &ctx).unwrap()
        }
    };
    let proj = rand_tensor(y.dims(), 9);
    let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
    let mut grads: Vec<Option<Tensor>> = layer
        .tensors()
        .iter()
        .chain(&layer.shared_trained())
        .map(|t| g.get(t.var.as_tensor()).cloned())
        .collect();
    grads.push(Some(g.get(xt).unwrap().clone()));
    (y, grads)
}

/// `a` and `e` (two `layer_pass` results) agree: outputs within `tol`, gradients within 10x.
pub fn assert_passes_agree(
    a: &(Tensor, Vec<Option<Tensor>>),
    e: &(Tensor, Vec<Option<Tensor>>),
    tol: f32,
    what: &str,
) {
    let out = max_rel(&a.0, &e.0);
    assert!(out < tol, "{what}: output {out}");
    assert_eq!(a.1.len(), e.1.len());
    for (i, pair) in a.1.iter().zip(&e.1).enumerate() {
        match pair {
            (Some(a), Some(e)) => {
                let d = max_rel(a, e);
                assert!(d < 10.0 * tol, "{what}: gradient {i}: {d}");
            }
            (None, None) => {}
            _ => panic!("{what}: gradient {i} on one side only"),
        }
    }
}

/// Over a quantized base: `method`'s layer over a random W (`out`, `inp`, a multiple of 32)
/// kept in Q8_0 blocks equals its layer over the same W dequantized, in value and every
/// gradient, through the fused and the composed forms.
pub fn check_over_quantized_blocks(
    method: &dyn crate::adapter::AdapterMethod,
    cfg: &AdapterConfig,
    (out, inp): (usize, usize),
    prepare: &dyn Fn(&dyn crate::adapter::AdapterLayer),
) {
    use petal_ops::quant::{self, GgmlDType};
    let w = rand_tensor(&[out, inp], 1);
    let (q, fmt) = quant::quantize(&w, GgmlDType::Q8_0).unwrap();
    let deq = quant::dequantize(&q, fmt).unwrap();
    for fused in [false, true] {
        let over_q = layer_pass(method, cfg, (&q, Some(fmt)), fused, prepare);
        let over_deq = layer_pass(method, cfg, (&deq, None), fused, prepare);
        let what = format!("{} (fused {fused})", cfg.peft_type);
        assert_passes_agree(&over_q, &over_deq, 1e-5, &what);
    }
}
