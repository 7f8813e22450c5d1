//! Helpers for tests across the workspace: seeded random tensors, relative error, and the
//! fast-kernel-vs-reference check (values, and input gradients through a random projection).
use candle_core::{DType, Device, Tensor, Var};

/// A test that cannot run here because a tool is missing (a venv, `mpirun`, g++) says so and
/// passes; with `PETAL_TESTS_STRICT=1` it fails instead, so a machine meant to run every test
/// (CI with the tools installed) notices. Missing CPU features are not tools: those tests
/// skip either way.
pub fn skip_missing_tool(why: &str) {
    if std::env::var("PETAL_TESTS_STRICT").is_ok_and(|v| v == "1") {
        panic!("{why} (PETAL_TESTS_STRICT=1: a missing tool fails the test)");
    }
    eprintln!("skipped: {why}");
}

pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        (0..n)
            .map(|_| r.gen_range(-2.0f32..2.0))
            .collect::<Vec<_>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

/// log-softmax over the last axis, composed from candle's differentiable ops (a reference
/// for the fused losses' values and gradients).
pub fn log_softmax(x: &Tensor) -> Tensor {
    use candle_core::D;
    let max = x.max_keepdim(D::Minus1).unwrap().detach();
    let z = x.broadcast_sub(&max).unwrap();
    let lse = z
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap();
    z.broadcast_sub(&lse).unwrap()
}

/// The largest absolute difference of two tensors of one shape.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-12)
}

/// Gradients of `sum(y * proj)` (an f32 `y`): every input gradient of y seen through one random
/// projection of its output.
pub fn projected_grads(y: &Tensor, proj: &Tensor) -> candle_core::backprop::GradStore {
    (y * proj).unwrap().sum_all().unwrap().backward().unwrap()
}

/// Both functions of the same inputs must agree in value and in every input gradient.
pub fn same(
    inputs: &[Tensor],
    fast: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (f, r) = (fast(&ts), reference(&ts));
    assert_eq!(f.dims(), r.dims());
    assert!(max_rel(&f, &r) < 1e-5, "values differ: {}", max_rel(&f, &r));
    let proj = rand(f.dims(), 99).to_device(f.device()).unwrap();
    let (gf, gr) = (projected_grads(&f, &proj), projected_grads(&r, &proj));
    for (i, v) in vars.iter().enumerate() {
        let (a, b) = (
            gf.get(v.as_tensor()).unwrap(),
            gr.get(v.as_tensor()).unwrap(),
        );
        assert!(
            max_rel(a, b) < 1e-4,
            "gradient of input {i} differs: {}",
            max_rel(a, b)
        );
    }
}

/// `same` for bf16 activations: `fast` gets the inputs rounded to bf16 (bf16 tensors),
/// `reference` the same rounded values in f32 (f32 arithmetic throughout). The value and every
/// input gradient must agree within `tol` of the largest entry: bf16 storage of the output
/// and of the gradients (relative step 2^-8) and nothing more.
pub fn same_bf16(
    inputs: &[Tensor],
    tol: f32,
    fast: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
) {
    let rounded: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::BF16).unwrap())
        .collect();
    let fv: Vec<Var> = rounded
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let rv: Vec<Var> = rounded
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap())
        .collect();
    let ft: Vec<Tensor> = fv.iter().map(|v| v.as_tensor().clone()).collect();
    let rt: Vec<Tensor> = rv.iter().map(|v| v.as_tensor().clone()).collect();
    let (f, r) = (fast(&ft), reference(&rt));
    assert_eq!(f.dims(), r.dims());
    let f32f = f.to_dtype(DType::F32).unwrap();
    assert!(
        max_rel(&f32f, &r) < tol,
        "values differ: {}",
        max_rel(&f32f, &r)
    );
    let proj = rand(f.dims(), 99).to_device(f.device()).unwrap();
    let (gf, gr) = (projected_grads(&f32f, &proj), projected_grads(&r, &proj));
    for (i, (a, b)) in fv.iter().zip(&rv).enumerate() {
        let ga = gf.get(a.as_tensor()).unwrap();
        assert_eq!(
            ga.dtype(),
            DType::BF16,
            "gradient {i} is not in its input's dtype"
        );
        let ga = ga.to_dtype(DType::F32).unwrap();
        let gb = gr.get(b.as_tensor()).unwrap();
        let rel = max_rel(&ga, gb);
        assert!(rel < tol, "gradient of input {i} differs: {rel}");
    }
}

/// Central differences (f(v + eps) - f(v - eps)) / 2 eps of `f` with respect to entries `idx` of
/// `var`, which is restored afterwards.
pub fn central_differences(var: &Var, idx: &[usize], eps: f32, f: impl Fn() -> f64) -> Vec<f64> {
    let shape = var.as_tensor().shape().clone();
    let base = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let at = |i: usize, d: f32| {
        let mut p = base.clone();
        p[i] += d;
        var.set(&Tensor::from_vec(p, shape.clone(), var.as_tensor().device()).unwrap())
            .unwrap();
        f()
    };
    let out = idx
        .iter()
        .map(|&i| (at(i, eps) - at(i, -eps)) / (2.0 * eps as f64))
        .collect();
    var.set(&Tensor::from_vec(base, shape, var.as_tensor().device()).unwrap())
        .unwrap();
    out
}
