//! `petal serve`'s HTTP server on the tiny golden Llama with two PEFT adapters, over real TCP
//! sockets: each request's completion against `generate` run directly with that adapter
//! active, and bad requests against their OpenAI-style errors.

use candle_core::{DType, Device};
use petal_core::inject::set_active;
use petal_io::{load_model, LoadedModel};
use petal_serve::{generate, Limits, SamplingParams, Served, Stop};

mod common;
use common::{request, stream_events};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

fn model_with(adapters: &[(&str, &str)]) -> LoadedModel {
    let mut lm = load_model(
        golden().join("llama").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for (name, folder) in adapters {
        petal_io::attach_adapter(&mut lm.model, &golden().join("adapters").join(folder), name)
            .unwrap();
    }
    lm
}

/// Test limits: short timeouts, the default queue.
fn limits() -> Limits {
    Limits {
        header_timeout: std::time::Duration::from_secs(2),
        body_timeout: std::time::Duration::from_secs(1),
        grace: std::time::Duration::from_secs(5),
        ..Limits::default()
    }
}

/// Runs `f` against `lm` served on a free local port, then stops the server.
fn serving(lm: &mut LoadedModel, f: impl FnOnce(SocketAddr)) {
    serving_with(lm, std::time::Duration::ZERO, limits(), 8, f)
}

/// `serving`, the server starting to take requests only `after` this long (requests sent
/// meanwhile queue up), with these limits and batch size.
fn serving_with(
    lm: &mut LoadedModel,
    after: std::time::Duration,
    limits: Limits,
    max_batch: usize,
    f: impl FnOnce(SocketAddr),
) {
    common::serving(lm, after, limits, max_batch, |addr, _| f(addr))
}

const PROMPT: &str = "w5 w9 w14 w20 w33";

/// The ids `/v1/models` lists.
fn served_ids(addr: SocketAddr) -> Vec<String> {
    let (status, r) = request(addr, "GET", "/v1/models", "");
    assert_eq!(status, 200, "{r}");
    let data = r["data"].as_array().unwrap();
    data.iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// Serves `lm` with completions of `prompts` through `models` (greedy, 6 tokens) sent, and
/// queued, before the server starts taking them: each answer's text against `want` and its
/// `model` against `answered`, and at least one decoded in a batch of several; then `more`.
fn queued_together(
    lm: &mut LoadedModel,
    (prompts, models): (&[&str], &[&str]),
    want: &[String],
    answered: &[&str],
    more: impl FnOnce(SocketAddr),
) {
    let after = std::time::Duration::from_millis(500);
    serving_with(lm, after, limits(), 8, |addr| {
        let answers = sent_together(addr, prompts, models, 6);
        for (i, (status, r)) in answers.iter().enumerate() {
            assert_eq!(*status, 200, "{r}");
            let text = r["choices"][0]["text"].as_str().unwrap();
            assert_eq!(text, want[i], "request {i} ({})", models[i]);
            assert_eq!(r["model"], answered[i]);
        }
        let batches: Vec<u64> = answers
            .iter()
            .map(|(_, r)| r["petal"]["batch"].as_u64().unwrap())
            .collect();
        assert!(
            batches.iter().any(|&b| b > 1),
            "no request was batched: {batches:?}"
        );
        more(addr)
    })
}

/// Completions of `prompts` through `models` (greedy, `max_tokens`), sent at once from one
/// client thread each: the status and body of each.
fn sent_together(
    addr: SocketAddr,
    prompts: &[&str],
    models: &[&str],
    max_tokens: usize,
) -> Vec<(u16, Value)> {
    std::thread::scope(|s| {
        let clients: Vec<_> = prompts
            .iter()
            .zip(models)
            .map(|(prompt, model)| {
                s.spawn(move || {
                    let body = json!({"model": model, "prompt": prompt,
                                      "max_tokens": max_tokens, "temperature": 0});
                    request(addr, "POST", "/v1/completions", &body.to_string())
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    })
}

#[test]
fn each_request_is_served_through_the_adapter_its_model_field_names() {
    let mut lm = model_with(&[("q", "llama_lora_qv"), ("e", "llama_lora_embedding")]);
    // what each adapter generates alone (greedy, 8 tokens)
    let ids = lm.tokenizer.encode(PROMPT, true).unwrap();
    let p = SamplingParams {
        max_new_tokens: 8,
        ..Default::default()
    };
    let mut want = Vec::new();
    for active in [vec!["q"], vec!["e"], vec![]] {
        set_active(&mut lm.model, &active);
        want.push(
            generate(&lm.model, &lm.tokenizer, &ids, &p, &mut |_| {})
                .unwrap()
                .text,
        );
    }
    assert!(
        want[0] != want[1] && want[1] != want[2],
        "the adapters must differ: {want:?}"
    );
    set_active(&mut lm.model, &["q", "e"]); // what is active does not matter to the server
    serving(&mut lm, |addr| {
        for (model, want) in [
            ("q", &want[0]),
            ("e", &want[1]),
            ("tiny-llama", &want[2]),
            ("__base__", &want[2]),
        ] {
            let body = json!({"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0});
            let (status, r) = request(addr, "POST", "/v1/completions", &body.to_string());
            assert_eq!(status, 200, "{r}");
            assert_eq!(
                r["choices"][0]["text"].as_str().unwrap(),
                want,
                "model {model}"
            );
            assert_eq!(r["choices"][0]["finish_reason"], "length");
            assert_eq!(r["usage"]["prompt_tokens"], ids.len());
            assert_eq!(r["usage"]["completion_tokens"], 8);
            assert_eq!(r["object"], "text_completion");
        }
        assert_eq!(served_ids(addr), ["tiny-llama", "e", "q"]);
    });
}

#[test]
fn bad_requests_get_openai_style_errors_and_the_server_keeps_serving() {
    let mut lm = model_with(&[("q", "llama_lora_qv")]);
    serving(&mut lm, |addr| {
        let post = |body: &str| request(addr, "POST", "/v1/completions", body);
        let cases: [(&str, u16, &str); 10] = [
            (
                r#"{"model": "nope", "prompt": "w5"}"#,
                404,
                "model `nope` is not served (serving: tiny-llama, q)",
            ),
            (
                r#"{"model": "q", "prompt": }"#,
                400,
                "not JSON: expected value at line 1 column 26",
            ),
            (r#"{"model": "q"}"#, 400, "`prompt` is required"),
            (
                r#"{"prompt": "w5", "stream": "yes"}"#,
                400,
                "`stream` must be true or false",
            ),
            (
                r#"{"prompt": "w5", "max_tokens": -2}"#,
                400,
                "`max_tokens` must be a whole number",
            ),
            (
                r#"{"prompt": "w5", "stop": 3}"#,
                400,
                "`stop` must be a string or a list",
            ),
            (
                r#"{"prompt": "w5", "stop": ["", "w6"]}"#,
                400,
                "`stop` holds an empty string",
            ),
            (r#"[1, 2]"#, 400, "must be a JSON object"),
            // above the server's --max-tokens (256 here), and an out-of-range field
            (
                r#"{"prompt": "w5", "max_tokens": 1000000000}"#,
                400,
                "`max_tokens` 1000000000 is above this server's limit of 256",
            ),
            (
                r#"{"prompt": "w5", "top_p": 2}"#,
                400,
                "`top_p` must be in (0, 1]",
            ),
        ];
        for (body, status, msg) in cases {
            let (got, r) = post(body);
            assert_eq!(got, status, "{body}: {r}");
            let m = r["error"]["message"].as_str().unwrap();
            assert!(m.contains(msg), "{body}: {m}");
            assert_eq!(r["error"]["code"], status);
        }
        let long = vec!["w5"; 70].join(" "); // the tiny model's context is 64
        let (got, r) = post(&json!({"prompt": long}).to_string());
        assert_eq!(got, 400);
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("context is 64"),
            "{r}"
        );
        let (got, _) = request(addr, "GET", "/v1/completions", "");
        assert_eq!(got, 405);
        let (got, _) = request(addr, "GET", "/v2/else", "");
        assert_eq!(got, 404);
        let (got, r) = post(r#"{"model": "q", "prompt": "w5", "max_tokens": 2, "stop": ["w"]}"#);
        assert_eq!(got, 200, "{r}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    });
}

/// An adapter acting on every row (prompt tuning: virtual tokens ahead of every prompt) is
/// served alone: requests waiting together are decoded as one batch, each through it as
/// `generate` gives with it active, under its name or the model's id; the base model is not
/// served. Beside another adapter it is refused before serving.
#[test]
fn an_adapter_acting_on_every_row_is_served_alone_and_refused_beside_others() {
    let mut lm = model_with(&[("p", "llama_prompt_tuning")]);
    let prompts = ["w5 w9 w14 w20 w33", "w7 w7", "w60 w8 w3 w90"];
    let models = ["p", "tiny-llama", "p"];
    let p = SamplingParams {
        max_new_tokens: 6,
        ..Default::default()
    };
    let text = |lm: &LoadedModel, prompt: &str| {
        let ids = lm.tokenizer.encode(prompt, true).unwrap();
        generate(&lm.model, &lm.tokenizer, &ids, &p, &mut |_| {})
            .unwrap()
            .text
    };
    let want: Vec<String> = prompts.iter().map(|q| text(&lm, q)).collect();
    let base = model_with(&[]);
    assert_ne!(
        text(&base, prompts[0]),
        want[0],
        "the adapter must change the text"
    );
    // answered as `p`, the adapter every request went through
    let answered = ["p"; 3];
    queued_together(&mut lm, (&prompts, &models), &want, &answered, |addr| {
        let body = json!({"model": "__base__", "prompt": "w5", "max_tokens": 2});
        let (status, e) = request(addr, "POST", "/v1/completions", &body.to_string());
        assert_eq!(status, 400, "{e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains("`p` acts on every request"), "{msg}");
        assert_eq!(served_ids(addr), ["tiny-llama", "p"]);
    });
    let mut lm = model_with(&[("p", "llama_prompt_tuning"), ("q", "llama_lora_qv")]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let served = Served {
        model: &mut lm.model,
        tokenizer: &lm.tokenizer,
        model_id: "tiny".into(),
        max_batch: 8,
        max_tokens: 256,
        adapter_dir: None,
    };
    let e = served
        .serve(listener, limits(), Stop::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`p`") && e.contains("beside other adapters (q)"),
        "{e}"
    );
}

#[test]
fn requests_waiting_together_are_generated_as_one_batch_with_each_adapter_s_output() {
    let mut lm = model_with(&[("q", "llama_lora_qv"), ("e", "llama_lora_embedding")]);
    let prompts = ["w5 w9 w14 w20 w33", "w7 w7", "w60 w8 w3 w90"];
    let models = ["q", "tiny-llama", "e"];
    let mut want = Vec::new();
    for (prompt, model) in prompts.iter().zip(models) {
        let active: &[&str] = if model == "tiny-llama" { &[] } else { &[model] };
        set_active(&mut lm.model, active);
        let ids = lm.tokenizer.encode(prompt, true).unwrap();
        let p = SamplingParams {
            max_new_tokens: 6,
            ..Default::default()
        };
        want.push(
            generate(&lm.model, &lm.tokenizer, &ids, &p, &mut |_| {})
                .unwrap()
                .text,
        );
    }
    queued_together(&mut lm, (&prompts, &models), &want, &models, |_| {});
}

#[test]
fn a_streamed_completion_sends_the_same_text_as_server_sent_events_then_done() {
    let mut lm = model_with(&[("q", "llama_lora_qv")]);
    serving(&mut lm, |addr| {
        let body = json!({"model": "q", "prompt": PROMPT, "max_tokens": 7, "temperature": 0});
        let (_, whole) = request(addr, "POST", "/v1/completions", &body.to_string());
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let events = stream_events(addr, "/v1/completions", &streamed.to_string());
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert!(chunks.len() >= 3, "{events:?}");
        let text: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["usage"]["completion_tokens"], 7);
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null()));
        assert!(chunks
            .iter()
            .all(|c| c["model"] == "q" && c["object"] == "text_completion"));
    });
}

#[test]
fn metrics_count_requests_tokens_adapters_and_latencies_in_prometheus_text() {
    let mut lm = model_with(&[("q", "llama_lora_qv")]);
    serving(&mut lm, |addr| {
        let mut prompt_tokens = 0;
        let (mut generated, mut cached) = (0, 0);
        // the third finds the first's prompt in the prefix cache
        for model in ["q", "tiny-llama", "q"] {
            let body = json!({"model": model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0});
            let (status, r) = request(addr, "POST", "/v1/completions", &body.to_string());
            assert_eq!(status, 200, "{r}");
            prompt_tokens += r["usage"]["prompt_tokens"].as_u64().unwrap();
            generated += r["usage"]["completion_tokens"].as_u64().unwrap();
            cached += r["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
        }
        assert!(cached > 0);
        let (status, _) = request(addr, "POST", "/v1/completions", r#"{"prompt": 5}"#);
        assert_eq!(status, 400);
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: petal\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        let value = |line: &str| -> f64 {
            body.lines()
                .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no `{line}` in\n{body}"))
        };
        assert_eq!(value(r#"petal_requests_total{code="200"}"#), 3.0);
        assert_eq!(value(r#"petal_requests_total{code="400"}"#), 1.0);
        assert_eq!(value(r#"petal_lora_requests_total{adapter="q"}"#), 2.0);
        assert_eq!(
            value(r#"petal_lora_requests_total{adapter="__base__"}"#),
            1.0
        );
        assert_eq!(value("petal_prompt_tokens_total"), prompt_tokens as f64);
        assert_eq!(value("petal_generation_tokens_total"), generated as f64);
        assert_eq!(value("petal_prefix_cache_hits_total"), cached as f64);
        assert_eq!(
            value(r#"petal_request_success_total{finished_reason="length"}"#),
            3.0
        );
        assert_eq!(value("petal_time_to_first_token_seconds_count"), 3.0);
        assert_eq!(value("petal_e2e_request_latency_seconds_count"), 3.0);
        assert!(value("petal_e2e_request_latency_seconds_sum") > 0.0);
        assert_eq!(value("petal_num_requests_running"), 0.0);
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
    });
}
