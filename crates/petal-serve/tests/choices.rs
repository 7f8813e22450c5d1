//! `n` choices, lists of prompts, `logprobs` and `echo` on `petal serve`, over real sockets on
//! the tiny golden Llama (whose forward equals transformers', tests/golden): log-probabilities
//! against the log-softmax of the model's own logits computed here, each of `n` choices
//! against a single request with its seed, a streamed answer against the whole one.

use candle_core::{Device, Tensor};
use petal_core::Ctx;
use petal_io::LoadedModel;
use petal_serve::Limits;
use serde_json::{json, Value};
use std::time::Duration;

mod common;
use common::{request, stream_events};

fn model() -> LoadedModel {
    common::tiny_llama()
}

fn serving(lm: &mut LoadedModel, f: impl FnOnce(std::net::SocketAddr)) {
    let limits = Limits {
        grace: Duration::from_secs(5),
        // a 6-token prompt read in two chunks, a 4-token one in one piece
        prefill_chunk: 4,
        ..Limits::default()
    };
    common::serving(lm, Duration::ZERO, limits, 8, |addr, _| f(addr))
}

/// log p(ids[i] | ids[..i]) for i >= 1, and the argmax after the last, from the model's logits
/// (of the tokens' own positions: an input-side adapter's virtual tokens come first).
fn oracle(lm: &LoadedModel, ids: &[u32]) -> (Vec<f64>, u32) {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<Vec<f32>> = lm
        .model
        .forward(&x, None, &Ctx::eval())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let logits = &logits[logits.len() - ids.len()..];
    let lsm = |row: &[f32], j: u32| {
        let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
        row[j as usize] as f64 - m - z.ln()
    };
    let scores = (1..ids.len())
        .map(|i| lsm(&logits[i - 1], ids[i]))
        .collect();
    let last = &logits[ids.len() - 1];
    let best = (0..last.len())
        .max_by(|&a, &b| last[a].total_cmp(&last[b]))
        .unwrap();
    (scores, best as u32)
}

fn post(addr: std::net::SocketAddr, body: Value) -> Value {
    let (status, v) = request(addr, "POST", "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{v}");
    v
}

/// Through an adapter acting on every row, served alone (prompt tuning: virtual tokens ahead
/// of the prompt; prefix tuning: keys cached ahead of it), the echoed scores are the prompt
/// tokens' own, the prompt read in two chunks.
#[test]
fn echo_through_an_input_side_adapter_scores_the_prompt_s_own_tokens() {
    for folder in ["llama_prompt_tuning", "llama_prefix_tuning"] {
        let with = || {
            let mut lm = model();
            let dir = common::golden().join("adapters").join(folder);
            petal_io::attach_adapter(&mut lm.model, &dir, "p").unwrap();
            lm
        };
        let (mut lm, reference) = (with(), with());
        let ids: &[u32] = &[5, 9, 14, 20, 33, 2];
        let (want, best) = oracle(&reference, ids);
        let (plain, _) = oracle(&model(), ids);
        assert!(
            want.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-3),
            "{folder} must change the scores"
        );
        serving(&mut lm, |addr| {
            let v = post(
                addr,
                json!({"model": "p", "prompt": ids, "echo": true, "logprobs": 0,
                       "max_tokens": 1, "temperature": 0}),
            );
            let lp = &v["choices"][0]["logprobs"];
            let values = lp["token_logprobs"].as_array().unwrap();
            assert_eq!(values.len(), ids.len() + 1, "{folder}");
            for (k, w) in want.iter().enumerate() {
                let got = values[k + 1].as_f64().unwrap();
                assert!(
                    (got - w).abs() < 1e-4,
                    "{folder} token {}: {got} vs {w}",
                    k + 1
                );
            }
            let word = reference.tokenizer.decode(&[best], false).unwrap();
            assert_eq!(lp["tokens"][ids.len()], json!(word), "{folder}");
        });
    }
}

#[test]
fn echo_with_logprobs_scores_every_prompt_token_as_the_model_s_log_softmax() {
    let (mut lm, reference) = (model(), model());
    let prompts: [&[u32]; 2] = [&[5, 9, 14, 20, 33, 2], &[7, 7, 40, 3]];
    serving(&mut lm, |addr| {
        // lm-evaluation-harness's loglikelihood request: token ids, echo, one greedy token
        let v = post(
            addr,
            json!({"prompt": prompts, "echo": true, "logprobs": 2, "max_tokens": 1, "temperature": 0}),
        );
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2);
        for (i, (c, ids)) in choices.iter().zip(prompts).enumerate() {
            assert_eq!(c["index"], i);
            let lp = &c["logprobs"];
            let values = lp["token_logprobs"].as_array().unwrap();
            assert_eq!(
                values.len(),
                ids.len() + 1,
                "prompt tokens and one generated"
            );
            assert!(values[0].is_null(), "nothing precedes the first token");
            let (want, best) = oracle(&reference, ids);
            for (k, w) in want.iter().enumerate() {
                let got = values[k + 1].as_f64().unwrap();
                assert!(
                    (got - w).abs() < 1e-4,
                    "prompt {i} token {}: {got} vs {w}",
                    k + 1
                );
                let top = lp["top_logprobs"][k + 1].as_object().unwrap();
                let most = top
                    .values()
                    .map(|v| v.as_f64().unwrap())
                    .fold(f64::MIN, f64::max);
                assert!(top.len() <= 2 && most >= got - 1e-6, "{top:?}");
            }
            // the generated token is the greedy one, and the best of its alternatives
            let last = values[ids.len()].as_f64().unwrap();
            let top = lp["top_logprobs"][ids.len()].as_object().unwrap();
            let most = top
                .values()
                .map(|v| v.as_f64().unwrap())
                .fold(f64::MIN, f64::max);
            assert!((last - most).abs() < 1e-6);
            let word = reference.tokenizer.decode(&[best], false).unwrap();
            assert_eq!(lp["tokens"][ids.len()], json!(word));
            let prompt_text = reference.tokenizer.decode(ids, false).unwrap();
            assert!(c["text"].as_str().unwrap().starts_with(&prompt_text));
        }
        // the echoed prompt alone (max_tokens 0): the same scores, nothing generated
        let v = post(
            addr,
            json!({"prompt": prompts[0], "echo": true, "logprobs": 0, "max_tokens": 0}),
        );
        let values = v["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap();
        assert_eq!(values.len(), prompts[0].len());
        let (want, _) = oracle(&reference, prompts[0]);
        let got: f64 = values[1..].iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((got - want.iter().sum::<f64>()).abs() < 1e-3);
        assert_eq!(v["usage"]["completion_tokens"], 0);
        // out of range, and a token id outside the vocabulary
        let (status, e) = request(addr, "POST", "/v1/completions", r#"{"prompt": [1, 99999]}"#);
        assert_eq!(status, 400);
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("vocabulary"),
            "{e}"
        );
    });
}

#[test]
fn each_of_n_choices_is_the_single_request_with_its_seed_and_streams_alike() {
    let mut lm = model();
    serving(&mut lm, |addr| {
        let ask = |n: usize, seed: u64| {
            json!({"prompt": "w5 w9 w14", "n": n, "seed": seed, "temperature": 1.0,
                   "max_tokens": 6, "logprobs": 1})
        };
        let v = post(addr, ask(3, 11));
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3);
        let mut total = 0;
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            let alone = post(addr, ask(1, 11 + i as u64));
            assert_eq!(c["text"], alone["choices"][0]["text"], "choice {i}");
            assert_eq!(c["logprobs"], alone["choices"][0]["logprobs"], "choice {i}");
            total += alone["usage"]["completion_tokens"].as_u64().unwrap();
        }
        assert_eq!(v["usage"]["completion_tokens"], total);
        let once = post(addr, ask(1, 0))["usage"]["prompt_tokens"].clone();
        assert_eq!(
            v["usage"]["prompt_tokens"], once,
            "the prompt counts once, whatever n"
        );
        // streamed: events name their choice; each choice's pieces add up to its text and
        // its tokens' log-probabilities; one closing chunk a choice, usage on the last
        let mut body = ask(3, 11);
        body["stream"] = json!(true);
        let events = stream_events(addr, "/v1/completions", &body.to_string());
        assert_eq!(events.last().unwrap(), "[DONE]");
        let events: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        for (i, c) in choices.iter().enumerate() {
            let mine: Vec<&Value> = events
                .iter()
                .filter(|e| e["choices"][0]["index"] == i)
                .collect();
            let text: String = mine
                .iter()
                .map(|e| e["choices"][0]["text"].as_str().unwrap())
                .collect();
            assert_eq!(json!(text), c["text"], "choice {i}");
            let tokens: Vec<Value> = mine
                .iter()
                .filter_map(|e| e["choices"][0]["logprobs"]["tokens"].as_array())
                .flatten()
                .cloned()
                .collect();
            assert_eq!(json!(tokens), c["logprobs"]["tokens"], "choice {i}");
            let closing = mine
                .iter()
                .filter(|e| !e["choices"][0]["finish_reason"].is_null());
            assert_eq!(closing.count(), 1, "choice {i}");
        }
        let usage = &events.last().unwrap()["usage"];
        for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(usage[k], v["usage"][k], "{k}");
        }
        // the same prompt again: all but its last token found in the prefix cache
        assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 2);
        // too many choices for one request
        let (status, e) = request(addr, "POST", "/v1/completions", &ask(200, 1).to_string());
        assert_eq!(status, 400);
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("at most 128"),
            "{e}"
        );
    });
}
