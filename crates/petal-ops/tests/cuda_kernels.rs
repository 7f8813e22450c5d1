//! petal's CUDA kernels on a GPU against autograd through the composed candle ops on the same
//! GPU (values and every input gradient, f32 and bf16), and the head loss against the CPU's
//! fused kernel. Built with `--features cuda` only; each test needs a CUDA device.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, D};
use petal_ops::nn;
use petal_ops::testing::{max_rel, rand, same, same_bf16};

/// The GPU, with petal's kernels switched on.
fn gpu() -> Device {
    petal_ops::cuda::set_enabled(true);
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

/// Seeded inputs on the GPU.
fn on_gpu(shapes: &[&[usize]]) -> Vec<Tensor> {
    let dev = gpu();
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| rand(s, 11 + i as u64).to_device(&dev).unwrap())
        .collect()
}

fn tables(t: usize, d: usize, dev: &Device) -> (Tensor, Tensor) {
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10f32.powf(i as f32 / 3.0))
        .collect();
    nn::rope_tables(&inv, t, dev).unwrap()
}

#[test]
fn the_kernels_compile_with_nvrtc() {
    // needs NVRTC only, no GPU
    use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
    let compile = |src: String, options: Vec<String>| {
        let opts = CompileOptions {
            arch: Some("compute_80"),
            options,
            ..Default::default()
        };
        compile_ptx_with_opts(src, opts).expect("NVRTC").to_src()
    };
    assert!(compile(petal_ops::cuda::source(), vec![]).contains(".entry rms_fwd_f32_bf16"));
    for d in [32, 64, 80, 128] {
        let (src, options) = petal_ops::cuda::attention_source(d);
        assert!(compile(src, options).contains(".entry attn_dkv_bf16"));
    }
}

#[test]
fn the_rms_norm_kernel_matches_autograd_through_the_composed_norm() {
    let w = on_gpu(&[&[96]]).remove(0); // frozen
    let x = on_gpu(&[&[3, 5, 96]]);
    same(
        &x,
        |t| petal_ops::rms_norm(&t[0], &w, 1e-5).unwrap(),
        |t| nn::rms_norm_reference(&t[0], &w, 1e-5).unwrap(),
    );
    // a row longer than one block of threads, bf16 activations and weight
    let wb = on_gpu(&[&[1500]]).remove(0).to_dtype(DType::BF16).unwrap();
    let wf = wb.to_dtype(DType::F32).unwrap();
    same_bf16(
        &on_gpu(&[&[4, 1500]]),
        2e-2,
        |t| petal_ops::rms_norm(&t[0], &wb, 1e-5).unwrap(),
        |t| nn::rms_norm_reference(&t[0], &wf, 1e-5).unwrap(),
    );
}

#[test]
fn the_rms_norm_kernel_normalises_an_f32_stream_into_a_bf16_weights_dtype() {
    let wb = on_gpu(&[&[64]]).remove(0).to_dtype(DType::BF16).unwrap();
    let x = on_gpu(&[&[6, 64]]).remove(0);
    let y = petal_ops::rms_norm(&x, &wb, 1e-6).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let r = nn::rms_norm_reference(&x, &wb.to_dtype(DType::F32).unwrap(), 1e-6).unwrap();
    assert!(max_rel(&y.to_dtype(DType::F32).unwrap(), &r) < 1e-2);
}

#[test]
fn the_softmax_kernel_matches_autograd_through_the_composed_softmax() {
    same(
        &on_gpu(&[&[3, 5, 77]]),
        |t| petal_ops::softmax_last_dim(&t[0]).unwrap(),
        |t| nn::softmax_last_dim_reference(&t[0]).unwrap(),
    );
    same_bf16(
        &on_gpu(&[&[2, 2100]]),
        2e-2,
        |t| petal_ops::softmax_last_dim(&t[0]).unwrap(),
        |t| nn::softmax_last_dim_reference(&t[0]).unwrap(),
    );
}

#[test]
fn the_causal_softmax_kernel_matches_autograd_through_scale_mask_and_softmax() {
    // (b, g, R = 2 groups of t = 5 queries, 7 keys): two keys seen before the queries
    let dev = gpu();
    let reference = |s: &Tensor| {
        let mask = nn::causal_mask(5, 2, DType::F32, &dev).unwrap();
        let g = (s * 0.3).unwrap().reshape((6, 5, 7)).unwrap();
        let g = g.broadcast_add(&mask).unwrap().reshape((3, 10, 7)).unwrap();
        nn::softmax_last_dim_reference(&g).unwrap()
    };
    same(
        &on_gpu(&[&[3, 10, 7]]),
        |t| petal_ops::causal_softmax(&t[0], 0.3, 5, 2).unwrap(),
        |t| reference(&t[0]),
    );
    same_bf16(
        &on_gpu(&[&[3, 10, 7]]),
        2e-2,
        |t| petal_ops::causal_softmax(&t[0], 0.3, 5, 2).unwrap(),
        |t| reference(&t[0]),
    );
}

#[test]
fn the_rope_kernel_matches_autograd_through_the_composed_rotation_in_both_layouts() {
    let dev = gpu();
    let (c, s) = tables(12, 16, &dev);
    let (c, s) = (c.narrow(0, 4, 6).unwrap(), s.narrow(0, 4, 6).unwrap()); // positions 4..10
    same(
        &on_gpu(&[&[2, 3, 6, 16]]), // (b, h, t, d)
        |t| petal_ops::apply_rope(&t[0], &c, &s).unwrap(),
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
        &on_gpu(&[&[2, 6, 48]]), // (b, t, h * d)
        |t| petal_ops::apply_rope_bthd(&t[0], &c, &s).unwrap(),
        |t| heads_first(&t[0]),
    );
    same_bf16(
        &on_gpu(&[&[2, 6, 48]]),
        2e-2,
        |t| petal_ops::apply_rope_bthd(&t[0], &c, &s).unwrap(),
        |t| heads_first(&t[0]),
    );
}

#[test]
fn the_swiglu_kernel_matches_autograd_through_silu_times_up() {
    same(
        &on_gpu(&[&[3, 700], &[3, 700]]),
        |t| petal_ops::swiglu(&t[0], &t[1]).unwrap(),
        |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
    );
    same_bf16(
        &on_gpu(&[&[3, 700], &[3, 700]]),
        2e-2,
        |t| petal_ops::swiglu(&t[0], &t[1]).unwrap(),
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

#[test]
fn the_cross_entropy_kernels_match_the_definition_in_value_and_gradient() {
    let labels = [3i64, -100, 0, 1999, -100, 7];
    let lab = Tensor::new(&labels, &gpu()).unwrap();
    same(
        &on_gpu(&[&[6, 2000]]),
        |t| petal_ops::masked_cross_entropy(&t[0], &lab).unwrap().0,
        |t| cross_entropy_by_definition(&t[0], &labels),
    );
}

#[test]
fn the_head_loss_on_the_gpu_matches_the_cpus_fused_kernel_in_value_and_gradient() {
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
    let (h, w) = (rand(&[300, 64], 5), (rand(&[50000, 64], 6) * 0.1).unwrap());
    let loss_and_grad = |dev: &Device| {
        let hv = candle_core::Var::from_tensor(&h.to_device(dev).unwrap()).unwrap();
        let (loss, n) =
            petal_ops::head_cross_entropy(hv.as_tensor(), &w.to_device(dev).unwrap(), &labels)
                .unwrap();
        let g = loss.backward().unwrap();
        let dh = g
            .get(hv.as_tensor())
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        (loss.to_scalar::<f32>().unwrap(), n, dh)
    };
    let (lc, nc, gc) = loss_and_grad(&Device::Cpu);
    let (lg, ng, gg) = loss_and_grad(&gpu());
    assert_eq!(nc, ng);
    assert!((lc - lg).abs() / lc.abs() < 1e-5, "loss {lg} against {lc}");
    assert!(
        max_rel(&gg, &gc) < 1e-4,
        "dh differs: {}",
        max_rel(&gg, &gc)
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

#[test]
fn the_attention_kernels_match_autograd_through_the_definition() {
    // (b, t, T, query heads, kv heads, head size): several query blocks and key tiles, keys
    // seen before the queries, grouped heads, the 16-wide tiles of heads over 64 values
    for (b, t, keys, nh, nkv, d) in [
        (2, 5, 5, 2, 2, 64),
        (1, 37, 45, 4, 2, 64),
        (2, 20, 23, 3, 1, 128),
        (1, 70, 70, 2, 1, 32),
    ] {
        let x = on_gpu(&[&[b, t, nh * d], &[b, keys, nkv * d], &[b, keys, nkv * d]]);
        let scale = 1.0 / (d as f64).sqrt();
        same(
            &x,
            |x| petal_ops::causal_attention_bthd(&x[0], &x[1], &x[2], d, scale, None).unwrap(),
            |x| attention_by_definition(&x[0], &x[1], &x[2], d, scale, None),
        );
    }
}

#[test]
fn the_attention_kernels_rotate_by_rope_and_take_bf16() {
    let dev = gpu();
    let (b, t, keys, nh, nkv, d) = (2, 33, 40, 4, 2, 64);
    let (cos, sin) = tables(64, d, &dev);
    let x = on_gpu(&[&[b, t, nh * d], &[b, keys, nkv * d], &[b, keys, nkv * d]]);
    let rope = petal_ops::Rope {
        cos: &cos,
        sin: &sin,
        from: 3, // three prefix keys stay unrotated
    };
    let scale = 0.125;
    same(
        &x,
        |x| petal_ops::causal_attention_bthd(&x[0], &x[1], &x[2], d, scale, Some(rope)).unwrap(),
        |x| attention_by_definition(&x[0], &x[1], &x[2], d, scale, Some((&cos, &sin, 3))),
    );
    same_bf16(
        &x,
        3e-2,
        |x| petal_ops::causal_attention_bthd(&x[0], &x[1], &x[2], d, scale, Some(rope)).unwrap(),
        |x| attention_by_definition(&x[0], &x[1], &x[2], d, scale, Some((&cos, &sin, 3))),
    );
}

#[test]
fn the_adamw_kernel_updates_every_tensor_as_torchs_formula_does() {
    let dev = gpu();
    let (lr, b1, b2, eps, wd) = (0.01f64, 0.9f64, 0.999f64, 1e-8, 0.1);
    let sizes = [(4usize, 9usize), (1, 300), (17, 33)];
    let on = |t: &Tensor| t.to_device(&dev).unwrap();
    let w: Vec<Tensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| on(&rand(&[s.0, s.1], 90 + i as u64)))
        .collect();
    let g: Vec<Tensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| on(&rand(&[s.0, s.1], 95 + i as u64)))
        .collect();
    let zeros = || {
        w.iter()
            .map(|t| t.zeros_like().unwrap())
            .collect::<Vec<_>>()
    };
    let (m, v) = (zeros(), zeros());
    let host = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut want: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = w
        .iter()
        .map(|t| {
            (
                host(t),
                vec![0.0; t.elem_count()],
                vec![0.0; t.elem_count()],
            )
        })
        .collect();
    for step in 1..=2 {
        let (bc1, bc2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
        let s = petal_ops::cuda::AdamStep {
            lr,
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
            bc1,
            bc2,
        };
        petal_ops::cuda::adamw_step(&w, &g, &m, &v, s).unwrap();
        for (i, (ww, mm, vv)) in want.iter_mut().enumerate() {
            for (j, gj) in host(&g[i]).into_iter().enumerate() {
                let gj = gj as f64;
                mm[j] = (b1 * mm[j] as f64 + (1.0 - b1) * gj) as f32;
                vv[j] = (b2 * vv[j] as f64 + (1.0 - b2) * gj * gj) as f32;
                let upd = (mm[j] as f64 / bc1) / ((vv[j] as f64 / bc2).sqrt() + eps);
                ww[j] = (ww[j] as f64 * (1.0 - lr * wd) - lr * upd) as f32;
            }
        }
    }
    let cpu = |x: &[f32], like: &Tensor| Tensor::from_slice(x, like.shape(), &Device::Cpu).unwrap();
    for (i, (ww, mm, vv)) in want.iter().enumerate() {
        let got = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        assert!(max_rel(&got(&w[i]), &cpu(ww, &w[i])) < 1e-5, "w {i}");
        assert!(max_rel(&got(&m[i]), &cpu(mm, &m[i])) < 1e-5, "m {i}");
        assert!(max_rel(&got(&v[i]), &cpu(vv, &v[i])) < 1e-5, "v {i}");
    }
}
