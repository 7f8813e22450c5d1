//! L4Q's and LR-QAT's tests (the layer against its composed twin, closed forms and the
//! PyTorch transcription in `tools/golden/l4q_oracle.py`).

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
        w0: Some(w0),
        codes: None,
        frac: 1.0,
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
    let v = (l.w0.as_ref().unwrap()
        + (l.b.as_tensor().matmul(l.a.as_tensor()).unwrap() * 2.0).unwrap())
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
    let lean = (l.delta().unwrap() + l.w0.as_ref().unwrap()).unwrap();
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

type Fixture = std::collections::HashMap<String, Tensor>;

/// Case `c` of `tools/golden/l4q_oracle.py`'s fixture as a layer: L4Q holding W, or LR-QAT
/// holding W's 8-bit codes only (as over a quantized base).
fn oracle_layer(t: &Fixture, c: &str, lr_qat: bool) -> L4qLayer {
    let get = |k: &str| t[&format!("{c}.{k}")].clone();
    let p = get("params").to_vec1::<f32>().unwrap();
    let (s, group, bits) = (p[0] as f64, p[1] as usize, p[2] as usize);
    let w0 = get("w0");
    let levels = ((1 << bits) - 1) as f64;
    let (step0, offset0) = min_max_grid(&w0, group, bits).unwrap();
    let (w0, codes, frac) = match lr_qat {
        false => (Some(w0), None, 1.0),
        true => {
            let codes = fixed_point_codes(&w0, &step0, &offset0, group, levels, bits).unwrap();
            (None, Some(codes), (1 << (8 - bits)) as f64)
        }
    };
    let grid = Tensor::stack(&[get("theta"), get("phi")], 0).unwrap();
    L4qLayer {
        a: Var::from_tensor(&get("a")).unwrap(),
        b: Var::from_tensor(&get("b")).unwrap(),
        grid: Var::from_tensor(&grid).unwrap(),
        step0,
        offset0,
        w0,
        codes,
        frac,
        scale: s,
        levels,
        group,
        learn_grid: true,
    }
}

/// The gradients of A, B, θ, φ for the loss `sum(out ⊙ gout)` against case `c`'s.
fn check_oracle_gradients(t: &Fixture, c: &str, l: &L4qLayer, out: &Tensor) {
    let get = |k: &str| t[&format!("{c}.{k}")].clone();
    let grads = (out * &get("gout"))
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

/// Against `tools/golden/l4q_oracle.py`, a PyTorch transcription of the quantizer written
/// apart from this file: Ŵ - W and the gradients of A, B, θ, φ at 4, 3 and 2 bits (with
/// 10-40% of the values clipped).
#[test]
fn the_lean_node_equals_the_pytorch_transcription_in_value_and_gradients() {
    let t = crate::testing::golden_fixture("l4q");
    for c in ["b4", "b3", "b2"] {
        let l = oracle_layer(&t, c, false);
        let d = l.delta().unwrap();
        assert!(max_rel(&d, &t[&format!("{c}.delta")]) < 1e-5, "{c}: delta");
        check_oracle_gradients(&t, c, &l, &d);
    }
}

/// LR-QAT against the same transcription: W's 8-bit fixed-point codes, Ŵ with the low-rank term
/// added in the grid's integer domain, and the gradients of A, B, θ, φ (27-45% clipped), with
/// no W held (as over a quantized base).
#[test]
fn lr_qat_equals_the_pytorch_transcription_in_codes_value_and_gradients() {
    let t = crate::testing::golden_fixture("l4q");
    for c in ["q4", "q3"] {
        let l = oracle_layer(&t, c, true);
        let want_codes = t[&format!("{c}.codes8")].to_dtype(DType::U8).unwrap();
        let codes = l.codes.as_ref().unwrap();
        let same = codes.eq(&want_codes).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(
            same.mean_all().unwrap().to_scalar::<f32>().unwrap(),
            1.0,
            "{c}: codes"
        );
        let what = l.delta().unwrap(); // Ŵ itself: no W held
        assert!(max_rel(&what, &t[&format!("{c}.what")]) < 1e-5, "{c}: Ŵ");
        assert!(
            max_rel(&l.quantized().unwrap(), &what) < 1e-6,
            "{c}: the composed twin"
        );
        check_oracle_gradients(&t, c, &l, &what);
    }
}
