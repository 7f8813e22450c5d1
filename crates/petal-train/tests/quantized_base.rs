//! LoRA over a base kept quantized (`--dtype quantized`, `--quantize`) trains as over the same
//! weights dequantized to f32: the tiny golden Llama's linears quantized (three GGML block
//! types, NF4 and int4, and one left dense as GGUF files leave some), then the same run on both; the loss curves agree to
//! f32 rounding, since training's products decode W exactly (only decoding without a
//! gradient rounds x to 8 bits).

mod common;
use candle_core::{DType, Device, Tensor};
use petal_core::Adaptable;
use petal_io::Weights;
use petal_models::{Llama, LlamaConfig, Precision};
use petal_ops::quant::{self, GgmlDType};
use std::collections::HashMap;

/// The tiny golden Llama's config and base tensors (f32), by HF name.
fn tiny_llama_tensors() -> (LlamaConfig, Vec<(String, Tensor)>) {
    let dir = common::tiny_llama();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = LlamaConfig::from_hf_json(&text, "config.json").unwrap();
    let dense = petal_io::load_model(dir.to_str().unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
        .model
        .named_base_tensors()
        .unwrap();
    (cfg, dense)
}

/// The largest difference between two models' logits on a short sequence, relative to the
/// largest logit.
fn logit_gap(a: &Llama, b: &Llama) -> f32 {
    let ids = Tensor::new(&[[1u32, 5, 9, 14, 20, 33, 2, 71]], &Device::Cpu).unwrap();
    let ctx = petal_core::Ctx::eval();
    let (a, b) = (
        a.forward(&ids, None, &ctx).unwrap(),
        b.forward(&ids, None, &ctx).unwrap(),
    );
    petal_ops::testing::max_rel(&a, &b)
}

/// The tiny golden Llama with its linears quantized (GGML types and grouped int4: every
/// quantizer runs through the same ops; NF4's blocks of 64 are longer than these rows: a later
/// test trains over it), and the same weights dequantized, by HF name.
fn quantized_tiny_llama() -> (LlamaConfig, Weights, HashMap<String, Tensor>) {
    let (cfg, dense) = tiny_llama_tensors();
    let types: [&dyn quant::Quantizer; 4] = [
        quant::ggml(GgmlDType::Q8_0).unwrap(),
        quant::ggml(GgmlDType::Q4_1).unwrap(),
        &quant::INT4_G32,
        quant::ggml(GgmlDType::Q5_0).unwrap(),
    ];
    let (mut kept, mut blocks, mut same) = (HashMap::new(), HashMap::new(), HashMap::new());
    for (i, (name, t)) in dense.into_iter().enumerate() {
        // 2-D tensors of whole 32-value rows: the embedding, q/k/v/o, gate and up (down_proj's
        // rows of 48 values stay dense)
        if t.rank() == 2 && t.dim(1).unwrap() % 32 == 0 {
            let (q, fmt) = quant::quantize_with(&t, types[i % types.len()]).unwrap();
            same.insert(name.clone(), quant::dequantize(&q, fmt).unwrap());
            blocks.insert(name, (q, fmt));
        } else {
            same.insert(name.clone(), t.clone());
            kept.insert(name, t);
        }
    }
    assert!(
        blocks.len() >= 13 && kept.len() >= 2,
        "{} quantized",
        blocks.len()
    );
    let quantized = Weights::Quantized {
        dense: kept,
        blocks,
    };
    (cfg, quantized, same)
}

/// f32 products on both sides (the reference kernels), quantized base or not.
fn reference(quantized: bool) -> Precision {
    Precision {
        quantized,
        kernels: petal_ops::Kernels::REFERENCE,
        ..DType::F32.into()
    }
}

/// The model over the quantized weights and over the same weights dequantized, both with the
/// reference kernels (f32 products on both sides, equal to f32 rounding).
fn both(cfg: &LlamaConfig, quantized: &Weights, same: &HashMap<String, Tensor>) -> (Llama, Llama) {
    let q = Llama::load(cfg.clone(), quantized, reference(true), &Device::Cpu).unwrap();
    let same = Weights::Map(same.clone());
    let f = Llama::load(cfg.clone(), &same, reference(false), &Device::Cpu).unwrap();
    (q, f)
}

#[test]
fn lora_over_quantized_weights_follows_lora_over_them_dequantized() {
    let (cfg, quantized, same) = quantized_tiny_llama();
    let (q, f) = both(&cfg, &quantized, &same);
    // the same logits before training
    let d = logit_gap(&q, &f);
    assert!(d < 1e-5, "logits differ by {d} of the largest");
    let dir = tempfile::tempdir().unwrap();
    let lq = common::lora_losses(q, 0.1, dir.path().join("q"));
    let lf = common::lora_losses(f, 0.1, dir.path().join("f"));
    assert!(lq[5] < lq[0], "the run must learn: {lq:?}");
    for (a, b) in lq.iter().zip(&lf) {
        assert!((a - b).abs() < 1e-4 * b.abs(), "{lq:?} vs {lf:?}");
    }
    // the fused kernels (bf16 tile products where the CPU has AVX512-BF16) follow within
    // bf16's rounding
    let fused = Precision {
        quantized: true,
        ..DType::F32.into()
    };
    let q = Llama::load(cfg, &quantized, fused, &Device::Cpu).unwrap();
    let lb = common::lora_losses(q, 0.1, dir.path().join("b"));
    for (a, b) in lb.iter().zip(&lf) {
        assert!((a - b).abs() < 1e-2 * b.abs(), "{lb:?} vs {lf:?}");
    }
}

/// DoRA over the quantized base (QDoRA: its norms from the blocks, never a dense W) trains as
/// DoRA over the same weights dequantized, through the fused node (no dropout) and the composed
/// form whose base term is recomputed from the dropped input.
#[test]
fn dora_over_quantized_weights_follows_dora_over_them_dequantized() {
    let (cfg, quantized, same) = quantized_tiny_llama();
    let dir = tempfile::tempdir().unwrap();
    for dropout in [0.0, 0.1] {
        let (q, f) = both(&cfg, &quantized, &same);
        let lq = common::losses_with(q, dropout, true, dir.path().join(format!("q{dropout}")));
        let lf = common::losses_with(f, dropout, true, dir.path().join(format!("f{dropout}")));
        assert!(lq[5] < lq[0], "the run must learn: {lq:?}");
        for (a, b) in lq.iter().zip(&lf) {
            assert!(
                (a - b).abs() < 1e-4 * b.abs(),
                "dropout {dropout}: {lq:?} vs {lf:?}"
            );
        }
    }
}

#[test]
fn methods_that_need_w_are_refused_over_a_quantized_base_naming_why() {
    let (cfg, dense) = tiny_llama_tensors();
    let mut blocks = HashMap::new();
    let mut kept = HashMap::new();
    for (name, t) in dense {
        if name.ends_with("q_proj.weight") {
            blocks.insert(name, quant::quantize(&t, GgmlDType::Q8_0).unwrap());
        } else {
            kept.insert(name, t);
        }
    }
    let w = Weights::Quantized {
        dense: kept,
        blocks,
    };
    let precision = Precision {
        quantized: true,
        ..DType::F32.into()
    };
    let mut m = Llama::load(cfg, &w, precision, &Device::Cpu).unwrap();
    use petal_core::config::Targets;
    let mut pissa = petal_core::AdapterConfig::lora(4, 8.0, Targets::Regex("all-linear".into()));
    pissa.set("init_lora_weights", "pissa").unwrap();
    let e = petal_core::inject_adapter(&mut m, "p", &pissa, 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("q_proj")
            && e.contains("q8_0")
            && e.contains("factors W")
            && e.contains("cannot train over a quantized base"),
        "{e}"
    );
    // merging into the quantized weight is refused, W untouched
    let lora = petal_core::AdapterConfig::lora(4, 8.0, Targets::Regex("all-linear".into()));
    petal_core::inject_adapter(&mut m, "l", &lora, 1).unwrap();
    let e = petal_core::inject::merge_and_unload_all(&mut m)
        .unwrap_err()
        .to_string();
    assert!(e.contains("quantized"), "{e}");
}

#[test]
fn quantize_at_load_equals_the_same_blocks_dequantized_and_names_a_tensor_that_does_not_fit() {
    // `--quantize q8_0` on f32 weights: the linears and the embedding become Q8_0 blocks at
    // load and run as a GGUF file's do (`nf4`: the linears only); the logits equal those of the
    // blocks' values in f32
    let dir = common::tiny_llama();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut cfg = LlamaConfig::from_hf_json(&text, "config.json").unwrap();
    // rows of whole 64-value blocks everywhere
    (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
    ) = (64, 8, 64);
    let w = petal_models::llama::random_weights(&cfg, 5).unwrap();
    // q8_0 (llama.cpp's: the embedding and head too) and nf4 (QLoRA's: those stay dense)
    for q in [quant::ggml(GgmlDType::Q8_0).unwrap(), &quant::NF4] {
        let outer = |n: &str| n.contains("embed_tokens") || n.starts_with("lm_head");
        let mut same = HashMap::new();
        for (name, t) in &w {
            let t = if t.rank() == 2 && (q.covers_embeddings() || !outer(name)) {
                let (b, fmt) = quant::quantize_with(t, q).unwrap();
                quant::dequantize(&b, fmt).unwrap()
            } else {
                t.clone()
            };
            same.insert(name.clone(), t);
        }
        let at_load = Precision {
            quantize: Some(q),
            kernels: petal_ops::Kernels::REFERENCE,
            ..DType::F32.into()
        };
        let m = Llama::load(cfg.clone(), &Weights::Map(w.clone()), at_load, &Device::Cpu).unwrap();
        assert!(
            m.linears()
                .iter()
                .all(|l| l.quant().is_some() != outer(l.path()) || q.covers_embeddings()),
            "{q:?}: every linear quantized, the head as the quantizer says"
        );
        let reference = Precision {
            kernels: petal_ops::Kernels::REFERENCE,
            ..DType::F32.into()
        };
        let f = Llama::load(cfg.clone(), &Weights::Map(same), reference, &Device::Cpu).unwrap();
        let d = logit_gap(&m, &f);
        assert!(d < 1e-5, "{q:?}: logits differ by {d} of the largest");
        // and LoRA over it trains as over its values in f32
        let dir = tempfile::tempdir().unwrap();
        let lq = common::lora_losses(m, 0.1, dir.path().join("q"));
        let lf = common::lora_losses(f, 0.1, dir.path().join("f"));
        assert!(lq[5] < lq[0], "{q:?}: the run must learn: {lq:?}");
        for (a, b) in lq.iter().zip(&lf) {
            assert!((a - b).abs() < 1e-4 * b.abs(), "{q:?}: {lq:?} vs {lf:?}");
        }
    }
    let at_load = Precision {
        quantize: Some(quant::ggml(GgmlDType::Q8_0).unwrap()),
        kernels: petal_ops::Kernels::REFERENCE,
        ..DType::F32.into()
    };
    // rows of 48 values are not whole Q8_0 blocks: refused naming the tensor
    (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
    ) = (32, 4, 48);
    let w = petal_models::llama::random_weights(&cfg, 5).unwrap();
    let e = Llama::load(cfg, &Weights::Map(w), at_load, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("down_proj") && e.contains("48") && e.contains("q8_0"),
        "{e}"
    );
}
