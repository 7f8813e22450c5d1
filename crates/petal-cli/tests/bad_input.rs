//! Bad values and bad tensors refused before any work, naming the flag or tensor.

mod common;

use common::{golden, petal, stderr, words};

#[test]
fn out_of_range_training_values_are_refused_before_any_work_naming_the_flag() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let out = d.path().join("run");
    let cases: [(&str, &str); 9] = [
        ("--batch-size", "0"),
        ("--grad-accum", "0"),
        ("--max-steps", "0"),
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
    let cases: [(&str, &str); 7] = [
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
    let cases: [(&[&str], &str, &str); 5] = [
        (&eval, "--batch-size", "0"),
        (&eval, "--seq-len", "1"),
        (&serve, "--max-batch", "0"),
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
