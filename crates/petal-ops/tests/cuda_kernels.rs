//! petal's CUDA kernels on a GPU (`kernel_checks`: each op against autograd through the
//! composed candle ops or the definition on the same GPU), their NVRTC compilation and the
//! AdamW kernel. Built with `--features cuda` only; each test needs a CUDA device.
#![cfg(feature = "cuda")]

mod kernel_checks;

use candle_core::{Device, Tensor};
use petal_ops::testing::{max_rel, rand};

/// The GPU (the checks switch petal's kernels on in the `Kernels` they hand each op).
fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

/// One GPU test per shared check.
macro_rules! on_the_gpu {
    ($($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                kernel_checks::$check(&gpu());
            }
        )*
    };
}

on_the_gpu!(
    the_rms_norm_kernel_matches_autograd_through_the_composed_norm,
    the_rms_norm_kernel_normalises_an_f32_stream_into_a_bf16_weights_dtype,
    the_softmax_kernel_matches_autograd_through_the_composed_softmax,
    the_causal_softmax_kernel_matches_autograd_through_scale_mask_and_softmax,
    the_swiglu_kernel_matches_autograd_through_silu_times_up,
    the_cross_entropy_kernels_match_the_definition_in_value_and_gradient,
    the_head_loss_matches_logits_then_cross_entropy_by_definition,
    the_attention_kernels_match_autograd_through_the_definition,
    the_attention_kernels_rotate_by_rope_and_take_bf16,
    the_rope_kernel_matches_autograd_through_the_composed_rotation_in_both_layouts,
    the_lora_kernel_matches_autograd_through_its_definition,
);

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

#[test]
fn compiled_kernels_are_kept_on_disk_for_the_next_run() {
    // needs NVRTC only, no GPU
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("PETAL_CACHE", dir.path());
    let (src, options) = petal_ops::cuda::attention_source(16);
    let path = petal_ops::cuda::ptx_cache_path(&src, &options).unwrap();
    assert!(path.starts_with(dir.path()) && !path.exists());
    let ptx = petal_ops::cuda::module_ptx(16).expect("NVRTC");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), ptx);
}
