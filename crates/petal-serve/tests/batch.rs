//! Batched generation (`generate_batch`: prompts of different lengths, each through its own
//! adapter and KV cache, decoded together) against `generate` run for each request alone with
//! its adapter active, on the tiny golden Llama with three PEFT adapters.

use candle_core::{DType, Device};
use petal_core::inject::set_active;
use petal_models::load_model;
use petal_serve::{generate, generate_batch, Request, SamplingParams};
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

#[test]
fn a_batch_of_requests_through_different_adapters_generates_what_each_does_alone() {
    let g = golden();
    let mut lm = load_model(g.join("llama").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    for (name, folder) in [
        ("q", "llama_lora_qv"),
        ("e", "llama_lora_embedding"),
        ("h", "llama_loha_all_linear"),
    ] {
        petal_io::attach_adapter(&mut lm.model, &g.join("adapters").join(folder), name).unwrap();
    }
    let tok = &lm.tokenizer;
    let greedy = |n| SamplingParams {
        max_new_tokens: n,
        ..Default::default()
    };
    let sampled = SamplingParams {
        temperature: 0.8,
        top_k: Some(20),
        seed: 7,
        max_new_tokens: 9,
        ..Default::default()
    };
    let params = [greedy(12), greedy(5), sampled, greedy(10), greedy(7)];
    let prompts: Vec<Vec<u32>> = [
        "w5 w9 w14",
        "w7",
        "w60 w8 w3 w3 w90 w45 w12",
        "w1 w2",
        "w33 w20 w5 w11",
    ]
    .iter()
    .map(|p| tok.encode(p, true).unwrap())
    .collect();
    let adapters = ["q", "__base__", "h", "e", "q"];
    // alone, one after another
    let mut want = Vec::new();
    for ((prompt, p), a) in prompts.iter().zip(&params).zip(adapters) {
        let active: &[&str] = if a == "__base__" { &[] } else { &[a] };
        set_active(&mut lm.model, active);
        want.push(generate(&lm.model, tok, prompt, p, &mut |_| {}).unwrap());
    }
    let distinct: std::collections::HashSet<_> = want.iter().map(|g| g.ids.clone()).collect();
    assert_eq!(
        distinct.len(),
        want.len(),
        "every request must generate something else"
    );
    // together
    let reqs: Vec<Request> = prompts
        .iter()
        .zip(&params)
        .zip(adapters)
        .map(|((prompt, params), adapter)| Request {
            prompt,
            params,
            adapter,
        })
        .collect();
    let got = generate_batch(&lm.model, tok, &reqs).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.ids, w.ids, "request {i} ({})", adapters[i]);
        assert_eq!(g.text, w.text, "request {i}");
        assert_eq!(g.stop, w.stop, "request {i}");
    }
    // and the sequences ended at different steps, so rows left the batch along the way
    let lengths: std::collections::HashSet<_> = got.iter().map(|g| g.ids.len()).collect();
    assert!(lengths.len() >= 3, "{lengths:?}");
}
