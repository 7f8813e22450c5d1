//! Every fused kernel on bf16 activations against its f32 reference on the same bf16-rounded
//! values: f32 arithmetic inside, bf16 storage of results and gradients, nothing coarser.

use crate::attention::causal_attention_reference;
use crate::lora_linear::lora_linear_reference;
use crate::testing::{max_rel, projected_grads, rand, same_bf16};
use crate::Kernels;
use crate::*;
use candle_core::{DType, Device, Tensor, Var};

const BF: DType = DType::BF16;
/// bf16 keeps 8 significant bits: one rounding of a result is at most 2^-9 of it, and a sum of
/// rounded gradients a few of those.
const TOL: f32 = 1.5e-2;

fn skip_without_bf16_kernel() -> bool {
    let skip = !crate::bf16::available();
    if skip {
        eprintln!("skipped: this CPU has no AVX512-BF16");
    }
    skip
}

#[test]
fn rms_norm_on_bf16_activations_matches_the_f32_norm_of_the_rounded_input() {
    let w = rand(&[48], 5).to_dtype(BF).unwrap();
    let wf = w.to_dtype(DType::F32).unwrap();
    same_bf16(
        &[rand(&[3, 4, 48], 1)],
        TOL,
        |t| rms_norm(Kernels::FUSED, &t[0], &w, 1e-5).unwrap(),
        |t| nn::rms_norm_reference(&t[0], &wf, 1e-5).unwrap(),
    );
}

#[test]
fn rms_norm_of_an_f32_residual_into_a_bf16_weight_returns_bf16_and_an_f32_gradient() {
    let w = rand(&[40], 5).to_dtype(BF).unwrap();
    let wf = w.to_dtype(DType::F32).unwrap();
    let x = Var::from_tensor(&rand(&[6, 40], 2)).unwrap();
    let y = rms_norm(Kernels::FUSED, x.as_tensor(), &w, 1e-6).unwrap();
    assert_eq!(y.dtype(), BF);
    let r = nn::rms_norm_reference(x.as_tensor(), &wf, 1e-6).unwrap();
    let yf = y.to_dtype(DType::F32).unwrap();
    assert!(max_rel(&yf, &r) < 4e-3, "{}", max_rel(&yf, &r));
    let proj = rand(&[6, 40], 9);
    let (g, gr) = (projected_grads(&yf, &proj), projected_grads(&r, &proj));
    let (a, b) = (
        g.get(x.as_tensor()).unwrap(),
        gr.get(x.as_tensor()).unwrap(),
    );
    assert_eq!(a.dtype(), DType::F32);
    assert!(max_rel(a, b) < TOL, "{}", max_rel(a, b));
}

#[test]
fn swiglu_on_bf16_activations_matches_silu_times_up_in_f32() {
    same_bf16(
        &[rand(&[3, 700], 3), rand(&[3, 700], 4)],
        TOL,
        |t| swiglu(Kernels::FUSED, &t[0], &t[1]).unwrap(),
        |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
    );
}

#[test]
fn rope_on_bf16_activations_matches_the_f32_rotation() {
    let inv: Vec<f32> = (0..4)
        .map(|i| 1.0 / 10000f32.powf(i as f32 / 4.0))
        .collect();
    let (cos, sin) = nn::rope_tables(&inv, 16, &Device::Cpu).unwrap();
    let (c, s) = (cos.narrow(0, 3, 5).unwrap(), sin.narrow(0, 3, 5).unwrap());
    same_bf16(
        &[rand(&[2, 3, 5, 8], 6)],
        TOL,
        |t| apply_rope(Kernels::FUSED, &t[0], &c, &s).unwrap(),
        |t| nn::apply_rope_reference(&t[0], &c, &s).unwrap(),
    );
}

#[test]
fn causal_attention_on_bf16_activations_matches_the_f32_composed_attention() {
    for (b, g, rep, t, offset, d) in [(2, 2, 2, 16, 0, 8), (1, 2, 3, 50, 4, 8)] {
        let scale = 1.0 / (d as f64).sqrt();
        same_bf16(
            &[
                rand(&[b, g, rep * t, d], 1),
                rand(&[b, g, t + offset, d], 2),
                rand(&[b, g, t + offset, d], 3),
            ],
            TOL,
            |x| causal_attention(Kernels::FUSED, &x[0], &x[1], &x[2], scale, t, offset).unwrap(),
            |x| causal_attention_reference(&x[0], &x[1], &x[2], scale, t, offset).unwrap(),
        );
    }
}

#[test]
fn token_major_attention_on_bf16_activations_matches_the_f32_composed_attention() {
    let (b, t, nh, nkv, keys, d) = (2, 9, 4, 2, 12, 8);
    let scale = 1.0 / (d as f64).sqrt();
    same_bf16(
        &[
            rand(&[b, t, nh, d], 1),
            rand(&[b, keys, nkv, d], 2),
            rand(&[b, keys, nkv, d], 3),
        ],
        TOL,
        |x| causal_attention_bthd(Kernels::FUSED, &x[0], &x[1], &x[2], d, scale, None).unwrap(),
        |x| {
            let g = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
            let qg = g(&x[0]).reshape((b, nkv, nh / nkv * t, d)).unwrap();
            let o =
                causal_attention_reference(&qg, &g(&x[1]), &g(&x[2]), scale, t, keys - t).unwrap();
            let o = o.reshape((b, nh, t, d)).unwrap();
            o.transpose(1, 2).unwrap().contiguous().unwrap()
        },
    );
}

#[test]
fn frozen_linear_on_bf16_activations_matches_the_f32_product_of_the_rounded_values() {
    if skip_without_bf16_kernel() {
        return;
    }
    let w = rand(&[40, 37], 1).to_dtype(BF).unwrap();
    let wf = w.to_dtype(DType::F32).unwrap();
    let bias = rand(&[40], 2).to_dtype(BF).unwrap();
    let bf = bias.to_dtype(DType::F32).unwrap();
    same_bf16(
        &[rand(&[2, 3, 37], 3)],
        TOL,
        |t| frozen_linear(Kernels::FUSED, &t[0], &w, Some(&bias)).unwrap(),
        |t| {
            t[0].broadcast_matmul(&wf.t().unwrap())
                .unwrap()
                .broadcast_add(&bf)
                .unwrap()
        },
    );
}

#[test]
fn one_node_lora_on_bf16_activations_matches_the_f32_composition() {
    if skip_without_bf16_kernel() {
        return;
    }
    let w = rand(&[40, 37], 1).to_dtype(BF).unwrap();
    let wf = w.to_dtype(DType::F32).unwrap();
    // x is a bf16 activation; A and B are f32 adapter weights (trainable)
    bf16_input_f32_params(
        rand(&[2, 3, 37], 3),
        &[rand(&[4, 37], 4), rand(&[40, 4], 5)],
        |x, p| lora(Kernels::FUSED, x, &w, None, &p[0], &p[1], 0.5).unwrap(),
        |x, p| {
            let h = x
                .reshape((6, 37))
                .unwrap()
                .matmul(&p[0].t().unwrap())
                .unwrap();
            lora_linear_reference(x, &wf, None, &h, &p[1], 0.5).unwrap()
        },
    );
}

#[test]
fn residual_add_of_a_bf16_output_to_an_f32_stream_is_exact_and_splits_the_gradient() {
    let x = Var::from_tensor(&rand(&[5, 33], 1)).unwrap();
    let a = Var::from_tensor(&rand(&[5, 33], 2).to_dtype(BF).unwrap()).unwrap();
    let y = residual_add(Kernels::FUSED, x.as_tensor(), a.as_tensor()).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    let want = (x.as_tensor() + a.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
    assert_eq!(max_rel(&y, &want), 0.0);
    let proj = rand(&[5, 33], 3);
    let g = projected_grads(&y, &proj);
    assert_eq!(max_rel(g.get(x.as_tensor()).unwrap(), &proj), 0.0);
    let ga = g.get(a.as_tensor()).unwrap();
    assert_eq!(ga.dtype(), BF);
    let rounded = proj.to_dtype(BF).unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(max_rel(&ga.to_dtype(DType::F32).unwrap(), &rounded), 0.0);
}

#[test]
fn head_loss_on_bf16_hidden_states_matches_logits_then_cross_entropy_in_f32() {
    if skip_without_bf16_kernel() {
        return;
    }
    let w = rand(&[300, 40], 3).to_dtype(BF).unwrap();
    let wf = w.to_dtype(DType::F32).unwrap();
    let labels: Vec<i64> = (0..260).map(|i| (i * 7 % 300) as i64).collect();
    let lab = Tensor::from_slice(&labels, 260, &Device::Cpu).unwrap();
    same_bf16(
        &[rand(&[260, 40], 4)],
        TOL,
        |t| {
            head_cross_entropy(Kernels::FUSED, &t[0], &w, &labels)
                .unwrap()
                .0
        },
        |t| {
            masked_cross_entropy(
                Kernels::FUSED,
                &t[0].matmul(&wf.t().unwrap()).unwrap(),
                &lab,
            )
            .unwrap()
            .0
        },
    );
}

/// An op on a bf16 activation `x` with f32 parameters against its f32 reference on x's rounded
/// values: the output in bf16, x's gradient in bf16 and the parameters' in f32, all within
/// bf16 precision.
fn bf16_input_f32_params(
    x: Tensor,
    params: &[Tensor],
    fast: impl Fn(&Tensor, &[Tensor]) -> Tensor,
    reference: impl Fn(&Tensor, &[Tensor]) -> Tensor,
) {
    let x = Var::from_tensor(&x.to_dtype(BF).unwrap()).unwrap();
    let xr = Var::from_tensor(&x.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
    let ps: Vec<Var> = params
        .iter()
        .map(|p| Var::from_tensor(p).unwrap())
        .collect();
    let pt: Vec<Tensor> = ps.iter().map(|v| v.as_tensor().clone()).collect();
    let out = fast(x.as_tensor(), &pt);
    assert_eq!(out.dtype(), BF);
    let r = reference(xr.as_tensor(), &pt);
    let of = out.to_dtype(DType::F32).unwrap();
    assert!(max_rel(&of, &r) < 4e-3, "values: {}", max_rel(&of, &r));
    let proj = rand(r.dims(), 9);
    let (g, gr) = (projected_grads(&of, &proj), projected_grads(&r, &proj));
    let gx = g.get(x.as_tensor()).unwrap();
    assert_eq!(gx.dtype(), BF);
    let rel = max_rel(
        &gx.to_dtype(DType::F32).unwrap(),
        gr.get(xr.as_tensor()).unwrap(),
    );
    assert!(rel < TOL, "dx: {rel}");
    for (i, p) in ps.iter().enumerate() {
        let (a, b) = (
            g.get(p.as_tensor()).unwrap(),
            gr.get(p.as_tensor()).unwrap(),
        );
        assert_eq!(a.dtype(), DType::F32);
        assert!(max_rel(a, b) < TOL, "parameter {i}: {}", max_rel(a, b));
    }
}

#[test]
fn scaling_bf16_activations_by_an_f32_vector_matches_the_broadcast_f32_product() {
    bf16_input_f32_params(
        rand(&[3, 7, 40], 1),
        &[rand(&[40], 2)],
        |x, p| scale_last(Kernels::FUSED, x, &p[0]).unwrap(),
        |x, p| x.broadcast_mul(&p[0]).unwrap(),
    );
}

#[test]
fn pair_rotating_bf16_activations_matches_the_composed_f32_rotation() {
    bf16_input_f32_params(
        rand(&[3, 5, 32], 1),
        &[rand(&[32], 2), rand(&[32], 3)],
        |x, p| pair_rotate(Kernels::FUSED, x, &p[0], &p[1], 8).unwrap(),
        |x, p| crate::pair_rotate::pair_rotate_reference(x, &p[0], &p[1], 8).unwrap(),
    );
}

#[test]
fn rotating_blocks_of_bf16_activations_matches_the_batched_f32_product() {
    bf16_input_f32_params(
        rand(&[9, 24], 1),
        &[rand(&[3, 8, 8], 2)],
        |x, p| crate::rotate_blocks(Kernels::FUSED, x, &p[0]).unwrap(),
        |x, p| crate::blocks::rotate_blocks_reference(x, &p[0]).unwrap(),
    );
}
