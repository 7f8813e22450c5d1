//! Bad values and bad tensors refused before any work, naming the flag or tensor.

mod common;

use common::{golden, petal, stderr, words};

#[test]
fn out_of_range_training_values_are_refused_before_any_work_naming_the_flag() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let out = d.path().join("run");
    let cases: [(&str, &str); 11] = [
        ("--alpha", "NaN"),
        ("--alpha", "0"),
        ("--dropout", "1"),
        ("--batch-size", "0"),
        ("--grad-accum", "0"),
        ("--seq-len", "1"),
        ("--lr", "-1"),
        ("--lr", "NaN"),
        ("--max-grad-norm", "-1"),
        ("--weight-decay", "inf"),
        ("--val-fraction", "2"),
    ];
    for (flag, bad) in cases {
        let arg = format!("{flag}={bad}");
        let o = petal(&[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            &arg,
        ]);
        assert!(!o.status.success(), "{arg} must fail");
        let e = stderr(&o);
        assert!(
            e.contains(flag) && e.contains("out of range") && e.lines().count() == 1,
            "{arg}: {e}"
        );
        assert!(!out.exists(), "{arg}: nothing written");
    }
    let c = d.path().join("run.toml");
    std::fs::write(&c, "batch_size = 0\n").unwrap();
    let o = petal(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--config",
        c.to_str().unwrap(),
    ]);
    assert!(
        stderr(&o).contains("--batch-size 0 is out of range"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_adapter_with_nan_weights_is_refused_naming_the_tensor_unless_allowed_and_generation_stops() {
    let d = tempfile::tempdir().unwrap();
    let src = golden().join("adapters/llama_lora_qv");
    let bad = d.path().join("nan_adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let file = src.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let key = t
        .keys()
        .filter(|k| k.contains("lora_B"))
        .min()
        .unwrap()
        .clone();
    let dims = t[&key].dims().to_vec();
    let n: usize = dims.iter().product();
    let mut v = vec![0.5f32; n];
    v[n / 2] = f32::NAN;
    t.insert(
        key.clone(),
        candle_core::Tensor::from_vec(v, dims, &candle_core::Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, bad.join("adapter_model.safetensors")).unwrap();
    let model = golden().join("llama");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            bad.to_str().unwrap(),
            "--prompt",
            "w5 w9",
            "--max-new-tokens",
            "3",
        ];
        args.extend(extra);
        petal(&args)
    };
    let o = run(&[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(&key) && e.contains("NaN") && e.contains("--allow-nonfinite"),
        "{e}"
    );
    let o = run(&["--allow-nonfinite"]);
    assert!(
        !o.status.success(),
        "generation must not print text from NaN logits"
    );
    let e = stderr(&o);
    assert!(e.contains("warning") && e.contains(&key), "{e}");
    assert!(e.contains("non-finite logit"), "{e}");
}

#[test]
fn out_of_range_sampling_values_are_refused_before_the_model_loads_naming_the_flag() {
    let cases: [(&str, &str); 8] = [
        ("--stop", ""),
        ("--temperature", "-1"),
        ("--temperature", "NaN"),
        ("--top-p", "0"),
        ("--top-p", "2"),
        ("--top-k", "0"),
        ("--repetition-penalty", "0"),
        ("--max-new-tokens", "0"),
    ];
    for (flag, bad) in cases {
        let arg = format!("{flag}={bad}");
        // a model that does not exist: the check must come first
        let o = petal(&["generate", "--model", "/nonexistent", "--prompt", "x", &arg]);
        assert!(!o.status.success(), "{arg} must fail");
        let e = stderr(&o);
        assert!(e.contains(flag) && e.contains("out of range"), "{arg}: {e}");
    }
}

#[test]
fn counts_of_the_other_commands_are_refused_before_any_work_naming_the_flag() {
    let eval = [
        "eval",
        "--model",
        "/nonexistent",
        "--data",
        "/nonexistent.jsonl",
    ];
    let serve = ["serve", "--model", "/nonexistent"];
    let bench = ["bench", "--workload", "synthetic-35m"];
    let cases: [(&[&str], &str, &str); 10] = [
        (&bench, "--threads", "0"),
        (&bench, "--prompt-fraction", "1"),
        (&bench, "--prompt-fraction", "-0.5"),
        (&bench, "--seq", "100000000"), // past its context of 2048
        (&eval, "--batch-size", "0"),
        (&eval, "--seq-len", "1"),
        (&serve, "--max-batch", "0"),
        (&serve, "--max-loras", "0"),
        (&["bench", "--workload", "synthetic-35m"], "--rounds", "0"),
        (&["bench", "--workload", "synthetic-35m"], "--steps", "0"),
    ];
    for (cmd, flag, bad) in cases {
        let arg = format!("{flag}={bad}");
        let mut args = cmd.to_vec();
        args.push(&arg);
        let o = petal(&args);
        assert!(!o.status.success(), "{arg} must fail");
        let e = stderr(&o);
        assert!(
            e.contains(flag) && e.contains("out of range") && e.lines().count() == 1,
            "{} {arg}: {e}",
            cmd[0]
        );
    }
}

#[test]
fn serve_refuses_an_adapter_dir_that_is_not_a_folder_before_loading_the_model() {
    let o = petal(&[
        "serve",
        "--model",
        "/nonexistent",
        "--adapter-dir",
        "/nonexistent-dir",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--adapter-dir /nonexistent-dir: not a folder") && e.lines().count() == 1,
        "{e}"
    );
}

#[test]
fn research_method_options_out_of_range_are_refused_naming_the_option_and_write_nothing() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let model = golden().join("llama"); // q (32, 32), v (16, 32): 3,072 weights over 2 layers
    let out = d.path().join("run");
    let cases: [(&[&str], &str); 12] = [
        (&["--method", "ks_lottery"], "target_modules"),
        (
            &["--method", "ks_lottery", "--set", "max_p_value=0"],
            "max_p_value",
        ),
        (
            &["--method", "molora", "--set", "num_experts=0"],
            "num_experts",
        ),
        (
            &["--method", "mov", "--set", "num_experts=0"],
            "num_experts",
        ),
        (&["--method", "sira", "--set", "top_k=0"], "top_k"),
        (
            &[
                "--method",
                "sira",
                "--set",
                "num_experts=2",
                "--set",
                "top_k=3",
            ],
            "top_k",
        ),
        (&["--method", "rosa", "--set", "d=0"], "d"),
        (&["--method", "fish", "--set", "density=1.5"], "density"),
        (
            &["--method", "quanta", "--set", "per_dim_features=2,2,2"],
            "per_dim_features",
        ),
        (&["--method", "intrinsic", "--set", "d=5000"], "d"),
        (
            &[
                "--method",
                "intrinsic",
                "--set",
                "projection=dense",
                "--set",
                "max_dense_values=1000",
            ],
            "projection",
        ),
        (&["--method", "rosa", "--set", "schedule=wl64"], "schedule"),
    ];
    for (flags, key) in cases {
        let mut args = common::train(
            model.to_str().unwrap(),
            data.to_str().unwrap(),
            out.to_str().unwrap(),
        );
        args.extend(["--max-steps", "3", "--target-modules", "q_proj,v_proj"]);
        args.extend(flags);
        let o = petal(&args);
        assert!(!o.status.success(), "{flags:?} must fail");
        let e = stderr(&o);
        let line = e.lines().last().unwrap_or("");
        assert!(
            line.contains(key) && line.starts_with("error"),
            "{flags:?}: {e}"
        );
        assert!(!out.exists(), "{flags:?}: nothing written");
    }
}

#[test]
fn a_saved_sparse_mask_that_does_not_fit_the_model_is_refused_naming_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let model = golden().join("llama");
    for (method, set, key) in [
        ("fish", "fisher_samples=2", "fish_indices"),
        ("rosa", "schedule=wl1", "rosa_spa.col_idx"),
    ] {
        let out = d.path().join(method);
        let mut args = common::train(
            model.to_str().unwrap(),
            data.to_str().unwrap(),
            out.to_str().unwrap(),
        );
        args.extend([
            "--max-steps",
            "4",
            "--method",
            method,
            "--set",
            set,
            "--set",
        ]);
        args.push(if method == "fish" {
            "density=0.05"
        } else {
            "d=0.05"
        });
        let o = petal(&args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let adapter = out.join("adapter");
        let file = adapter.join("adapter_model.safetensors");
        let mut t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
        let k = t.keys().find(|k| k.ends_with(key)).unwrap().clone();
        let n = t[&k].elem_count();
        // a position past every targeted weight, or a column past the module's input
        let v: Vec<i64> = (0..n as i64).map(|i| 1_000_000 + i).collect();
        t.insert(
            k.clone(),
            candle_core::Tensor::from_vec(v, n, &candle_core::Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&t, &file).unwrap();
        let o = petal(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt",
            "w5 w9",
            "--max-new-tokens",
            "2",
        ]);
        assert!(!o.status.success(), "{method}: a bad mask must be refused");
        let e = stderr(&o);
        assert!(
            e.contains(key) && e.contains("adapter_model.safetensors"),
            "{method}: {e}"
        );
    }
}

#[test]
fn quantized_dtype_misuse_is_refused_in_one_line_naming_the_cause() {
    let d = tempfile::tempdir().unwrap();
    let model = golden().join("llama");
    let m = model.to_str().unwrap();
    // a safetensors folder has no blocks to keep
    let o = petal(&[
        "generate",
        "--model",
        m,
        "--dtype",
        "quantized",
        "--prompt",
        "hi",
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("--dtype quantized") && e.contains("safetensors"),
        "{e}"
    );
    // merging rewrites weights that would stay quantized
    let out = d.path().join("merged");
    let adapter = golden().join("adapters/llama_lora_qv");
    let o = petal(&[
        "merge",
        "--model",
        m,
        "--dtype",
        "quantized",
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("--dtype quantized") && e.lines().count() == 1,
        "{e}"
    );
    assert!(!out.exists(), "nothing written");
    // an unknown dtype names the choices
    let o = petal(&["generate", "--model", m, "--dtype", "q4", "--prompt", "hi"]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("quantized") && e.contains("bf16"),
        "{e}"
    );
}

#[test]
fn quantize_requests_that_cannot_be_met_are_refused_in_one_line_naming_the_cause() {
    // rows that are not whole blocks name the tensor; unknown, unimplemented and
    // contradictory requests name the flag
    let model = golden().join("llama");
    let m = model.to_str().unwrap();
    let cases: [(&[&str], &[&str]); 4] = [
        (&["--quantize", "q8_0"], &["down_proj", "48", "q8_0"]),
        (&["--quantize", "q4"], &["--quantize", "q4_k"]),
        (&["--quantize", "nf4"], &["nf4", "q_proj", "32", "64"]),
        (
            &["--quantize", "q8_0", "--dtype", "quantized"],
            &["--quantize", "--dtype quantized"],
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["generate", "--model", m, "--prompt", "hi"];
        args.extend_from_slice(flags);
        let o = petal(&args);
        let e = stderr(&o);
        assert!(
            !o.status.success() && e.lines().count() == 1,
            "{flags:?}: {e}"
        );
        assert!(want.iter().all(|w| e.contains(w)), "{flags:?}: {e}");
    }
}

#[test]
fn gguf_exports_and_quantization_aware_methods_refuse_what_they_cannot_do_in_one_line() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.gguf");
    let o_ = out.to_str().unwrap();
    let qwen = golden().join("qwen2.gguf");
    let llama = golden().join("llama");
    let lora = golden().join("adapters/qwen2_lora_all_linear");
    let dora = golden().join("adapters/llama_dora");
    let (pissa, loftq) = (
        golden().join("adapters/llama_pissa"),
        golden().join("adapters/llama_loftq4"),
    );
    let (pissa_, loftq_) = (pissa.to_str().unwrap(), loftq.to_str().unwrap());
    let (q, l) = (qwen.to_str().unwrap(), llama.to_str().unwrap());
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        // llama.cpp has no NF4: the GGUF types are named
        (
            vec![
                "merge",
                "--model",
                q,
                "--format",
                "gguf",
                "--quantize",
                "nf4",
                "--out",
                o_,
            ],
            &["nf4", "q8_0", "NF4"],
        ),
        (
            vec!["merge", "--model", q, "--format", "onnx", "--out", o_],
            &["onnx", "hf, gguf"],
        ),
        // a DoRA adapter has no llama.cpp form
        (
            vec![
                "export",
                "--model",
                l,
                "--adapter",
                dora.to_str().unwrap(),
                "--out",
                o_,
            ],
            &["DoRA"],
        ),
        // nor does an adapter whose base is not the model's W (PiSSA's residual, LoftQ's Q)
        (
            vec!["export", "--model", l, "--adapter", pissa_, "--out", o_],
            &["PiSSA", "--save-as-lora", "merge"],
        ),
        (
            vec!["export", "--model", l, "--adapter", loftq_, "--out", o_],
            &["LoftQ", "petal merge --format gguf"],
        ),
        // a model file is not an adapter
        (
            vec!["generate", "--model", q, "--adapter", q, "--prompt", "hi"],
            &["not a LoRA adapter", "general.type"],
        ),
    ];
    for (args, want) in cases {
        let o = petal(&args);
        let e = stderr(&o);
        assert!(
            !o.status.success() && e.trim().lines().count() == 1,
            "{args:?}: {e}"
        );
        assert!(want.iter().all(|w| e.contains(w)), "{args:?}: {e}");
        assert!(!out.exists(), "{args:?}: nothing written");
    }
    let _ = lora;
    // L4Q's bits out of range name the option and the range
    let data = words(d.path());
    let run = d.path().join("run");
    let mut args = common::train(l, data.to_str().unwrap(), run.to_str().unwrap());
    args.extend(["--max-steps", "3", "--method", "l4q", "--set", "bits=9"]);
    let o = petal(&args);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("bits") && e.contains("2..=8"),
        "{e}"
    );
    assert!(!run.exists(), "nothing written");
}

#[test]
fn a_model_config_with_fewer_layers_than_its_weights_is_refused_naming_the_field() {
    let d = tempfile::tempdir().unwrap();
    let src = golden().join("llama");
    common::copy_dir(&src, d.path());
    let cfg = d.path().join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    c["num_hidden_layers"] = 1.into(); // the weights hold layers 0 and 1
    std::fs::write(&cfg, c.to_string()).unwrap();
    let o = petal(&["inspect", "--model", d.path().to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("num_hidden_layers")
            && e.contains("weights hold layer 1")
            && e.lines().count() == 1,
        "{e}"
    );
}

#[test]
fn a_chat_turn_that_cannot_be_answered_is_dropped_and_the_session_goes_on() {
    let d = tempfile::tempdir().unwrap();
    common::copy_dir(&golden().join("llama"), d.path());
    let tc = d.path().join("tokenizer_config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&tc).unwrap()).unwrap();
    c["chat_template"] = "{% for m in messages %}{{ m.content }} {% endfor %}".into();
    std::fs::write(&tc, c.to_string()).unwrap();
    // a turn past the context of 64, a line that is not UTF-8, then one that fits
    let mut input = format!("{}\n", "w5 ".repeat(100)).into_bytes();
    input.extend_from_slice(b"w\xff\n");
    input.extend_from_slice(b"w3\n");
    let mut p = std::process::Command::new(env!("CARGO_BIN_EXE_petal"))
        .args([
            "chat",
            "--model",
            d.path().to_str().unwrap(),
            "--max-new-tokens",
            "3",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    p.stdin.take().unwrap().write_all(&input).unwrap();
    let o = p.wait_with_output().unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("this turn was not answered") && e.contains("not UTF-8"),
        "{e}"
    );
    let answers = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        answers.lines().count(),
        1,
        "the last turn is answered: {answers:?}"
    );
}
