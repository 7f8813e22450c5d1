//! E2VPT-style prompts against tools/golden/kv_prompt_oracle.py: transformers' Llama with the
//! input prompts as leading `inputs_embeds` and the key-value slots as a filled cache (checked
//! there against a hand-written prefix attention and PEFT's prefix tuning). Logits with shared
//! and with separate keys and values, the gradients of the prompts and slots, and the pruning
//! scores (a gate per prompt token and per piece) from those gradients.

use candle_core::{DType, Device, Tensor, Var};
use petal_core::config::AdapterConfig;
use petal_core::{inject_adapter, Adaptable, Ctx};
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-20)) as f64
}

/// The tiny Llama with kv_prompt (3 prompts, 4 slots) set to the fixture's values; the vars.
fn model(share: bool, prompts: &Tensor, slots: &Tensor) -> (petal_models::Llama, Var, Var) {
    let p = golden().join("llama");
    let mut m = petal_io::load_model(p.to_str().unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let mut c = AdapterConfig::new("KV_PROMPT").unwrap();
    for (k, v) in [
        ("num_virtual_tokens", serde_json::json!(3)),
        ("num_kv_tokens", serde_json::json!(4)),
        ("share_kv", serde_json::json!(share)),
        ("prune_step", serde_json::json!(0)),
        ("segments", serde_json::json!(4)),
    ] {
        c.set(k, v).unwrap();
    }
    inject_adapter(&mut m, "default", &c, 0).unwrap();
    let vars: Vec<Var> = m
        .input_adapter()
        .unwrap()
        .1
        .tensors()
        .iter()
        .map(|t| t.var.clone())
        .collect();
    vars[0].set(prompts).unwrap();
    vars[1].set(slots).unwrap();
    (m, vars[0].clone(), vars[1].clone())
}

/// (layers, n_kv, kv_heads, head_dim) slots as petal's (layers, 1, n_kv, kv width).
fn slots_of(t: &Tensor) -> Tensor {
    let (l, n, h, d) = t.dims4().unwrap();
    t.reshape((l, 1, n, h * d)).unwrap()
}

#[test]
fn prompts_and_slots_give_the_oracle_logits_gradients_and_gate_scores() {
    let t = candle_core::safetensors::load(golden().join("kv_prompt.safetensors"), &Device::Cpu)
        .unwrap();
    let ids = t["ids"].to_dtype(DType::U32).unwrap();
    // separate keys and values
    let sep = Tensor::cat(&[slots_of(&t["K"]), slots_of(&t["V"])], 1).unwrap();
    let (m, _, _) = model(false, &t["P_in"], &sep);
    let logits = m.forward(&ids, None, &Ctx::eval()).unwrap();
    let e = max_rel(&logits, &t["sep.logits"]);
    assert!(e < 1e-5, "separate K, V: logits {e:e}");
    // shared: logits, then the loss of predicting each token from the position before it (the
    // last prompt predicts the first token), its gradients, and the gates' scores
    let (m, p, s) = model(true, &t["P_in"], &slots_of(&t["KV"]));
    let logits = m.forward(&ids, None, &Ctx::eval()).unwrap();
    let e = max_rel(&logits, &t["logits"]);
    assert!(e < 1e-5, "shared: logits {e:e}");
    let n_p = 3;
    let scored = logits
        .narrow(1, n_p - 1, 6)
        .unwrap()
        .reshape((12, 96))
        .unwrap();
    let target: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    let lsm = petal_ops::testing::log_softmax(&scored);
    let pick = Tensor::new(target.as_slice(), &Device::Cpu).unwrap();
    let loss = (lsm
        .gather(&pick.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .sum_all()
        .unwrap()
        * (-1.0 / 12.0))
        .unwrap();
    let want = t["loss"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 1e-5 * want, "loss {got} vs {want}");
    let g = loss.backward().unwrap();
    let gp = g.get(p.as_tensor()).unwrap();
    assert!(max_rel(gp, &t["grad_P_in"]) < 1e-4, "grad of the prompts");
    let gs = g.get(s.as_tensor()).unwrap();
    assert!(
        max_rel(gs, &slots_of(&t["grad_KV"])) < 1e-4,
        "grad of the slots"
    );
    // the gate scores petal's pruning sums: Σ e g over each token, over each piece
    let eg = (p.as_tensor() * gp).unwrap();
    assert!(
        max_rel(&eg.sum(1).unwrap(), &t["gate_grad"]) < 1e-4,
        "token gates"
    );
    let pieces = petal_core::methods::kv_prompt::piece_sums(&eg, 4).unwrap();
    assert!(
        max_rel(&pieces, &t["seg_grad_official"]) < 1e-4,
        "piece gates"
    );
}
