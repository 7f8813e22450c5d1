//! The `petal` binary on the tiny golden models: the parity hook, config files, and bad input
//! (a one-line cause, a non-zero exit, nothing overwritten).

mod common;

use common::{golden, merge, petal, stderr, train, words};
use std::path::Path;
use std::process::{Command, Output};

/// `petal forward` on the golden Llama with the PEFT `llama_lora_qv` adapter and the golden
/// input ids, logits to `out`, with `extra` flags.
fn forward_llama_lora_qv(out: &Path, extra: &[&str]) -> Output {
    let (model, adapter) = (
        golden().join("llama"),
        golden().join("adapters/llama_lora_qv"),
    );
    let mut args = vec![
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--input-ids",
        "1,5,9,14,20,33,2,71;7,7,3,90,45,12,60,8",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    petal(&args)
}

/// transformers + PEFT's logits for a golden case.
fn golden_logits(key: &str) -> candle_core::Tensor {
    logits_at(&golden().join("logits.safetensors"), key)
}

/// The logits `petal forward` wrote.
fn logits_file(path: &Path) -> candle_core::Tensor {
    logits_at(path, "logits")
}

fn logits_at(path: &Path, key: &str) -> candle_core::Tensor {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .remove(key)
        .unwrap()
}

#[test]
fn forward_writes_the_logits_peft_computes_for_a_peft_adapter() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("l.safetensors");
    let o = forward_llama_lora_qv(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ours = logits_file(&out);
    let want = golden_logits("llama_lora_qv");
    assert!(petal_ops::testing::max_rel(&ours, &want) < 1e-4);
}

#[test]
fn forward_with_bf16_activations_tracks_peft_and_needs_bf16_weights() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("l.safetensors");
    let run = |dtype: &str| forward_llama_lora_qv(&out, &["--dtype", dtype, "--bf16-activations"]);
    let o = run("f32");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--bf16-activations needs --dtype bf16"),
        "{}",
        stderr(&o)
    );
    let o = run("bf16");
    assert!(o.status.success(), "{}", stderr(&o));
    let ours = logits_file(&out);
    let want = golden_logits("llama_lora_qv");
    // bf16 weights and activations: 8 significant bits (seen 5e-3)
    let e = petal_ops::testing::max_rel(&ours.to_dtype(candle_core::DType::F32).unwrap(), &want);
    assert!(e < 3e-2, "relative {e}");
}

#[test]
fn a_config_file_with_a_misspelt_key_is_refused_with_a_suggestion() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path().join("run.toml");
    std::fs::write(&c, "max_step = 3\n").unwrap();
    let o = petal(&["train", "--config", c.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("unknown key `max_step`") && e.contains("max_steps"),
        "{e}"
    );
}

#[test]
fn flags_override_the_config_file() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let out = d.path().join("run");
    let c = d.path().join("run.toml");
    std::fs::write(
        &c,
        format!(
            "model = {:?}\ndata = {:?}\nmax_steps = 50\nseq_len = 16\nout = {:?}\n",
            golden().join("llama"),
            data,
            out
        ),
    )
    .unwrap();
    let o = petal(&[
        "train",
        "--config",
        c.to_str().unwrap(),
        "--max-steps",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let n = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(n, 2);
}

#[test]
fn resuming_from_a_checkpoint_of_another_config_fails_and_overwrites_nothing() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let (m, dat) = (golden().join("llama"), data.to_str().unwrap().to_string());
    let out = d.path().join("run");
    let o = petal(
        &[
            &train(m.to_str().unwrap(), &dat, out.to_str().unwrap())[..],
            &["--max-steps", "2", "--save-every", "1"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let o = petal(
        &[
            &train(m.to_str().unwrap(), &dat, out.to_str().unwrap())[..],
            &[
                "--max-steps",
                "4",
                "--r",
                "2",
                "--resume",
                out.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("another model or config (differs in: adapter:"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);
    // and a second run into the same folder without --resume is refused
    let o = petal(
        &[
            &train(m.to_str().unwrap(), &dat, out.to_str().unwrap())[..],
            &["--max-steps", "2"],
        ]
        .concat(),
    );
    assert!(
        !o.status.success() && stderr(&o).contains("--resume"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_diverging_run_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let out = d.path().join("run");
    let m = golden().join("llama");
    let args = train(
        m.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let o = petal(
        &[
            &args[..],
            &[
                "--max-steps",
                "6",
                "--save-every",
                "1",
                "--lr",
                "1e30",
                "--max-grad-norm",
                "0",
                "--schedule",
                "constant",
            ],
        ]
        .concat(),
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    let last = e.lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: loss is NaN") || last.starts_with("error: loss is inf"),
        "{e}"
    );
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    let good: usize = latest.trim().trim_start_matches("step-").parse().unwrap();
    assert!(good >= 1 && good < 6, "latest {latest}");
    let state = std::fs::read_to_string(
        out.join("checkpoints")
            .join(latest.trim())
            .join("trainer_state.json"),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert!(v["last_loss"].as_f64().unwrap().is_finite());
}

#[test]
fn malformed_training_data_names_the_file_and_line_and_exits_non_zero() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"w3 w4\"}\n{\"text\": oops}\n").unwrap();
    let m = golden().join("llama");
    let o = petal(&train(
        m.to_str().unwrap(),
        bad.to_str().unwrap(),
        d.path().join("r").to_str().unwrap(),
    ));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad.jsonl:2"), "{}", stderr(&o));
}

#[test]
fn prompt_tuning_trains_and_merging_it_is_refused_with_a_reason() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let out = d.path().join("run");
    let m = golden().join("llama");
    let args = train(
        m.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let o = petal(
        &[
            &args[..],
            &[
                "--method",
                "prompt_tuning",
                "--num-virtual-tokens",
                "3",
                "--max-steps",
                "2",
            ],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = merge(&m, &out.join("adapter"), &d.path().join("m"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot be merged"), "{}", stderr(&o));
}

/// The losses a run logged, step by step.
fn logged_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

/// The five logged losses of `petal train` on the golden llama with `method` and `env`.
fn five_step_losses(
    dir: &Path,
    tag: &str,
    method: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> Vec<f64> {
    let data = words(dir);
    let model = golden().join("llama");
    let out = dir.join(format!("run-{tag}"));
    let (m, t, o) = (
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let mut args = train(m, t, o);
    args.extend(["--max-steps", "5", "--lr", "0.05"]);
    args.extend(method);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_petal"));
    cmd.args(&args).envs(env.iter().copied());
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    logged_losses(&out)
}

/// Both five-step curves move, and agree within 1e-4 (relative).
fn same_curves(method: &[&str], a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), 5);
    // the loss must move, or equal curves prove nothing
    assert!((a[0] - a[4]).abs() > 1e-3, "{method:?}: {a:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-4 * x.abs(), "{method:?}: {a:?} vs {b:?}");
    }
}

#[test]
fn training_through_candles_composed_ops_follows_the_fused_kernels_loss_curve() {
    // PETAL_FUSED=0 is the path a GPU takes: each fused CPU kernel's composed form, in lean
    // graph nodes; LoRA (one node for x, A, B), DoRA (that node, then its scaling), OFT (the
    // block rotation node), RoAd (the pair rotation node), VeRA (LoRA's node with A and B
    // scaled by its vectors) and LoHa (x (W + dW)^T in one product)
    let d = tempfile::tempdir().unwrap();
    let curve = |fused: &str, i: usize, method: &[&str]| {
        let env = [("PETAL_FUSED", std::ffi::OsStr::new(fused))];
        five_step_losses(d.path(), &format!("{fused}-{i}"), method, &env)
    };
    let lora = ["--r", "4", "--alpha", "8", "--target-modules", "all-linear"];
    let dora = [&lora[..], &["--dora", "true"]].concat();
    let methods: [&[&str]; 6] = [
        &lora,
        &dora,
        &["--method", "oft", "--oft-block-size", "8"],
        &[
            "--method",
            "road",
            "--road-variant",
            "road_4",
            "--group-size",
            "16",
        ],
        &[
            "--method",
            "vera",
            "--r",
            "4",
            "--target-modules",
            "all-linear",
        ],
        &[
            "--method",
            "loha",
            "--r",
            "4",
            "--target-modules",
            "all-linear",
        ],
    ];
    for (i, method) in methods.iter().enumerate() {
        same_curves(method, &curve("1", i, method), &curve("0", i, method));
    }
}

#[test]
fn training_through_the_emulated_cuda_kernels_follows_the_fused_kernels_loss_curve() {
    // petal's CUDA kernels (RMSNorm, RoPE and attention with grouped heads and a prefix,
    // SwiGLU, head loss) built for the CPU by tools/cuda_emu and run on CPU tensors through
    // the launches a GPU would get
    let gpp = Command::new("g++").arg("-dumpversion").output().ok();
    let major = gpp.and_then(|o| {
        let v = String::from_utf8_lossy(&o.stdout).to_string();
        v.split('.').next()?.trim().parse::<u32>().ok()
    });
    if !major.is_some_and(|m| m >= 11) {
        petal_ops::testing::skip_missing_tool(
            "no g++ 11 or later (C++20) to build the emulated kernels",
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let modules = d.path().join("modules");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/cuda_emu/build_modules.sh");
    let built = Command::new("bash")
        .arg(&script)
        .arg(&modules)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", stderr(&built));
    let curve = |emulated: bool, i: usize, method: &[&str]| {
        let on = [
            ("PETAL_CUDA_EMULATE", modules.as_os_str()),
            ("PETAL_CUDA_KERNELS", std::ffi::OsStr::new("1")),
        ];
        let env: &[_] = if emulated { &on } else { &[] };
        five_step_losses(d.path(), &format!("emu-{emulated}-{i}"), method, env)
    };
    let methods: [&[&str]; 2] = [
        &["--r", "4", "--alpha", "8", "--target-modules", "all-linear"],
        &["--method", "prefix_tuning", "--num-virtual-tokens", "3"],
    ];
    for (i, method) in methods.iter().enumerate() {
        same_curves(method, &curve(false, i, method), &curve(true, i, method));
    }
}

#[test]
fn forward_with_adapter_names_writes_peft_s_mixed_adapter_batch_logits() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("l.safetensors");
    let g = golden();
    let (model, a, b, c) = (
        g.join("qwen2"),
        format!("a={}", g.join("adapters/qwen2_lora_all_linear").display()),
        format!("b={}", g.join("adapters/qwen2_lora_second").display()),
        format!(
            "c={}",
            g.join("adapters/qwen2_lora_embedding_tied").display()
        ),
    );
    let ids = logits_at(&g.join("mixed_batch.safetensors"), "input_ids");
    let rows: Vec<String> = ids
        .to_vec2::<i64>()
        .unwrap()
        .iter()
        .map(|r| {
            r.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let ids = rows.join(";");
    #[rustfmt::skip]
    let o = petal(&["forward", "--model", model.to_str().unwrap(), "--adapter", &a, "--adapter", &b,
        "--adapter", &c, "--input-ids", &ids, "--adapter-names", "a,__base__,b,c,a",
        "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = logits_at(&g.join("mixed_batch.safetensors"), "qwen2_mixed");
    let e = petal_ops::testing::max_rel(&logits_file(&out), &want);
    assert!(e < 1e-4, "relative error {e:e}");
    // one name too few: refused, naming both counts
    #[rustfmt::skip]
    let o = petal(&["forward", "--model", model.to_str().unwrap(), "--adapter", &a, "--input-ids", &ids,
        "--adapter-names", "a,a,a,a", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("4 adapter names for a batch of 5 rows"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn serve_answers_completions_over_http_through_the_named_adapter() {
    use std::io::{BufRead, Read, Write};
    let g = golden();
    let adapter = format!("q={}", g.join("adapters/llama_lora_qv").display());
    /// Ends the server however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_petal"))
        .args([
            "serve",
            "--model",
            g.join("llama").to_str().unwrap(),
            "--adapter",
            &adapter,
        ])
        .args(["--port", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(Kill)
        .unwrap();
    // the first line names the address it listens on
    let mut line = String::new();
    let mut err = std::io::BufReader::new(child.0.stderr.take().unwrap());
    err.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let body = r#"{"model": "q", "prompt": "w5 w9", "max_tokens": 3, "temperature": 0}"#;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    // the base model under its folder's name, not the server's path to it
    let mut m = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        m,
        "GET /v1/models HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut models = String::new();
    m.read_to_string(&mut models).unwrap();
    let models: serde_json::Value =
        serde_json::from_str(models.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(models["data"][0]["id"], "llama", "{models}");
    assert_eq!(models["data"][1]["parent"], "llama", "{models}");
    // SIGTERM: a clean stop
    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.0.wait().unwrap();
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(
        status.success() && rest.contains("stopped"),
        "{status:?}: {rest}"
    );
    drop(child);
    assert!(
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    let json: serde_json::Value =
        serde_json::from_str(resp.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(json["model"], "q");
    assert_eq!(json["usage"]["completion_tokens"], 3);
    assert_eq!(
        json["choices"][0]["text"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        3
    );
}
