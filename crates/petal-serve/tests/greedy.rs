//! Greedy generation against transformers + PEFT (tools/golden/make_generate.py): the reference
//! is their greedy decode by whole forwards over the growing sequence, which transformers'
//! own `generate` matches except with prompt-learning adapters (see the generator).

mod common;
use candle_core::{DType, Device};
use common::{active_requests, golden};
use petal_core::inject::set_active;
use petal_io::load_model;
use petal_serve::{generate, generate_batch, SamplingParams};

/// Every case of tests/fixtures/golden/generate.json (the tiny Llama past its RoPE scaling's
/// original context, Qwen2, Mistral; base and LoRA, DoRA, prefix and prompt tuning; two Mistral
/// prompts that end at the end-of-sequence id): petal's greedy tokens equal transformers' with
/// PEFT, alone and both prompts of a case batched (the active adapter on every row, as `petal
/// eval --task` decodes), and stop where theirs do.
#[test]
fn greedy_generation_equals_transformers_peft_by_whole_forwards() {
    let g = golden();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(g.join("generate.json")).unwrap()).unwrap();
    assert!(cases.len() >= 18, "{} cases", cases.len());
    assert!(
        cases.iter().any(|c| c["eos"] == true),
        "a case that ends at the end of sequence"
    );
    let ids_of = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let params = SamplingParams {
        max_new_tokens: 24,
        ..Default::default()
    };
    for pair in cases.chunks(2) {
        let (model, adapter) = (pair[0]["model"].as_str().unwrap(), &pair[0]["adapter"]);
        assert_eq!(
            (&pair[1]["model"], &pair[1]["adapter"]),
            (&pair[0]["model"], adapter)
        );
        // a fresh model a case: one input-side adapter at a time
        let mut lm = load_model(g.join(model).to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
        if let Some(folder) = adapter.as_str() {
            petal_io::attach_adapter(&mut lm.model, &g.join("adapters").join(folder), folder)
                .unwrap();
            set_active(&mut lm.model, &[folder]);
        }
        let prompts: Vec<Vec<u32>> = pair.iter().map(|c| ids_of(&c["prompt"])).collect();
        let reqs = active_requests(&prompts, &params);
        let batched = generate_batch(&lm.model, &lm.tokenizer, &reqs).unwrap();
        for ((case, prompt), b) in pair.iter().zip(&prompts).zip(&batched) {
            let want = ids_of(&case["ids"]);
            let alone = generate(&lm.model, &lm.tokenizer, prompt, &params, &mut |_| {}).unwrap();
            let what = format!("{model} {adapter} {prompt:?}");
            assert_eq!(alone.ids, want, "{what}: alone");
            assert_eq!(b.ids, want, "{what}: batched");
            let eos = case["eos"].as_bool().unwrap();
            assert_eq!(alone.stop == petal_serve::StopReason::Eos, eos, "{what}");
        }
    }
}
