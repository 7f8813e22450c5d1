//! Adapters loaded and unloaded while `petal serve` runs (`--adapter-dir`), over real sockets
//! on the tiny golden Llama with PEFT's golden adapters copied into a folder: vLLM's load and
//! unload endpoints, load on first use, what a loaded adapter computes (the same as the same
//! files attached at start), paths that lead out of the folder, the caps, least-recently-used
//! eviction, pinned adapters, and the endpoints' absence without the folder.

use petal_io::LoadedModel;
use petal_serve::adapters::AdapterDir;
use petal_serve::Limits;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

mod common;
use common::{golden, request};

/// The tiny model with PEFT's q/v LoRA attached at start as `pinned`.
fn model() -> LoadedModel {
    let mut lm = common::tiny_llama();
    let qv = golden().join("adapters/llama_lora_qv");
    petal_io::attach_adapter(&mut lm.model, &qv, "pinned").unwrap();
    lm
}

fn copy(from: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(golden().join("adapters").join(from).join(f), to.join(f)).unwrap();
    }
}

fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    request(addr, "POST", path, &body.to_string())
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn served(addr: SocketAddr) -> Vec<(String, Value)> {
    let (_, v) = request(addr, "GET", "/v1/models", "");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m["parent"].clone()))
        .collect()
}

/// Log-probabilities of a fixed prompt's tokens through `model` (a continuous fingerprint of
/// the adapter a request went through).
fn scores(addr: SocketAddr, model: &str) -> Vec<f64> {
    let body = json!({"model": model, "prompt": [5, 9, 14, 20, 33, 2], "echo": true,
                      "logprobs": 0, "max_tokens": 0});
    let (status, v) = post(addr, "/v1/completions", body);
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()[1..]
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

#[test]
fn adapters_load_on_request_and_on_first_use_unload_and_make_room_by_least_recent_use() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in ["qv", "qv2", "qv3"] {
        copy("llama_lora_qv", &d.join(name));
    }
    copy("llama_lora_embedding", &d.join("big")); // 16.7 kB of weights
    copy("llama_prompt_tuning", &d.join("prompt"));
    copy("llama_lora_qv", &d.join("wide"));
    let cfg = d.join("wide/adapter_config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["r"] = json!(128);
    std::fs::write(&cfg, c.to_string()).unwrap();
    let outside = tempfile::tempdir().unwrap();
    copy("llama_lora_qv", &outside.path().join("x"));
    std::os::unix::fs::symlink(outside.path().join("x"), d.join("escape")).unwrap();
    let adapter_dir = AdapterDir {
        dir: d.to_path_buf(),
        max_loras: 3,
        max_rank: 64,
        max_bytes: 10_000,
    };
    let mut lm = model();
    let limits = Limits {
        grace: Duration::from_secs(5),
        ..Limits::default()
    };
    common::serving_dir(
        &mut lm,
        Duration::ZERO,
        limits,
        8,
        Some(adapter_dir),
        |addr, _| {
            let load = |name: &str, path: &str| {
                post(
                    addr,
                    "/v1/load_lora_adapter",
                    json!({"lora_name": name, "lora_path": path}),
                )
            };
            let unload =
                |name: &str| post(addr, "/v1/unload_lora_adapter", json!({"lora_name": name}));
            let base = scores(addr, "tiny-llama");
            let pinned = scores(addr, "pinned");
            assert!(!close(&base, &pinned), "the adapter changes the scores");

            let (status, v) = load("a", "qv");
            assert_eq!(status, 200, "{v}");
            assert!(served(addr).contains(&("a".into(), json!("tiny-llama"))));
            // the same files loaded at run time compute what they do attached at start
            assert!(close(&scores(addr, "a"), &pinned));
            let (status, v) = load("a", "qv2");
            assert_eq!(status, 400);
            assert!(message(&v).contains("loaded already"), "{v}");

            // paths out of the folder, methods that act on every row, the caps
            for (path, want) in [
                ("../x", "not a folder inside"),
                ("escape", "not a folder inside"),
                ("/etc", "not a folder inside"),
                ("prompt", "acts on every row"),
                ("wide", "rank 128 is above this server's limit of 64"),
                ("big", "above this server's limit of 10000"),
            ] {
                let (status, v) = load("z", path);
                assert_eq!(status, 400, "{path}: {v}");
                assert!(message(&v).contains(want), "{path}: {v}");
                assert!(
                    !message(&v).contains(&d.display().to_string()),
                    "{v}: shows the server's paths"
                );
            }
            let (status, v) = load("../z", "qv");
            assert_eq!(status, 400);
            assert!(message(&v).contains("`lora_name`"), "{v}");

            // a request naming a sub-folder loads it first
            assert!(close(&scores(addr, "qv2"), &pinned));
            let names: Vec<String> = served(addr).into_iter().map(|m| m.0).collect();
            assert_eq!(names, ["tiny-llama", "a", "pinned", "qv2"]);
            // full (3 loaded): `a` is the least recently used, so it makes room for qv3
            scores(addr, "qv2");
            assert!(close(&scores(addr, "qv3"), &pinned));
            let names: Vec<String> = served(addr).into_iter().map(|m| m.0).collect();
            assert_eq!(names, ["tiny-llama", "pinned", "qv2", "qv3"]);
            let (status, v) = post(
                addr,
                "/v1/completions",
                json!({"model": "a", "prompt": "w5"}),
            );
            assert_eq!(status, 404, "{v}");

            let (status, v) = unload("pinned");
            assert_eq!(status, 400);
            assert!(message(&v).contains("pinned"), "{v}");
            let (status, _) = unload("a");
            assert_eq!(status, 404);
            let (status, v) = unload("qv3");
            assert_eq!(status, 200, "{v}");
            let names: Vec<String> = served(addr).into_iter().map(|m| m.0).collect();
            assert_eq!(names, ["tiny-llama", "pinned", "qv2"]);
            // a request with a body that is not an adapter's
            let (status, v) = post(addr, "/v1/load_lora_adapter", json!({"lora_name": "q"}));
            assert_eq!(status, 400);
            assert!(message(&v).contains("`lora_path`"), "{v}");
        },
    );
}

#[test]
fn without_an_adapter_dir_the_load_and_unload_endpoints_are_not_there() {
    let mut lm = model();
    common::serving(&mut lm, Duration::ZERO, Limits::default(), 8, |addr, _| {
        for path in ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"] {
            let (status, _) = post(addr, path, json!({"lora_name": "a", "lora_path": "a"}));
            assert_eq!(status, 404, "{path}");
        }
        // and a request naming an unknown adapter is a 404, as before
        let (status, _) = post(
            addr,
            "/v1/completions",
            json!({"model": "qv", "prompt": "w5"}),
        );
        assert_eq!(status, 404);
    });
}

#[test]
fn an_adapter_loaded_again_under_a_name_does_not_go_on_from_the_caches_of_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copy("llama_lora_qv", &d.join("qv"));
    copy("llama_rslora_all_linear", &d.join("rs"));
    let adapter_dir = AdapterDir {
        dir: d.to_path_buf(),
        max_loras: 4,
        max_rank: 64,
        max_bytes: 1 << 20,
    };
    let mut lm = model();
    common::serving_dir(
        &mut lm,
        Duration::ZERO,
        Limits::default(),
        8,
        Some(adapter_dir),
        |addr, _| {
            let load = |name: &str, path: &str| {
                let body = json!({"lora_name": name, "lora_path": path});
                assert_eq!(post(addr, "/v1/load_lora_adapter", body).0, 200);
            };
            // a greedy completion: its tokens' log-probabilities and the prompt tokens cached
            let complete = |model: &str| {
                let body = json!({"model": model, "prompt": [5, 9, 14, 20, 33, 2, 8],
                                  "max_tokens": 5, "temperature": 0, "logprobs": 0});
                let (status, v) = post(addr, "/v1/completions", body);
                assert_eq!(status, 200, "{v}");
                let lps: Vec<f64> = v["choices"][0]["logprobs"]["token_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                (
                    lps,
                    v["usage"]["prompt_tokens_details"]["cached_tokens"].clone(),
                )
            };
            load("x", "qv");
            let (qv, cached) = complete("x");
            assert_eq!(cached, 0);
            let (again, cached) = complete("x");
            assert_eq!(cached, 6, "the same prompt again: all but its last token");
            assert!(close(&again, &qv));
            let (status, v) = post(addr, "/v1/unload_lora_adapter", json!({"lora_name": "x"}));
            assert_eq!(status, 200, "{v}");
            load("x", "rs");
            let (rs, cached) = complete("x");
            assert_eq!(
                cached, 0,
                "what went through the adapter before is forgotten"
            );
            load("y", "rs");
            assert!(close(&rs, &complete("y").0));
            assert!(!close(&rs, &qv), "the two adapters must differ");
        },
    );
}
