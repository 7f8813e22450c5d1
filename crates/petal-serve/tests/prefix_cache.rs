//! Prefix caching (`Decoder::with_prefix_cache`): a prompt that begins as a finished sequence
//! did, through the same adapter, reads only the rest and generates what it does alone (the
//! same tokens, their log-probabilities within float noise), on the tiny golden Llama with a
//! PEFT LoRA adapter and with PEFT's prompt-tuning fixture.

use candle_core::{DType, Device};
use petal_core::inject::set_active;
use petal_io::load_model;
use petal_models::Llama;
use petal_serve::logprobs::TokenLogprob;
use petal_serve::{generate, Decoder, Finished, Generated, SamplingParams};
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_new_tokens: n,
        logprobs: Some(0),
        ..Default::default()
    }
}

/// `prompt` through `adapter` into `dec` (empty), decoded to its end.
fn run(
    dec: &mut Decoder<'_, ()>,
    model: &Llama,
    prompt: &[u32],
    p: SamplingParams,
    adapter: &str,
) -> Finished<()> {
    let none = &mut |_: &mut (), _: &str, _: &[TokenLogprob]| {};
    if let Some(f) = dec.add(model, (), prompt, p, adapter, none).unwrap() {
        return f;
    }
    loop {
        if let Some(f) = dec.step(model, none).unwrap().pop() {
            assert!(dec.is_empty());
            return f;
        }
    }
}

/// The same tokens as `want`, each token's log-probability within 1e-4.
fn same(got: &Generated, want: &Generated, what: &str) {
    assert_eq!(got.ids, want.ids, "{what}");
    for (g, w) in got.logprobs.iter().zip(&want.logprobs) {
        assert!((g.logprob - w.logprob).abs() < 1e-4, "{what}: {g:?} {w:?}");
    }
}

#[test]
fn a_prompt_beginning_as_a_finished_one_did_reads_only_the_rest_and_generates_what_it_does_alone() {
    let g = golden();
    let mut lm = load_model(g.join("llama").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let adapter = g.join("adapters/llama_lora_qv");
    petal_io::attach_adapter(&mut lm.model, &adapter, "q").unwrap();
    let tok = &lm.tokenizer;
    let enc = |s: &str| tok.encode(s, true).unwrap();
    // alone, the adapter active (as `generate` runs it)
    let alone = |model: &mut Llama, prompt: &[u32], a: &[&str]| {
        set_active(model, a);
        let out = generate(model, tok, prompt, &greedy(6), &mut |_| {}).unwrap();
        set_active(model, &[]);
        out
    };
    let first = enc("w5 w9 w14 w20 w33 w2 w8");
    let want = alone(&mut lm.model, &first, &["q"]);
    let model = &lm.model;
    let mut dec = Decoder::new(tok).with_prefix_cache(1 << 20);
    let f = run(&mut dec, model, &first, greedy(6), "q");
    same(&f.generated, &want, "the first prompt");
    assert_eq!((f.cached, dec.prefilled()), (0, first.len()));
    // the next turn: the first prompt, its answer and more; its cache holds all but the last
    // token drawn (never fed: the sequence ends at it)
    let answer = &f.generated.ids;
    assert_eq!(answer.len(), 6);
    let turn: Vec<u32> = [&first[..], answer, &enc("w40 w41")[1..]].concat();
    let held = first.len() + answer.len() - 1;
    let want = alone(&mut lm.model, &turn, &["q"]);
    let model = &lm.model;
    let before = dec.prefilled();
    let f = run(&mut dec, model, &turn, greedy(6), "q");
    same(&f.generated, &want, "the next turn");
    assert_eq!(f.cached, held);
    assert_eq!(dec.prefilled() - before, turn.len() - held);
    assert_eq!(dec.reused(), held);
    // a prompt sharing the first five tokens: through the base model nothing is reused
    let branch: Vec<u32> = [&first[..5], &enc("w70 w3 w3")[1..]].concat();
    let base = alone(&mut lm.model, &branch, &[]);
    let with_q = alone(&mut lm.model, &branch, &["q"]);
    assert_ne!(base.ids, with_q.ids, "the adapter must change the output");
    let model = &lm.model;
    let f = run(&mut dec, model, &branch, greedy(6), "__base__");
    same(&f.generated, &base, "through the base model");
    assert_eq!(f.cached, 0);
    // through the adapter, the five
    let f = run(&mut dec, model, &branch, greedy(6), "q");
    same(&f.generated, &with_q, "the branch");
    assert_eq!(f.cached, 5);
    // a prompt whose log-probabilities are asked for reads them all
    let p = SamplingParams {
        prompt_logprobs: true,
        ..greedy(6)
    };
    let f = run(&mut dec, model, &branch, p, "q");
    assert_eq!(f.cached, 0);
    assert_eq!(f.generated.prompt_logprobs.len(), branch.len() - 1);
    // the adapter detached (another may take its name): what went through it is forgotten
    dec.forget("q");
    assert_eq!(run(&mut dec, model, &branch, greedy(6), "q").cached, 0);
    // without a prefix cache, nothing is kept
    let mut plain = Decoder::new(tok);
    run(&mut plain, model, &first, greedy(6), "q");
    assert_eq!(run(&mut plain, model, &turn, greedy(6), "q").cached, 0);
}

#[test]
fn behind_an_input_side_adapter_s_virtual_positions_the_prefix_is_reused_too() {
    let g = golden();
    for which in ["llama_prompt_tuning", "llama_prefix_tuning"] {
        let mut lm =
            load_model(g.join("llama").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
        let enc = |s: &str| lm.tokenizer.encode(s, true).unwrap();
        let first = enc("w5 w9 w14 w20 w33 w2 w8");
        let second: Vec<u32> = [&first[..6], &enc("w61 w62 w63")[1..]].concat();
        let base = generate(&lm.model, &lm.tokenizer, &second, &greedy(6), &mut |_| {}).unwrap();
        petal_io::attach_adapter(&mut lm.model, &g.join("adapters").join(which), "v").unwrap();
        let (model, tok) = (&lm.model, &lm.tokenizer);
        assert!(model.virtual_positions() > 0, "{which}");
        let want = generate(model, tok, &second, &greedy(6), &mut |_| {}).unwrap();
        assert_ne!(want.ids, base.ids, "{which} must change the output");
        let mut dec = Decoder::new(tok).with_prefix_cache(1 << 20);
        let row = petal_core::mixed::ACTIVE;
        run(&mut dec, model, &first, greedy(6), row);
        let f = run(&mut dec, model, &second, greedy(6), row);
        same(&f.generated, &want, which);
        assert_eq!(f.cached, 6, "{which}");
    }
}

#[test]
fn pasta_s_occurrence_slots_count_from_the_start_so_nothing_is_reused_under_them() {
    let g = golden();
    let mut lm = load_model(g.join("llama").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let mut c = petal_core::AdapterConfig::new("PASTA").unwrap();
    c.set("special_tokens", (0..96).collect::<Vec<u32>>())
        .unwrap();
    c.set("slots", "occurrence").unwrap();
    petal_core::inject_adapter(&mut lm.model, "p", &c, 3).unwrap();
    let (model, tok) = (&lm.model, &lm.tokenizer);
    assert!(!model.continues_a_cache());
    let prompt = tok.encode("w5 w9 w14 w20", true).unwrap();
    let mut dec = Decoder::new(tok).with_prefix_cache(1 << 20);
    let row = petal_core::mixed::ACTIVE;
    // one token each (decoding past it would need the count from the start)
    let first = run(&mut dec, model, &prompt, greedy(1), row);
    let again = run(&mut dec, model, &prompt, greedy(1), row);
    assert_eq!(
        (again.cached, again.generated.ids),
        (0, first.generated.ids)
    );
}
