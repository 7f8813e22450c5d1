//! Gradient checkpointing per decoder layer gives the gradients of the plain backward pass:
//! with dropout (the recomputed layer must draw the same masks), with adapters on the input
//! side (prompt tuning, LoRA on the embedding) and with prefix keys/values used by every layer.

use candle_core::{DType, Device, Tensor};
use petal_core::config::{InitWeights, Targets};
use petal_core::inject::adapter_vars;
use petal_core::{inject_adapter, AdapterConfig};
use petal_io::load_model;
use petal_models::Llama;
use petal_ops::testing::max_rel;
use std::path::PathBuf;

fn model() -> Llama {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/llama");
    load_model(dir.to_str().unwrap(), DType::F32, &Device::Cpu)
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

/// A loss that weighs every hidden unit differently, so every gradient path matters.
fn objective(h: &Tensor) -> petal_core::Result<Tensor> {
    let w = petal_ops::testing::rand(h.dims(), 5);
    Ok((h.tanh()? * w)?.sum_all()?)
}

fn check(cfg: &AdapterConfig) {
    let mut m = model();
    inject_adapter(&mut m, "default", cfg, 3).unwrap();
    let ctx = petal_core::Ctx::train(11);
    let plain = objective(&m.hidden_states(&ids(), None, &ctx).unwrap()).unwrap();
    let g = plain.backward().unwrap();
    let ctx = petal_core::Ctx::train(11);
    let (value, grads) = m.checkpointed_backward(&ids(), &ctx, &objective).unwrap();
    let e = max_rel(&value, &plain);
    assert!(e < 1e-6, "{}: objective differs by {e}", cfg.peft_type);
    let vars = adapter_vars(&m, "default");
    assert!(!vars.is_empty());
    for v in &vars {
        let want = g.get(v.as_tensor()).expect("plain gradient");
        let got = grads.get(v.as_tensor()).expect("checkpointed gradient");
        let e = max_rel(got, want);
        assert!(e < 1e-5, "{}: gradient differs by {e}", cfg.peft_type);
    }
}

#[test]
fn checkpointed_lora_gradients_with_dropout_and_an_embedding_adapter_equal_the_plain_ones() {
    let mut cfg = AdapterConfig::lora(
        4,
        8.0,
        Targets::List(
            ["embed_tokens", "q_proj", "v_proj", "down_proj"]
                .map(String::from)
                .to_vec(),
        ),
    );
    cfg.set("init_lora_weights", InitWeights::Flag(false))
        .unwrap();
    cfg.set("lora_dropout", 0.2).unwrap();
    check(&cfg);
}

#[test]
fn checkpointed_prompt_and_prefix_tuning_gradients_equal_the_plain_ones() {
    for method in ["prompt_tuning", "prefix_tuning"] {
        let mut cfg = AdapterConfig::for_method(method, 1, 1.0, Targets::List(vec![]));
        cfg.set("num_virtual_tokens", Some(3)).unwrap();
        cfg.target_modules = None;
        check(&cfg);
    }
}

#[test]
fn hidden_states_without_a_graph_equal_the_tracked_ones_and_hold_no_graph() {
    // evaluation's pass (each layer detached) against the plain one, over trainable LoRA on
    // the embedding and linears and over prefix keys/values
    let mut lora = AdapterConfig::lora(
        4,
        8.0,
        Targets::List(
            ["embed_tokens", "q_proj", "down_proj"]
                .map(String::from)
                .to_vec(),
        ),
    );
    lora.set("init_lora_weights", InitWeights::Flag(false))
        .unwrap();
    let mut prefix = AdapterConfig::for_method("prefix_tuning", 1, 1.0, Targets::List(vec![]));
    prefix.set("num_virtual_tokens", Some(3)).unwrap();
    prefix.target_modules = None;
    for cfg in [lora, prefix] {
        let mut m = model();
        inject_adapter(&mut m, "default", &cfg, 3).unwrap();
        let ctx = petal_core::Ctx::eval();
        let plain = m.hidden_states(&ids(), None, &ctx).unwrap();
        assert!(
            plain.track_op(),
            "{}: the plain pass keeps its graph",
            cfg.peft_type
        );
        let lean = m.hidden_states_no_grad(&ids(), &ctx).unwrap();
        assert!(!lean.track_op(), "{}: no graph kept", cfg.peft_type);
        let e = max_rel(&lean, &plain);
        assert!(e < 1e-6, "{}: hidden states differ by {e}", cfg.peft_type);
    }
}
