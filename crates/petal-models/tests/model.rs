//! Whole-model properties on the tiny golden Llama: every adapter tensor gets a gradient
//! through all layers (candle's own fused ops would silently stop it), frozen weights get
//! none; sharded checkpoints load to the same logits; bf16 tracks f32.

use candle_core::{DType, Device, Tensor};
use petal_core::config::{InitWeights, Targets};
use petal_core::inject::adapter_vars;
use petal_core::{inject_adapter, Adaptable, AdapterConfig};
use petal_io::load_model;
use petal_models::Llama;
use petal_ops::testing::central_differences;
use std::collections::HashMap;
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

fn model(dir: &std::path::Path, dt: DType) -> Llama {
    load_model(dir.to_str().unwrap(), dt, &Device::Cpu)
        .unwrap()
        .model
}

fn ids() -> Tensor {
    Tensor::new(
        &[
            [1u32, 5, 9, 14, 20, 33, 2, 71],
            [7, 7, 3, 90, 45, 12, 60, 8],
        ],
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn every_adapter_tensor_in_every_layer_gets_its_gradient_and_frozen_weights_none() {
    let mut m = model(&golden().join("llama"), DType::F32);
    let mut cfg = AdapterConfig::lora(4, 8.0, Targets::Regex("all-linear".into()));
    cfg.set("init_lora_weights", InitWeights::Flag(false))
        .unwrap();
    inject_adapter(&mut m, "default", &cfg, 1).unwrap();
    let logits = m.forward(&ids(), None, &petal_core::Ctx::train(0)).unwrap();
    let g = logits
        .log_sum_exp(2)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let vars = adapter_vars(&m, "default");
    assert_eq!(vars.len(), 2 * 14);
    for (i, v) in vars.iter().enumerate() {
        let n = g
            .get(v.as_tensor())
            .map(|t| {
                t.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .unwrap_or(0.0);
        assert!(n > 0.0, "adapter tensor {i} got no gradient");
    }
    for l in m.linears() {
        assert!(g.get(l.weight()).is_none(), "{} got a gradient", l.path());
    }
    assert!(g.get(m.embed_weight()).is_none());
    // and they are the loss's gradients: A and B of the first layer's q_proj, one tensor in
    // the middle, A and B of the last layer's down_proj, against central differences, each
    // tensor's largest entry within 10% (the shared check's absolute slack, 2e-2, is about
    // the size of these gradients)
    for i in [0, 1, vars.len() / 2, vars.len() - 2, vars.len() - 1] {
        let grad: Vec<f32> = g
            .get(vars[i].as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        check_fd(&m, &vars[i], &grad, &[0, grad.len() / 2, grad.len() - 1]);
        let top = (0..grad.len())
            .max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs()))
            .unwrap();
        let fd = central_differences(&vars[i], &[top], 1e-2, || {
            logit_loss(&m).to_scalar::<f32>().unwrap() as f64
        })[0];
        let bp = grad[top] as f64;
        assert!(
            (fd - bp).abs() < 0.1 * bp.abs() + 1e-3,
            "tensor {i}, entry {top}: finite difference {fd} vs backprop {bp}"
        );
    }
}

#[test]
fn a_sharded_checkpoint_loads_to_the_same_logits_as_a_single_file() {
    let src = golden().join("llama");
    let d = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), d.path().join(f)).unwrap();
    }
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (k, t)) in all.into_iter().enumerate() {
        let (shard, name) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        shard.insert(k.clone(), t);
        map.insert(k, serde_json::Value::String(name.into()));
    }
    candle_core::safetensors::save(&a, d.path().join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, d.path().join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let x = model(&src, DType::F32)
        .forward(&ids(), None, &petal_core::Ctx::eval())
        .unwrap();
    let y = model(d.path(), DType::F32)
        .forward(&ids(), None, &petal_core::Ctx::eval())
        .unwrap();
    assert_eq!(
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn bf16_logits_track_f32_logits_within_bf16_precision() {
    let x = model(&golden().join("llama"), DType::F32)
        .forward(&ids(), None, &petal_core::Ctx::eval())
        .unwrap();
    let y = model(&golden().join("llama"), DType::BF16)
        .forward(&ids(), None, &petal_core::Ctx::eval())
        .unwrap();
    let e = petal_ops::testing::max_rel(&y, &x);
    assert!(e < 3e-2, "relative {e}");
}

#[test]
fn prompt_tuning_embeddings_get_gradients_that_match_finite_differences_through_the_model() {
    let mut cfg = AdapterConfig::for_method("PROMPT_TUNING", 1, 1.0, Targets::List(vec![]));
    cfg.set("num_virtual_tokens", Some(2)).unwrap();
    let m = input_adapted(&cfg);
    assert_eq!(m.num_virtual_tokens(), 2);
    input_gradients_match_finite_differences(&m);
}

#[test]
fn prefix_tuning_keys_and_values_get_gradients_that_match_finite_differences_through_the_model() {
    let mut cfg = AdapterConfig::for_method("PREFIX_TUNING", 1, 1.0, Targets::List(vec![]));
    cfg.set("num_virtual_tokens", Some(2)).unwrap();
    let m = input_adapted(&cfg);
    assert_eq!(
        m.num_virtual_tokens(),
        0,
        "prefix positions produce no logits"
    );
    input_gradients_match_finite_differences(&m);
}

fn input_adapted(cfg: &AdapterConfig) -> Llama {
    let mut m = model(&golden().join("llama"), DType::F32);
    inject_adapter(&mut m, "default", cfg, 4).unwrap();
    m
}

/// Gradients of the input adapter's one tensor against central differences of a loss over all
/// logits, and no gradient for any frozen weight (entries: first, 17th, last).
fn input_gradients_match_finite_differences(m: &Llama) {
    let vars = adapter_vars(m, "default");
    assert_eq!(vars.len(), 1);
    let g = logit_loss(m).backward().unwrap();
    let grad = g
        .get(vars[0].as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for l in m.linears() {
        assert!(g.get(l.weight()).is_none(), "{} got a gradient", l.path());
    }
    let base = vars[0]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let idx = [0, 17, base.len() - 1];
    check_fd(m, &vars[0], &grad, &idx);
}

#[test]
fn ln_tuning_copies_get_gradients_that_match_finite_differences_and_frozen_norms_none() {
    let mut m = model(&golden().join("llama"), DType::F32);
    let targets = Targets::List(vec!["post_attention_layernorm".into(), "norm".into()]);
    inject_adapter(
        &mut m,
        "default",
        &AdapterConfig::for_method("LN_TUNING", 1, 1.0, targets),
        0,
    )
    .unwrap();
    let vars = adapter_vars(&m, "default");
    assert_eq!(vars.len(), 3); // two post-attention norms and the final norm
    let g = logit_loss(&m).backward().unwrap();
    for n in m.norms() {
        assert!(
            g.get(n.base()).is_none(),
            "frozen norm {} got a gradient",
            n.path()
        );
    }
    for v in &vars {
        let grad = g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        check_fd(&m, v, &grad, &[0, 31]);
    }
}

#[test]
fn ln_tuning_counts_one_hidden_vector_per_targeted_norm_as_trainable() {
    let mut m = model(&golden().join("llama"), DType::F32);
    let before = petal_core::ParamCount::of(&m);
    let targets = Targets::List(vec!["input_layernorm".into(), "norm".into()]);
    inject_adapter(
        &mut m,
        "default",
        &AdapterConfig::for_method("LN_TUNING", 1, 1.0, targets),
        0,
    )
    .unwrap();
    let c = petal_core::ParamCount::of(&m);
    assert_eq!(c.trainable, 3 * 32); // two input norms + the final norm, hidden 32
    assert_eq!(c.total, before.total + 3 * 32);
}

#[test]
fn p_tuning_encoder_weights_get_gradients_that_match_finite_differences_through_the_model() {
    let mut cfg = AdapterConfig::for_method("P_TUNING", 1, 1.0, Targets::List(vec![]));
    cfg.set("num_virtual_tokens", Some(2)).unwrap();
    cfg.set("encoder_hidden_size", Some(8)).unwrap();
    let m = input_adapted(&cfg);
    assert_eq!(m.num_virtual_tokens(), 2);
    let vars = adapter_vars(&m, "default");
    assert_eq!(vars.len(), 7, "embedding + three linears");
    let g = logit_loss(&m).backward().unwrap();
    for v in &vars {
        let grad = g
            .get(v.as_tensor())
            .expect("every encoder tensor gets a gradient")
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let idx = [0, grad.len() - 1];
        check_fd(&m, v, &grad, &idx);
    }
}

#[test]
fn a_saved_p_tuning_adapter_is_its_encoder_output_and_reloads_to_the_same_logits() {
    let mut cfg = AdapterConfig::for_method("P_TUNING", 1, 1.0, Targets::List(vec![]));
    cfg.set("num_virtual_tokens", Some(3)).unwrap();
    let m = input_adapted(&cfg);
    let dir = tempfile::tempdir().unwrap();
    petal_io::save_model_adapter(&m, "default", &cfg, dir.path()).unwrap();
    let (saved_cfg, tensors) =
        petal_io::load_adapter(dir.path(), &candle_core::Device::Cpu).unwrap();
    assert!(saved_cfg.inference_mode);
    assert_eq!(
        tensors.keys().collect::<Vec<_>>(),
        vec!["prompt_embeddings"],
        "PEFT saves only the encoder's output"
    );
    let mut fresh = model(&golden().join("llama"), DType::F32);
    petal_io::attach_adapter(&mut fresh, dir.path(), "default").unwrap();
    let (a, b) = (
        m.forward(&ids(), None, &petal_core::Ctx::eval()).unwrap(),
        fresh
            .forward(&ids(), None, &petal_core::Ctx::eval())
            .unwrap(),
    );
    assert!(petal_ops::testing::max_rel(&b, &a) < 1e-6);
}

#[test]
fn lora_on_the_embedding_gets_exact_gradients_and_merges_into_the_table() {
    let mut m = model(&golden().join("llama"), DType::F32);
    let mut cfg = AdapterConfig::lora(3, 6.0, Targets::List(vec!["embed_tokens".into()]));
    cfg.set("init_lora_weights", InitWeights::Flag(false))
        .unwrap();
    inject_adapter(&mut m, "default", &cfg, 5).unwrap();
    let vars = adapter_vars(&m, "default");
    assert_eq!(vars.len(), 2);
    let g = logit_loss(&m).backward().unwrap();
    assert!(g.get(m.embed_weight()).is_none(), "the table stays frozen");
    for v in &vars {
        let grad = g
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // entries of A for a token in the input (id 5: column 5 of row 0) and of B
        let idx = if v.as_tensor().dims()[1] == 96 {
            [5, 96 + 9]
        } else {
            [0, grad.len() - 1]
        };
        check_fd(&m, v, &grad, &idx);
    }
    let before = m.forward(&ids(), None, &petal_core::Ctx::eval()).unwrap();
    let table = m.embed_weight().clone();
    merged_equals_unmerged_then_unmerge(&mut m, &before);
    // dW (N(0,1) factors) is ~50x the table here: (W + dW) - dW keeps f32 rounding of dW
    assert!(petal_ops::testing::max_rel(m.embed_weight(), &table) < 1e-4);
}

#[test]
fn trainable_token_rows_on_a_tied_model_get_exact_gradients_merge_and_unmerge() {
    let mut m = model(&golden().join("qwen2"), DType::F32);
    let mut cfg = AdapterConfig::lora(2, 4.0, Targets::List(vec!["v_proj".into()]));
    cfg.trainable_token_indices = Some(petal_core::config::TokenIndices::List(vec![5, 33]));
    inject_adapter(&mut m, "default", &cfg, 5).unwrap();
    let vars = adapter_vars(&m, "default");
    let delta = vars
        .iter()
        .find(|v| v.as_tensor().dims() == [2, 32])
        .expect("one (2, hidden) delta, shared by the embedding and the tied head")
        .clone();
    delta
        .set(&(delta.as_tensor() + petal_ops::testing::rand(&[2, 32], 4)).unwrap())
        .unwrap();
    let g = logit_loss(&m).backward().unwrap();
    let grad = g
        .get(delta.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let idx = [0, 40, 63];
    check_fd(&m, &delta, &grad, &idx);
    let before = m.forward(&ids(), None, &petal_core::Ctx::eval()).unwrap();
    let w0: Vec<Tensor> = m.linears().iter().map(|l| l.weight().clone()).collect();
    merged_equals_unmerged_then_unmerge(&mut m, &before);
    for (l, w) in m.linears().iter().zip(&w0) {
        assert!(
            petal_ops::testing::max_rel(l.weight(), w) < 1e-6,
            "{}",
            l.path()
        );
    }
}

#[test]
fn prefix_tuning_through_its_projection_gets_exact_gradients_and_saves_the_projected_prefix() {
    let mut cfg = AdapterConfig::for_method("PREFIX_TUNING", 1, 1.0, Targets::List(vec![]));
    cfg.set("num_virtual_tokens", Some(2)).unwrap();
    cfg.set("prefix_projection", Some(true)).unwrap();
    cfg.set("encoder_hidden_size", Some(6)).unwrap();
    let m = input_adapted(&cfg);
    assert_eq!(
        adapter_vars(&m, "default").len(),
        5,
        "embedding + two linears"
    );
    let g = logit_loss(&m).backward().unwrap();
    for v in adapter_vars(&m, "default") {
        let grad = g
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let idx = [0, grad.len() - 1];
        check_fd(&m, &v, &grad, &idx);
    }
    let dir = tempfile::tempdir().unwrap();
    petal_io::save_model_adapter(&m, "default", &cfg, dir.path()).unwrap();
    let mut fresh = model(&golden().join("llama"), DType::F32);
    petal_io::attach_adapter(&mut fresh, dir.path(), "default").unwrap();
    let (a, b) = (
        m.forward(&ids(), None, &petal_core::Ctx::eval()).unwrap(),
        fresh
            .forward(&ids(), None, &petal_core::Ctx::eval())
            .unwrap(),
    );
    assert!(petal_ops::testing::max_rel(&b, &a) < 1e-6);
}

/// A loss over every logit of the fixed ids, in training mode (for gradient checks).
fn logit_loss(m: &Llama) -> Tensor {
    m.forward(&ids(), None, &petal_core::Ctx::train(0))
        .unwrap()
        .log_sum_exp(2)
        .unwrap()
        .sum_all()
        .unwrap()
}

/// Backprop's `grad` of `logit_loss` for `v` agrees with central differences at `idx`.
fn check_fd(m: &Llama, v: &candle_core::Var, grad: &[f32], idx: &[usize]) {
    let fd = central_differences(v, idx, 1e-2, || {
        logit_loss(m).to_scalar::<f32>().unwrap() as f64
    });
    for (&i, fd) in idx.iter().zip(fd) {
        let fd = fd as f32;
        assert!(
            (fd - grad[i]).abs() < 2e-2 * (1.0 + fd.abs()),
            "d/d[{i}]: finite difference {fd} vs backprop {}",
            grad[i]
        );
    }
}

/// Merge adapter "default" wherever it sits, check the logits equal `before` (the unmerged
/// model's), then unmerge everything.
fn merged_equals_unmerged_then_unmerge(m: &mut Llama, before: &Tensor) {
    for l in m
        .linears_mut()
        .into_iter()
        .filter(|l| l.layer("default").is_some())
    {
        l.merge("default", true).unwrap();
    }
    assert!(
        petal_ops::testing::max_rel(
            &m.forward(&ids(), None, &petal_core::Ctx::eval()).unwrap(),
            before
        ) < 1e-5
    );
    for l in m.linears_mut() {
        l.unmerge().unwrap();
    }
}

/// SSF with `norms` (far from the identity): every per-layer norm gets a scale and shift, the
/// final norm none; their gradients match finite differences; merging folds γ into the norm
/// weights and β into the q/k/v and gate/up biases with the logits unchanged; a saved adapter
/// reloads to the same logits.
#[test]
fn ssf_on_norms_gets_exact_gradients_merges_into_weights_and_biases_and_reloads() {
    let mut m = model(&golden().join("llama"), DType::F32);
    let mut cfg = AdapterConfig::for_method("SSF", 1, 1.0, Targets::List(vec!["o_proj".into()]));
    cfg.set("norms", true).unwrap();
    cfg.set("init_weights", false).unwrap();
    inject_adapter(&mut m, "default", &cfg, 3).unwrap();
    let on_norms: Vec<&str> = m
        .norms()
        .into_iter()
        .filter(|n| n.has("default"))
        .map(|n| n.path())
        .collect();
    assert_eq!(
        on_norms.len(),
        4,
        "two layers' two norms, not the final one: {on_norms:?}"
    );
    assert!(!on_norms.contains(&"model.norm"));
    let keys: Vec<String> = petal_core::walk::adapter_tensors(&m, "default")
        .into_iter()
        .map(|t| t.key)
        .collect();
    assert!(
        keys.contains(&"model.layers.0.input_layernorm.ssf_shift".to_string()),
        "{keys:?}"
    );
    // (candle also stores a gradient for the frozen weight γ multiplies, never used: the
    // optimizer steps the adapter's variables only)
    let g = logit_loss(&m).backward().unwrap();
    for t in petal_core::walk::adapter_tensors(&m, "default")
        .into_iter()
        .filter(|t| t.key.contains("layernorm"))
    {
        let grad = g.get(t.var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        check_fd(&m, t.var, &grad, &[0, 31]);
    }
    let before = m.forward(&ids(), None, &petal_core::Ctx::eval()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    petal_io::save_model_adapter(&m, "default", &cfg, dir.path()).unwrap();
    let mut fresh = model(&golden().join("llama"), DType::F32);
    petal_io::attach_adapter(&mut fresh, dir.path(), "default").unwrap();
    let reloaded = fresh
        .forward(&ids(), None, &petal_core::Ctx::eval())
        .unwrap();
    assert!(petal_ops::testing::max_rel(&reloaded, &before) < 1e-6);
    petal_core::inject::merge_and_unload_all(&mut m).unwrap();
    assert!(m
        .norms()
        .iter()
        .all(|n| n.names().is_empty() && n.shift().is_none()));
    let q = &m.linears()[0];
    assert!(
        q.path().ends_with("q_proj") && q.bias().is_some(),
        "β folds into q's bias"
    );
    let merged = m.forward(&ids(), None, &petal_core::Ctx::eval()).unwrap();
    let rel = petal_ops::testing::max_rel(&merged, &before);
    assert!(rel < 1e-5, "merged differs from unmerged: {rel}");
}
