//! Resource caps and values that point at the wrong place, each refused in one line naming
//! what is wrong, with nothing written: an adapter too large for the machine, an `--out` that
//! cannot be written, a config value of the wrong type, a checkpoint claiming another step.

mod common;

use common::{golden, petal, stderr, train, words};

/// The golden LoRA adapter copied to `dir` with option `key` set to `value`.
fn adapter_with(dir: &std::path::Path, key: &str, value: serde_json::Value) -> std::path::PathBuf {
    let src = golden().join("adapters/llama_lora_qv");
    let dst = dir.join(format!("adapter_{key}"));
    std::fs::create_dir_all(&dst).unwrap();
    let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg[key] = value;
    std::fs::write(dst.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dst.join("adapter_model.safetensors"),
    )
    .unwrap();
    dst
}

fn one_line_error(o: &std::process::Output, must: &[&str]) {
    assert!(!o.status.success(), "must fail");
    let e = stderr(o);
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
    for m in must {
        assert!(e.contains(m), "`{m}` in: {e}");
    }
}

#[test]
fn an_adapter_too_large_for_the_memory_limit_is_refused_before_allocation() {
    let d = tempfile::tempdir().unwrap();
    let model = golden().join("llama");
    let big = adapter_with(d.path(), "r", 1_000_000_000u64.into());
    let gen = |extra: &[&str]| {
        let mut a = vec!["generate", "--model", model.to_str().unwrap()];
        a.extend_from_slice(&["--adapter", big.to_str().unwrap(), "--prompt", "w1"]);
        a.extend_from_slice(extra);
        petal(&a)
    };
    let o = gen(&[]);
    one_line_error(&o, &["r = 1000000000", "would need", "--max-memory"]);
    // an explicit limit is the one named
    let o = gen(&["--max-memory", "64K"]);
    one_line_error(&o, &["over the limit of 64.0 KB (--max-memory)"]);
    let o = gen(&["--max-memory", "lots"]);
    assert!(!o.status.success() && stderr(&o).contains("not a size"));
    // training counts gradients and optimizer state too
    let data = words(d.path());
    let out = d.path().join("run");
    let mut args = train(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    args.extend_from_slice(&["--r", "1000000000"]);
    let o = petal(&args);
    one_line_error(
        &o,
        &["r = 1000000000", "with its gradients and optimizer state"],
    );
    assert!(!out.join("adapter").exists(), "nothing trained or saved");
    // and a batch whose activations cannot fit, before any step
    args.truncate(args.len() - 2);
    let at = args.iter().position(|a| *a == "--batch-size").unwrap();
    args[at + 1] = "100000"; // a micro-batch of every example, about 33 of 16 tokens
    args.extend_from_slice(&["--max-memory", "256K"]);
    let o = petal(&args);
    one_line_error(
        &o,
        &[
            "sequences of up to 16 tokens",
            "activations need at least",
            "--max-memory",
        ],
    );
    assert!(!out.join("adapter").exists(), "nothing trained or saved");
}

#[test]
fn an_out_path_that_cannot_be_written_is_named_before_the_model_loads() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("a_file");
    std::fs::write(&file, "x").unwrap();
    let under = file.join("run");
    // a model that does not exist: the --out check must come first
    let o = petal(&[
        "train",
        "--model",
        "/nonexistent",
        "--data",
        "/nonexistent.jsonl",
        "--out",
        under.to_str().unwrap(),
    ]);
    one_line_error(&o, &["--out", "a_file is a file, not a folder"]);
    let adapter = golden().join("adapters/llama_lora_qv");
    let o = petal(&[
        "merge",
        "--model",
        "/nonexistent",
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        under.to_str().unwrap(),
    ]);
    one_line_error(&o, &["--out", "not a folder"]);
}

#[test]
fn a_config_value_of_the_wrong_type_names_its_key() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let toml = d.path().join("run.toml");
    std::fs::write(&toml, "batch_size = \"four\"\n").unwrap();
    let run = |c: &std::path::Path| {
        petal(&[
            "train",
            "--config",
            c.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
    };
    one_line_error(
        &run(&toml),
        &["run.toml: field `batch_size`", "expected usize"],
    );
    std::fs::write(&toml, "[lora]\nr = \"eight\"\n").unwrap();
    one_line_error(&run(&toml), &["field `r`", "expected usize"]);
    // a file that is not TOML at all: its line, in one line
    std::fs::write(&toml, "seed = 1\n[lora\n").unwrap();
    one_line_error(&run(&toml), &["run.toml:2: not valid TOML"]);
    // and in an adapter file
    let bad = adapter_with(d.path(), "lora_alpha", "sixteen".into());
    let o = petal(&[
        "generate",
        "--model",
        golden().join("llama").to_str().unwrap(),
        "--adapter",
        bad.to_str().unwrap(),
        "--prompt",
        "w1",
    ]);
    one_line_error(&o, &["field `lora_alpha`", "adapter_config.json"]);
}

#[test]
fn a_checkpoint_claiming_another_step_is_refused_and_nothing_is_overwritten() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let out = d.path().join("run");
    let model = golden().join("llama");
    let base = train(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let mut args = base.clone();
    args.extend_from_slice(&["--max-steps", "2", "--save-every", "1"]);
    assert!(petal(&args).status.success());
    let adapter = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let metrics = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let ck = out.join("checkpoints/step-000002");
    let state = ck.join("trainer_state.json");
    let mut s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    s["step"] = 999_999.into();
    std::fs::write(&state, s.to_string()).unwrap();
    let resume = |from: &std::path::Path| {
        let mut a = args.clone();
        a.extend_from_slice(&["--resume", from.to_str().unwrap()]);
        petal(&a)
    };
    let o = resume(&ck);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("field `step` is 999999, but the checkpoint folder is step 2"),
        "{e}"
    );
    // the same state in a folder of another name: past --max-steps
    let moved = out.join("checkpoints/copied");
    std::fs::rename(&ck, &moved).unwrap();
    let e = stderr(&resume(&moved));
    assert!(e.contains("at step 999999, past --max-steps 2"), "{e}");
    let after = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(after == adapter, "the trained adapter is kept");
    assert!(std::fs::read(out.join("metrics.jsonl")).unwrap() == metrics);
}

#[test]
fn an_adapter_tensor_of_integers_is_refused_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let dir = adapter_with(d.path(), "lora_dropout", 0.0.into());
    let file = dir.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let key = t
        .keys()
        .filter(|k| k.contains("lora_A"))
        .min()
        .unwrap()
        .clone();
    let ints = t[&key].to_dtype(candle_core::DType::I64).unwrap();
    t.insert(key.clone(), ints);
    candle_core::safetensors::save(&t, &file).unwrap();
    let o = petal(&[
        "generate",
        "--model",
        golden().join("llama").to_str().unwrap(),
        "--adapter",
        dir.to_str().unwrap(),
        "--prompt",
        "w1",
    ]);
    one_line_error(&o, &[&key, "is I64, but it holds floating-point values"]);
}
