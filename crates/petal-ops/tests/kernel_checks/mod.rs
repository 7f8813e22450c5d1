//! The checks of petal's CUDA kernels, for a device where they run: a GPU
//! (`cuda_kernels.rs`, `--features cuda`) or the CPU through the emulated modules
//! (`cuda_emulated.rs`). Each op against autograd through the composed candle ops, or the
//! definition, on the same device: values and every input gradient, f32 and bf16.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, D};
use petal_ops::cuda::Family;
use petal_ops::testing::{max_rel, rand, same, same_bf16};
use petal_ops::{nn, Kernels};

/// Every op's choice in these checks: petal's CUDA kernels, all families.
pub fn kernels() -> Kernels {
    Kernels::FUSED.with_cuda(&Family::ALL)
}

/// Seeded inputs on `dev`.
pub fn on(dev: &Device, shapes: &[&[usize]]) -> Vec<Tensor> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| rand(s, 11 + i as u64).to_device(dev).unwrap())
        .collect()
}

fn tables(t: usize, d: usize, dev: &Device) -> (Tensor, Tensor) {
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10f32.powf(i as f32 / 3.0))
        .collect();
    nn::rope_tables(&inv, t, dev).unwrap()
}

pub fn the_rms_norm_kernel_matches_autograd_through_the_composed_norm(dev: &Device) {
    let w = on(dev, &[&[96]]).remove(0); // frozen
    let x = on(dev, &[&[3, 5, 96]]);
    same(
        &x,
        |t| petal_ops::rms_norm(kernels(), &t[0], &w, 1e-5).unwrap(),
        |t| nn::rms_norm_reference(&t[0], &w, 1e-5).unwrap(),
    );
    // a row longer than one block of threads, bf16 activations and weight
    let wb = on(dev, &[&[1500]]).remove(0).to_dtype(DType::BF16).unwrap();
    let wf = wb.to_dtype(DType::F32).unwrap();
    same_bf16(
        &on(dev, &[&[4, 1500]]),
        2e-2,
        |t| petal_ops::rms_norm(kernels(), &t[0], &wb, 1e-5).unwrap(),
        |t| nn::rms_norm_reference(&t[0], &wf, 1e-5).unwrap(),
    );
}

pub fn the_rms_norm_kernel_normalises_an_f32_stream_into_a_bf16_weights_dtype(dev: &Device) {
    let wb = on(dev, &[&[64]]).remove(0).to_dtype(DType::BF16).unwrap();
    let x = on(dev, &[&[6, 64]]).remove(0);
    let y = petal_ops::rms_norm(kernels(), &x, &wb, 1e-6).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let r = nn::rms_norm_reference(&x, &wb.to_dtype(DType::F32).unwrap(), 1e-6).unwrap();
    assert!(max_rel(&y.to_dtype(DType::F32).unwrap(), &r) < 1e-2);
}

pub fn the_softmax_kernel_matches_autograd_through_the_composed_softmax(dev: &Device) {
    same(
        &on(dev, &[&[3, 5, 77]]),
        |t| petal_ops::softmax_last_dim(kernels(), &t[0]).unwrap(),
        |t| nn::softmax_last_dim_reference(&t[0]).unwrap(),
    );
    same_bf16(
        &on(dev, &[&[2, 2100]]),
        2e-2,
        |t| petal_ops::softmax_last_dim(kernels(), &t[0]).unwrap(),
        |t| nn::softmax_last_dim_reference(&t[0]).unwrap(),
    );
}

pub fn the_causal_softmax_kernel_matches_autograd_through_scale_mask_and_softmax(dev: &Device) {
    // (b, g, R = 2 groups of t = 5 queries, 7 keys): two keys seen before the queries
    let reference = |s: &Tensor| {
        let mask = nn::causal_mask(5, 2, DType::F32, dev).unwrap();
        let g = (s * 0.3).unwrap().reshape((6, 5, 7)).unwrap();
        let g = g.broadcast_add(&mask).unwrap().reshape((3, 10, 7)).unwrap();
        nn::softmax_last_dim_reference(&g).unwrap()
    };
    same(
        &on(dev, &[&[3, 10, 7]]),
        |t| petal_ops::causal_softmax(kernels(), &t[0], 0.3, 5, 2).unwrap(),
        |t| reference(&t[0]),
    );
    same_bf16(
        &on(dev, &[&[3, 10, 7]]),
        2e-2,
        |t| petal_ops::causal_softmax(kernels(), &t[0], 0.3, 5, 2).unwrap(),
        |t| reference(&t[0]),
    );
}

pub fn the_rope_kernel_matches_autograd_through_the_composed_rotation_in_both_layouts(
    dev: &Device,
) {
    let (c, s) = tables(12, 16, dev);
    let (c, s) = (c.narrow(0, 4, 6).unwrap(), s.narrow(0, 4, 6).unwrap()); // positions 4..10
    same(
        &on(dev, &[&[2, 3, 6, 16]]), // (b, h, t, d)
        |t| petal_ops::apply_rope(kernels(), &t[0], &c, &s).unwrap(),
        |t| nn::apply_rope_reference(&t[0], &c, &s).unwrap(),
    );
    let heads_first = |x: &Tensor| {
        let x = x.reshape((2, 6, 3, 16)).unwrap().transpose(1, 2).unwrap();
        let y = nn::apply_rope_reference(&x.contiguous().unwrap(), &c, &s).unwrap();
        y.transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((2, 6, 48))
            .unwrap()
    };
    same(
        &on(dev, &[&[2, 6, 48]]), // (b, t, h * d)
        |t| petal_ops::apply_rope_bthd(kernels(), &t[0], &c, &s).unwrap(),
        |t| heads_first(&t[0]),
    );
    same_bf16(
        &on(dev, &[&[2, 6, 48]]),
        2e-2,
        |t| petal_ops::apply_rope_bthd(kernels(), &t[0], &c, &s).unwrap(),
        |t| heads_first(&t[0]),
    );
}

pub fn the_swiglu_kernel_matches_autograd_through_silu_times_up(dev: &Device) {
    same(
        &on(dev, &[&[3, 700], &[3, 700]]),
        |t| petal_ops::swiglu(kernels(), &t[0], &t[1]).unwrap(),
        |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
    );
    same_bf16(
        &on(dev, &[&[3, 700], &[3, 700]]),
        2e-2,
        |t| petal_ops::swiglu(kernels(), &t[0], &t[1]).unwrap(),
        |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
    );
}

/// Summed cross-entropy from its definition: log-sum-exp minus the label's logit, on counted
/// rows (labels >= 0), differentiable through candle's autograd.
fn cross_entropy_by_definition(x: &Tensor, labels: &[i64]) -> Tensor {
    let (n, v) = x.dims2().unwrap();
    let dev = x.device();
    let onehot: Vec<f32> = (0..n * v)
        .map(|i| f32::from(labels[i / v] == (i % v) as i64))
        .collect();
    let keep: Vec<f32> = labels.iter().map(|&l| f32::from(l >= 0)).collect();
    let onehot = Tensor::from_vec(onehot, (n, v), dev).unwrap();
    let keep = Tensor::from_vec(keep, n, dev).unwrap();
    let max = x.max_keepdim(D::Minus1).unwrap().detach();
    let lse = (x.broadcast_sub(&max).unwrap().exp().unwrap())
        .sum(D::Minus1)
        .unwrap()
        .log()
        .unwrap()
        + max.squeeze(1).unwrap();
    let picked = (x * onehot).unwrap().sum(D::Minus1).unwrap();
    ((lse.unwrap() - picked).unwrap() * keep)
        .unwrap()
        .sum_all()
        .unwrap()
}

pub fn the_cross_entropy_kernels_match_the_definition_in_value_and_gradient(dev: &Device) {
    let labels = [3i64, -100, 0, 1999, -100, 7];
    let lab = Tensor::new(&labels, dev).unwrap();
    same(
        &on(dev, &[&[6, 2000]]),
        |t| {
            petal_ops::masked_cross_entropy(kernels(), &t[0], &lab)
                .unwrap()
                .0
        },
        |t| cross_entropy_by_definition(&t[0], &labels),
    );
}

pub fn the_head_loss_matches_logits_then_cross_entropy_by_definition(dev: &Device) {
    // 300 rows of a 50000-word head: four chunks of logits, ignored rows among them
    let labels: Vec<i64> = (0..300)
        .map(|i| {
            if i % 7 == 3 {
                -100
            } else {
                (i * 3037 % 50000) as i64
            }
        })
        .collect();
    let w = (rand(&[50000, 64], 6) * 0.1)
        .unwrap()
        .to_device(dev)
        .unwrap();
    let h = on(dev, &[&[300, 64]]);
    same(
        &h,
        |t| {
            petal_ops::head_cross_entropy(kernels(), &t[0], &w, &labels)
                .unwrap()
                .0
        },
        |t| cross_entropy_by_definition(&t[0].matmul(&w.t().unwrap()).unwrap(), &labels),
    );
}

/// Attention from its definition on the token-major layout (b, n, heads * d): RoPE on heads
/// turned first (query i at position T - t + i, keys from `from` on), kv heads repeated for
/// their query heads, scaled scores, causal mask, softmax, values; differentiable by autograd.
fn attention_by_definition(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d: usize,
    scale: f64,
    rope: Option<(&Tensor, &Tensor, usize)>,
) -> Tensor {
    let (b, t, keys) = (q.dim(0).unwrap(), q.dim(1).unwrap(), k.dim(1).unwrap());
    let (nh, nkv) = (q.dim(2).unwrap() / d, k.dim(2).unwrap() / d);
    let first = |x: &Tensor, heads: usize| {
        let n = x.dim(1).unwrap();
        x.reshape((b, n, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (mut qh, mut kh, vh) = (first(q, nh), first(k, nkv), first(v, nkv));
    if let Some((cos, sin, from)) = rope {
        let rot = |x: &Tensor, p0: usize, n: usize| {
            let (c, s) = (cos.narrow(0, p0, n).unwrap(), sin.narrow(0, p0, n).unwrap());
            nn::apply_rope_reference(x, &c, &s).unwrap()
        };
        qh = rot(&qh, keys - t, t);
        let tail = rot(&kh.narrow(2, from, keys - from).unwrap(), from, keys - from);
        kh = Tensor::cat(&[&kh.narrow(2, 0, from).unwrap(), &tail], 2).unwrap();
    }
    let rep = |x: &Tensor| {
        let heads: Vec<Tensor> = (0..nh)
            .map(|h| x.narrow(1, h / (nh / nkv), 1).unwrap())
            .collect();
        Tensor::cat(&heads, 1).unwrap()
    };
    let (kr, vr) = (rep(&kh), rep(&vh));
    let mask = nn::causal_mask(t, keys - t, DType::F32, q.device()).unwrap();
    let scores = (qh.matmul(&kr.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
    let o = nn::softmax_last_dim_reference(&scores)
        .unwrap()
        .matmul(&vr)
        .unwrap();
    o.transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((b, t, nh * d))
        .unwrap()
}

pub fn the_attention_kernels_match_autograd_through_the_definition(dev: &Device) {
    // (b, t, T, query heads, kv heads, head size): several query blocks and key tiles, keys
    // seen before the queries, grouped heads, the 16-wide tiles of heads over 64 values
    for (b, t, keys, nh, nkv, d) in [
        (2, 5, 5, 2, 2, 64),
        (1, 37, 45, 4, 2, 64),
        (2, 20, 23, 3, 1, 128),
        (1, 70, 70, 2, 1, 32),
    ] {
        let x = on(
            dev,
            &[&[b, t, nh * d], &[b, keys, nkv * d], &[b, keys, nkv * d]],
        );
        let scale = 1.0 / (d as f64).sqrt();
        same(
            &x,
            |x| {
                petal_ops::causal_attention_bthd(kernels(), &x[0], &x[1], &x[2], d, scale, None)
                    .unwrap()
            },
            |x| attention_by_definition(&x[0], &x[1], &x[2], d, scale, None),
        );
    }
}

pub fn the_attention_kernels_rotate_by_rope_and_take_bf16(dev: &Device) {
    let (b, t, keys, nh, nkv, d) = (2, 33, 40, 4, 2, 64);
    let (cos, sin) = tables(64, d, dev);
    let x = on(
        dev,
        &[&[b, t, nh * d], &[b, keys, nkv * d], &[b, keys, nkv * d]],
    );
    let rope = petal_ops::Rope {
        cos: &cos,
        sin: &sin,
        from: 3, // three prefix keys stay unrotated
    };
    let scale = 0.125;
    same(
        &x,
        |x| {
            petal_ops::causal_attention_bthd(kernels(), &x[0], &x[1], &x[2], d, scale, Some(rope))
                .unwrap()
        },
        |x| attention_by_definition(&x[0], &x[1], &x[2], d, scale, Some((&cos, &sin, 3))),
    );
    same_bf16(
        &x,
        3e-2,
        |x| {
            petal_ops::causal_attention_bthd(kernels(), &x[0], &x[1], &x[2], d, scale, Some(rope))
                .unwrap()
        },
        |x| attention_by_definition(&x[0], &x[1], &x[2], d, scale, Some((&cos, &sin, 3))),
    );
}

/// LoRA from its definition, x W^T + bias + scale (x A^T) B^T, by candle's matmuls.
fn lora_by_definition(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    a: &Tensor,
    b: &Tensor,
    s: f64,
) -> Tensor {
    let base = x
        .broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(bias)
        .unwrap();
    let low = x.broadcast_matmul(&a.t().unwrap()).unwrap();
    let d = (low.broadcast_matmul(&b.t().unwrap()).unwrap() * s).unwrap();
    (base + d).unwrap()
}

pub fn the_lora_kernel_matches_autograd_through_its_definition(dev: &Device) {
    // rows longer than a block (in 300, out 700), rank 8, a frozen W and bias
    let (w, bias) = (
        on(dev, &[&[700, 300]]).remove(0),
        on(dev, &[&[700]]).remove(0),
    );
    let x = on(dev, &[&[2, 5, 300], &[8, 300], &[700, 8]]);
    same(
        &x,
        |t| petal_ops::lora(kernels(), &t[0], &w, Some(&bias), &t[1], &t[2], 1.5).unwrap(),
        |t| lora_by_definition(&t[0], &w, &bias, &t[1], &t[2], 1.5),
    );
    // bf16 activations (and base product) with f32 A and B: the value within bf16 rounding
    let xb = x[0].to_dtype(DType::BF16).unwrap();
    let got = petal_ops::lora(
        kernels(),
        &xb,
        &w.to_dtype(DType::BF16).unwrap(),
        None,
        &x[1],
        &x[2],
        1.5,
    )
    .unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    let wr = w
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let zero = bias.zeros_like().unwrap();
    let want = lora_by_definition(
        &xb.to_dtype(DType::F32).unwrap(),
        &wr,
        &zero,
        &x[1],
        &x[2],
        1.5,
    );
    let rel = max_rel(&got.to_dtype(DType::F32).unwrap(), &want);
    assert!(rel < 2e-2, "bf16 lora differs: {rel}");
}
