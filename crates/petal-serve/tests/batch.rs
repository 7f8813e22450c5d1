//! Batched generation (`generate_batch`: prompts of different lengths, each through its own
//! adapter and KV cache, decoded together) against `generate` run for each request alone with
//! its adapter active, on the tiny golden Llama with three PEFT adapters.

mod common;
use candle_core::{DType, Device};
use common::{active_requests, golden};
use petal_core::inject::set_active;
use petal_io::load_model;
use petal_serve::{generate, generate_batch, Request, SamplingParams};

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

#[test]
fn sequences_joining_a_running_batch_midway_generate_what_each_does_alone() {
    let g = golden();
    let mut lm = load_model(g.join("llama").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    for (name, folder) in [("q", "llama_lora_qv"), ("v", "llama_vera")] {
        petal_io::attach_adapter(&mut lm.model, &g.join("adapters").join(folder), name).unwrap();
    }
    let p = |n| SamplingParams {
        max_new_tokens: n,
        ..Default::default()
    };
    let alone = |lm: &mut petal_io::LoadedModel, prompt: &str, a: &str, n: usize| {
        let active: &[&str] = if a == "__base__" { &[] } else { &[a] };
        set_active(&mut lm.model, active);
        let ids = lm.tokenizer.encode(prompt, true).unwrap();
        generate(&lm.model, &lm.tokenizer, &ids, &p(n), &mut |_| {})
            .unwrap()
            .ids
    };
    // three sequences that run to their token limit alone (no early end of sequence), so
    // they overlap in the batch: the first alone for three steps, the second joins, two
    // steps later the third
    let mut jobs = Vec::new();
    let mut want = Vec::new();
    for (prompt, a) in [
        ("w5 w9 w14", "q"),
        ("w7 w3", "v"),
        ("w60 w8 w3 w90", "__base__"),
        ("w11 w12", "q"),
        ("w40 w41 w42", "v"),
        ("w1 w5", "__base__"),
        ("w88", "q"),
        ("w30 w31", "v"),
    ] {
        let n = [12, 7, 9][jobs.len()];
        let ids = alone(&mut lm, prompt, a, n);
        if ids.len() == n {
            jobs.push((prompt, a, n));
            want.push(ids);
        }
        if jobs.len() == 3 {
            break;
        }
    }
    assert_eq!(
        jobs.len(),
        3,
        "not enough candidate prompts run to their limit"
    );
    let tok = &lm.tokenizer;
    let mut dec = petal_serve::Decoder::new(tok);
    let mut got = vec![None; 3];
    let mut most = vec![0; 3];
    let add = |dec: &mut petal_serve::Decoder<usize>, i: usize| {
        let (prompt, a, n) = jobs[i];
        let ids = tok.encode(prompt, true).unwrap();
        assert!(dec
            .add(&lm.model, i, &ids, p(n), a, &mut |_, _, _| {})
            .map_err(|(_, e)| e)
            .unwrap()
            .is_none());
    };
    add(&mut dec, 0);
    for step in 0..20 {
        if step == 3 {
            add(&mut dec, 1);
        }
        if step == 5 {
            add(&mut dec, 2);
        }
        for f in dec
            .step(&lm.model, &mut |_, _, _| {})
            .map_err(|(_, e)| e)
            .unwrap()
        {
            most[f.key] = f.batch;
            got[f.key] = Some(f.generated.ids);
        }
    }
    assert!(dec.is_empty());
    for i in 0..3 {
        assert_eq!(got[i].as_ref().unwrap(), &want[i], "sequence {i}");
    }
    assert_eq!(
        most,
        [3, 3, 3],
        "each was decoded alongside the others at some step"
    );
}

#[test]
fn streamed_text_holds_back_what_could_begin_a_stop_string_and_never_sends_it() {
    let g = golden();
    let lm = load_model(g.join("llama").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let tok = &lm.tokenizer;
    let ids = tok.encode("w5 w9 w14", true).unwrap();
    let p = SamplingParams {
        max_new_tokens: 12,
        ..Default::default()
    };
    let full = generate(&lm.model, tok, &ids, &p, &mut |_| {})
        .unwrap()
        .text;
    // a stop string that first appears in the middle of the text
    let words: Vec<&str> = full.split(' ').collect();
    assert!(words.len() >= 8, "{full}");
    let stop = format!("{} {}", words[4], words[5]);
    let at = full.find(&stop).unwrap();
    let p = SamplingParams {
        stop: vec![stop.clone()],
        ..p
    };
    let mut pieces = Vec::new();
    let g = generate(&lm.model, tok, &ids, &p, &mut |t| {
        pieces.push(t.to_string())
    })
    .unwrap();
    assert_eq!(g.text, &full[..at]);
    assert_eq!(pieces.concat(), g.text, "streamed: {pieces:?}");
    assert!(pieces.len() >= 2, "{pieces:?}");
}

#[test]
fn a_prompt_read_a_chunk_a_step_generates_what_it_does_alone_beside_a_running_sequence() {
    let g = golden();
    let mut lm = load_model(g.join("llama").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    petal_io::attach_adapter(
        &mut lm.model,
        &g.join("adapters").join("llama_lora_qv"),
        "q",
    )
    .unwrap();
    let p = |n| SamplingParams {
        max_new_tokens: n,
        ..Default::default()
    };
    let long = "w5 w9 w14 w20 w33 w7 w3 w60 w8 w3 w90 w45 w12 w11 w40 w41 w42";
    let jobs = [("w1 w2", "__base__", 12), (long, "q", 8)];
    let mut want = Vec::new();
    for (prompt, a, n) in jobs {
        let active: &[&str] = if a == "__base__" { &[] } else { &[a] };
        set_active(&mut lm.model, active);
        let ids = lm.tokenizer.encode(prompt, true).unwrap();
        want.push(generate(&lm.model, &lm.tokenizer, &ids, &p(n), &mut |_| {}).unwrap());
    }
    let tok = &lm.tokenizer;
    let long_ids = tok.encode(long, true).unwrap();
    assert!(long_ids.len() > 12, "{}", long_ids.len());
    // chunks of 4: the short prompt is read at once, the long one over several steps while
    // the short one keeps decoding
    let mut dec = petal_serve::Decoder::new(tok).with_prefill_chunk(4);
    let mut got = [None, None];
    let mut texts = [String::new(), String::new()];
    for (i, (prompt, a, n)) in jobs.iter().enumerate() {
        let ids = tok.encode(prompt, true).unwrap();
        let added = dec.add(&lm.model, i, &ids, p(*n), a, &mut |k, t, _| {
            texts[*k].push_str(t)
        });
        assert!(added.map_err(|(_, e)| e).unwrap().is_none());
    }
    assert_eq!(dec.len(), 2);
    let mut short_len = Vec::new();
    for _ in 0..30 {
        for f in dec
            .step(&lm.model, &mut |k, t, _| texts[*k].push_str(t))
            .map_err(|(_, e)| e)
            .unwrap()
        {
            got[f.key] = Some(f.generated);
        }
        short_len.push(texts[0].split(' ').filter(|w| !w.is_empty()).count());
    }
    assert!(dec.is_empty());
    for i in 0..2 {
        let g = got[i].as_ref().unwrap();
        assert_eq!(g.ids, want[i].ids, "sequence {i}");
        assert_eq!(texts[i], want[i].text, "streamed text of {i}");
    }
    // while the long prompt was read (its first chunks), the short sequence gained a token a
    // step
    let chunks = long_ids.len().div_ceil(4);
    assert!(
        short_len[..chunks].windows(2).all(|w| w[1] == w[0] + 1),
        "{short_len:?}"
    );
}

#[test]
fn prompts_arriving_together_share_one_chunk_of_prefill_a_step_and_generate_what_they_do_alone() {
    let g = golden();
    let lm = load_model(g.join("llama").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let p = |n| SamplingParams {
        max_new_tokens: n,
        ..Default::default()
    };
    let tok = &lm.tokenizer;
    // two-word prompts of one length that run to the token limit alone (a sequence done at
    // its first token would come back at once and end its step's reading early)
    let (mut ids, mut want) = (Vec::new(), Vec::new());
    for i in 1..60 {
        let prompt = tok.encode(&format!("w{i} w{}", i + 7), true).unwrap();
        let alone = generate(&lm.model, tok, &prompt, &p(10), &mut |_| {})
            .unwrap()
            .ids;
        if alone.len() == 10
            && ids
                .first()
                .is_none_or(|f: &Vec<u32>| f.len() == prompt.len())
        {
            ids.push(prompt);
            want.push(alone);
        }
        if ids.len() == 4 {
            break;
        }
    }
    assert_eq!(ids.len(), 4, "not enough prompts that run to the limit");
    let len = ids[0].len();
    // a budget of two prompts' tokens a step: the first prompt is read at once (the batch is
    // empty), the three arriving after it two a step, not all before the next step
    let mut dec = petal_serve::Decoder::new(tok).with_prefill_chunk(2 * len);
    let mut texts = vec![String::new(); 4];
    let mut got = vec![None; 4];
    for (i, prompt) in ids.iter().enumerate() {
        let added = dec.add(&lm.model, i, prompt, p(10), "__base__", &mut |k, t, _| {
            texts[*k].push_str(t)
        });
        assert!(added.map_err(|(_, e)| e).unwrap().is_none());
    }
    assert_eq!((dec.len(), dec.waiting()), (4, 3));
    let mut waiting = Vec::new();
    while !dec.is_empty() {
        for f in dec
            .step(&lm.model, &mut |k, t, _| texts[*k].push_str(t))
            .map_err(|(_, e)| e)
            .unwrap()
        {
            got[f.key] = Some(f.generated.ids);
        }
        waiting.push(dec.waiting());
    }
    assert_eq!(waiting[..2], [1, 0], "{waiting:?}");
    for i in 0..4 {
        assert_eq!(got[i].as_ref().unwrap(), &want[i], "sequence {i}");
    }
}

#[test]
fn a_short_prompt_queued_behind_a_long_one_is_read_first_and_both_generate_what_they_do_alone() {
    let g = golden();
    let lm = load_model(g.join("llama").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let p = |n| SamplingParams {
        max_new_tokens: n,
        ..Default::default()
    };
    let tok = &lm.tokenizer;
    let encode = |s: &str| tok.encode(s, true).unwrap();
    let (first, long, short) = (
        encode("w1 w2"),
        encode("w5 w9 w14 w20 w33 w7 w3 w60 w8 w3 w90 w45 w12 w11 w40 w41 w42"),
        encode("w3 w4"),
    );
    let want: Vec<_> = [&first, &long, &short]
        .iter()
        .map(|i| generate(&lm.model, tok, i, &p(6), &mut |_| {}).unwrap().ids)
        .collect();
    let chunk = short.len() + 2;
    assert!(long.len() > 2 * chunk);
    let mut dec = petal_serve::Decoder::new(tok).with_prefill_chunk(chunk);
    let mut got = vec![None; 3];
    for (i, ids) in [&first, &long, &short].into_iter().enumerate() {
        let added = dec.add(&lm.model, i, ids, p(6), "__base__", &mut |_, _, _| {});
        assert!(added.map_err(|(_, e)| e).unwrap().is_none());
    }
    assert_eq!(dec.waiting(), 2);
    let mut waiting = Vec::new();
    while !dec.is_empty() {
        for f in dec
            .step(&lm.model, &mut |_, _, _| {})
            .map_err(|(_, e)| e)
            .unwrap()
        {
            got[f.key] = Some(f.generated.ids);
        }
        waiting.push(dec.waiting());
    }
    // the short prompt is read in the first step, the long one over the following ones
    assert_eq!(waiting[0], 1, "{waiting:?}");
    for i in 0..3 {
        assert_eq!(got[i].as_ref().unwrap(), &want[i], "sequence {i}");
    }
}

/// Input-side adapters act on every row: prompts decoded together through the model as it is
/// (`ACTIVE`), two at a time and joining as places free up, generate what each does alone.
/// PEFT's prompt, prefix and P-tuning fixtures (virtual tokens and prefixes in the caches
/// since the prefill), and PASTA on every token id (a shift at every layer of every step).
#[test]
fn input_side_adapters_decode_together_what_each_prompt_does_alone() {
    let g = golden();
    let texts = [
        "w5 w9 w14",
        "w7",
        "w60 w8 w3 w3 w90 w45 w12",
        "w1 w2",
        "w33 w20",
    ];
    let params = SamplingParams {
        max_new_tokens: 8,
        ..Default::default()
    };
    for which in [
        "llama_prompt_tuning",
        "llama_prefix_tuning",
        "llama_p_tuning",
        "pasta",
    ] {
        let mut lm =
            load_model(g.join("llama").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
        let prompts: Vec<Vec<u32>> = texts
            .iter()
            .map(|p| lm.tokenizer.encode(p, true).unwrap())
            .collect();
        let alone = |lm: &petal_io::LoadedModel| -> Vec<Vec<u32>> {
            prompts
                .iter()
                .map(|p| {
                    let g = generate(&lm.model, &lm.tokenizer, p, &params, &mut |_| {});
                    g.unwrap().ids
                })
                .collect()
        };
        let base = alone(&lm);
        if which == "pasta" {
            let mut c = petal_core::AdapterConfig::new("PASTA").unwrap();
            c.set("special_tokens", (0..96).collect::<Vec<u32>>())
                .unwrap();
            petal_core::inject_adapter(&mut lm.model, "p", &c, 3).unwrap();
        } else {
            petal_io::attach_adapter(&mut lm.model, &g.join("adapters").join(which), "p").unwrap();
        }
        let want = alone(&lm);
        assert_ne!(
            want, base,
            "{which}: the adapter must change what is generated"
        );
        let reqs = active_requests(&prompts, &params);
        let mut got = vec![None; reqs.len()];
        petal_serve::generate_continuous(&lm.model, &lm.tokenizer, &reqs, 2, &mut |i, g| {
            got[i] = Some(g.ids)
        })
        .unwrap();
        let got: Vec<Vec<u32>> = got.into_iter().map(Option::unwrap).collect();
        assert_eq!(got, want, "{which}");
        // and a named row cannot join a batch of the model as it is
        let mixed = [reqs[0].adapter, "p"];
        let e = petal_core::mixed::batch_ctx(&lm.model, &mixed).unwrap_err();
        assert!(e.to_string().contains("cannot share a batch"), "{e}");
    }
}

/// A request's `n` choices share its prompt's prefill: forks of one prompt, each with its own
/// seed, generate what each does alone while the prompt runs through the model once; read at
/// once into an empty batch, or in chunks behind a running sequence; and when the first
/// choice leaves before its prompt is read, the others still get theirs.
#[test]
fn forks_of_one_prompt_read_it_once_and_generate_what_each_does_alone() {
    let lm = load_model(
        golden().join("llama").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (model, tok) = (&lm.model, &lm.tokenizer);
    let prompt = tok.encode("w5 w9 w14 w20 w33 w2", true).unwrap();
    let other = tok.encode("w7 w8", true).unwrap();
    let p = |seed| SamplingParams {
        temperature: 1.0,
        seed,
        max_new_tokens: 6,
        ..Default::default()
    };
    let want: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            generate(model, tok, &prompt, &p(10 + i), &mut |_| {})
                .unwrap()
                .ids
        })
        .collect();
    let distinct: std::collections::HashSet<_> = want.iter().collect();
    assert!(distinct.len() >= 2, "the seeds must draw apart: {want:?}");
    let forks = || vec![(1, p(11)), (2, p(12))];
    let run = |dec: &mut petal_serve::Decoder<usize>, got: &mut Vec<Option<Vec<u32>>>| {
        while !dec.is_empty() {
            for f in dec.step(model, &mut |_, _, _| {}).unwrap() {
                got[f.key] = Some(f.generated.ids);
            }
        }
    };
    // into an empty batch
    let mut dec = petal_serve::Decoder::new(tok);
    let mut got = vec![None; 4];
    let done = dec
        .add_forked(
            model,
            (0, p(10)),
            forks(),
            &prompt,
            "__base__",
            &mut |_, _, _| {},
        )
        .unwrap();
    done.into_iter()
        .for_each(|f| got[f.key] = Some(f.generated.ids));
    run(&mut dec, &mut got);
    assert_eq!(
        got[..3],
        want.iter().cloned().map(Some).collect::<Vec<_>>()[..]
    );
    assert_eq!(dec.prefilled(), prompt.len());
    // behind a running sequence, read 4 tokens a step
    let mut dec = petal_serve::Decoder::new(tok).with_prefill_chunk(4);
    let mut got = vec![None; 4];
    let none = |_: &mut usize, _: &str, _: &[petal_serve::logprobs::TokenLogprob]| {};
    assert!(dec
        .add(model, 3, &other, p(1), "__base__", &mut { none })
        .unwrap()
        .is_none());
    let queued = dec
        .add_forked(model, (0, p(10)), forks(), &prompt, "__base__", &mut {
            none
        })
        .unwrap();
    assert!(queued.is_empty());
    assert_eq!(dec.len(), 4, "the forks count in the batch while they wait");
    run(&mut dec, &mut got);
    assert_eq!(
        got[..3],
        want.iter().cloned().map(Some).collect::<Vec<_>>()[..]
    );
    assert_eq!(dec.prefilled(), other.len() + prompt.len());
    // the first choice leaves while its prompt waits
    let mut dec = petal_serve::Decoder::new(tok).with_prefill_chunk(4);
    let mut got = vec![None; 4];
    dec.add(model, 3, &other, p(1), "__base__", &mut { none })
        .unwrap();
    dec.add_forked(model, (0, p(10)), forks(), &prompt, "__base__", &mut {
        none
    })
    .unwrap();
    assert_eq!(dec.remove(|k| *k == 0), [0]);
    run(&mut dec, &mut got);
    assert_eq!(got[0], None);
    assert_eq!(got[1..3], [Some(want[1].clone()), Some(want[2].clone())]);
}

#[test]
fn prompts_done_at_their_first_token_all_come_back_from_the_step_that_reads_them() {
    let lm = load_model(
        golden().join("llama").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    );
    let lm = lm.unwrap();
    let (model, tok) = (&lm.model, &lm.tokenizer);
    let p = |n| SamplingParams {
        max_new_tokens: n,
        ..Default::default()
    };
    let none = &mut |_: &mut usize, _: &str, _: &[petal_serve::logprobs::TokenLogprob]| {};
    let mut dec = petal_serve::Decoder::new(tok);
    let running = tok.encode("w7 w8", true).unwrap();
    assert!(dec
        .add(model, 0, &running, p(20), "__base__", none)
        .unwrap()
        .is_none());
    // four one-token answers queued behind the running sequence (classification, scoring)
    let texts = ["w5 w9", "w14", "w20 w33 w2", "w1"];
    for (i, t) in texts.iter().enumerate() {
        let ids = tok.encode(t, true).unwrap();
        let queued = dec.add(model, i + 1, &ids, p(1), "__base__", none).unwrap();
        assert!(queued.is_none());
    }
    let mut done = dec.step(model, none).unwrap();
    done.sort_by_key(|f| f.key);
    let keys: Vec<usize> = done.iter().map(|f| f.key).collect();
    assert_eq!(
        keys,
        [1, 2, 3, 4],
        "read in one chunk, all done in one step"
    );
    for (f, t) in done.iter().zip(texts) {
        let ids = tok.encode(t, true).unwrap();
        let alone = generate(model, tok, &ids, &p(1), &mut |_| {}).unwrap();
        assert_eq!(f.generated.ids, alone.ids, "{t}");
    }
    assert_eq!(dec.len(), 1, "the running sequence goes on");
}
