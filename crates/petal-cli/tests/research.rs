//! The research methods through the CLI on the tiny golden Llama: a mixture on multi-task data,
//! KS-Lottery's three stages.

mod common;

use common::{eval, golden, json_file, json_loss, merge, petal, stderr, train, words};

/// Multi-task data through a mixture: `--task-sampling balanced`, per-task losses before and
/// after (the JSON summary) and at each evaluation (metrics.jsonl), the router's load per step,
/// and the trained MoLoRA refused by `petal merge`, nothing written.
#[test]
fn a_mixture_trains_on_multi_task_data_with_per_task_losses_and_router_load() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("mt.jsonl");
    let lines: Vec<String> = (0..60)
        .map(|i| {
            let task = ["alpha", "beta", "gamma"][usize::from(i >= 40) + usize::from(i >= 52)];
            let text: Vec<String> = (0..12)
                .map(|j| format!("w{}", (i * 7 + j * 3) % 96))
                .collect();
            serde_json::json!({"text": text.join(" "), "task": task}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let val = d.path().join("val.jsonl");
    std::fs::write(
        &val,
        [&lines[..3], &lines[40..43], &lines[52..55]]
            .concat()
            .join("\n"),
    )
    .unwrap();
    let out = d.path().join("run");
    let m = golden().join("llama");
    let args = train(
        m.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let extra = [
        "--method",
        "molora",
        "--task-sampling",
        "balanced",
        "--val-data",
        val.to_str().unwrap(),
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--json",
    ];
    let o = petal(&[&args[..], &extra].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let tasks = sum["eval_after"]["tasks"].as_object().unwrap();
    assert_eq!(tasks.keys().collect::<Vec<_>>(), ["alpha", "beta", "gamma"]);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps[1]["eval_tasks"].as_object().unwrap().len(), 3);
    let load = steps[0]["router"]["load"].as_array().unwrap();
    assert_eq!(load.len(), 10, "MoLoRA's ten experts");
    let total: f64 = load.iter().map(|v| v.as_f64().unwrap()).sum();
    assert!(
        (total - 1.0).abs() < 1e-4,
        "soft gates sum to one per token: {total}"
    );
    let merged = d.path().join("m");
    let o = merge(&m, &out.join("adapter"), &merged);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot be merged"), "{}", stderr(&o));
    assert!(!merged.exists());
}

/// KS-Lottery's three stages in one run: the whole embedding for half the steps, the KS test
/// choosing the top 5 rows, then those rows alone from their pretrained values; the saved
/// adapter is those five rows (the tickets in its config and in tickets.json, ordered by KS
/// statistic), and loaded again it scores the validation set as the trained model did.
#[test]
fn ks_lottery_chooses_its_tickets_and_saves_only_their_rows() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let out = d.path().join("run");
    let m = golden().join("llama");
    let val: Vec<String> = (0..200).map(|i| format!("w{}", (i * 11) % 96)).collect();
    let vfile = d.path().join("val.txt");
    std::fs::write(&vfile, val.join(" ")).unwrap();
    let args = train(
        m.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let extra = [
        "--method",
        "ks_lottery",
        "--set",
        "top_k=5",
        "--max-steps",
        "6",
        "--lr",
        "0.05",
        "--val-data",
        vfile.to_str().unwrap(),
        "--json",
    ];
    let o = petal(&[&args[..], &extra].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let adapter = out.join("adapter");
    let cfg = json_file(&adapter.join("adapter_config.json"));
    assert_eq!(cfg["stage1_steps"], 3, "half the run");
    let tickets: Vec<u64> = cfg["tickets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(tickets.len(), 5);
    let listed = json_file(&adapter.join("tickets.json"));
    let stats: Vec<f64> = listed["tickets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["ks_statistic"].as_f64().unwrap())
        .collect();
    assert!(
        stats.windows(2).all(|w| w[0] >= w[1]) && stats[4] > 0.0,
        "{stats:?}"
    );
    let w = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(w.len(), 1, "{:?}", w.keys());
    assert_eq!(
        w.values().next().unwrap().dims()[0],
        5,
        "the tickets' rows only"
    );
    // the saved form scores the validation set as the trained model did
    let loss_with = |extra: &[&str]| {
        let o = eval(m.to_str().unwrap(), &vfile, extra);
        assert!(o.status.success(), "{}", stderr(&o));
        json_loss(&o)
    };
    let (base, tuned) = (
        loss_with(&[]),
        loss_with(&["--adapter", adapter.to_str().unwrap()]),
    );
    assert!(
        (base - tuned).abs() > 1e-6,
        "the tickets' rows change the model"
    );
    let trained = sum["eval_after"]["loss"].as_f64().unwrap();
    assert!(
        (tuned - trained).abs() < 1e-5 * trained,
        "saved {tuned} vs trained {trained}"
    );
}

/// PaLoRA on two tasks: the tasks taken from the data (sorted) into the saved config, each
/// preference a different model (`--preference` on eval), a merge at a preference scoring as
/// the unmerged adapter at it, and the bad inputs refused naming the key.
#[test]
fn palora_trains_on_two_tasks_and_each_preference_is_a_model_that_merges() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("mt.jsonl");
    let lines: Vec<String> = (0..40)
        .map(|i| {
            let (task, step) = if i % 2 == 0 {
                ("poems", 3)
            } else {
                ("math", 5)
            };
            let text: Vec<String> = (0..12)
                .map(|j| format!("w{}", (i * 7 + j * step) % 96))
                .collect();
            serde_json::json!({"text": text.join(" "), "task": task}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let val = d.path().join("val.jsonl");
    std::fs::write(&val, lines[..6].join("\n")).unwrap();
    let out = d.path().join("run");
    let m = golden().join("llama");
    let (ms, ds, os) = (
        m.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let args = train(ms, ds, os);
    let extra = [
        "--method",
        "palora",
        "--task-sampling",
        "balanced",
        "--max-steps",
        "3",
        "--lr",
        "0.01",
        "--set",
        "init_weights=false",
    ];
    let o = petal(&[&args[..], &extra].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let adapter = out.join("adapter");
    let cfg: serde_json::Value = json_file(&adapter.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "PALORA");
    assert_eq!(cfg["tasks"], serde_json::json!(["math", "poems"]));
    let a = adapter.to_str().unwrap();
    let run = |model: &str, extra: &[&str]| {
        let o = eval(model, &val, extra);
        (o.status.success(), o)
    };
    let (ok1, first) = run(ms, &["--adapter", a, "--preference", "1,0"]);
    let (ok2, second) = run(ms, &["--adapter", a, "--preference", "0,1"]);
    assert!(ok1 && ok2, "{}{}", stderr(&first), stderr(&second));
    let (l1, l2) = (json_loss(&first), json_loss(&second));
    assert!(
        (l1 - l2).abs() > 1e-6,
        "two preferences, one model: {l1} {l2}"
    );
    // merged at a preference: the same model as the adapter at it
    let merged = d.path().join("merged");
    let o = petal(&[
        "merge",
        "--model",
        ms,
        "--adapter",
        adapter.to_str().unwrap(),
        "--preference",
        "1,0",
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (ok, o) = run(merged.to_str().unwrap(), &[]);
    assert!(ok, "{}", stderr(&o));
    assert!(
        (json_loss(&o) - l1).abs() < 1e-5 * l1,
        "merged {} vs {l1}",
        json_loss(&o)
    );
    // bad input: a preference off the simplex, a listed task missing from the data
    let (ok, o) = run(ms, &["--adapter", a, "--preference", "0.5,0.6"]);
    assert!(!ok && stderr(&o).contains("`preference`"), "{}", stderr(&o));
    let (ok, o) = run(ms, &["--preference", "0.5,0.5"]);
    assert!(
        !ok && stderr(&o).contains("no PaLoRA adapter"),
        "{}",
        stderr(&o)
    );
    let out2 = d.path().join("run2");
    let args = train(ms, ds, out2.to_str().unwrap());
    let o = petal(
        &[
            &args[..],
            &["--method", "palora", "--set", "tasks=math,code"],
        ]
        .concat(),
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("\"code\" is not in the training data"),
        "{}",
        stderr(&o)
    );
}

/// E2VPT-style prompts with pruning in one run: half the prompt tokens pruned after half the
/// steps (pruning.json says which), the saved adapter holding the kept tokens alone and scoring
/// the validation set as the trained model did; PASTA's merge refused naming the reason.
#[test]
fn kv_prompts_prune_rewind_and_save_the_kept_tokens() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let val = d.path().join("val.txt");
    let text: Vec<String> = (0..80).map(|i| format!("w{}", (i * 11) % 96)).collect();
    std::fs::write(&val, text.join(" ")).unwrap();
    let m = golden().join("llama");
    let (ms, ds) = (m.to_str().unwrap(), data.to_str().unwrap());
    let out = d.path().join("run");
    let args = train(ms, ds, out.to_str().unwrap());
    let extra = [
        "--method",
        "kv_prompt",
        "--set",
        "num_virtual_tokens=4",
        "--set",
        "num_kv_tokens=3",
        "--set",
        "segments=4",
        "--max-steps",
        "4",
        "--lr",
        "0.05",
        "--val-data",
        val.to_str().unwrap(),
        "--json",
    ];
    let o = petal(&[&args[..], &extra].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let adapter = out.join("adapter");
    let report: serde_json::Value = json_file(&adapter.join("pruning.json"));
    assert_eq!(report["pruned_after_step"], 2, "half the run by default");
    assert_eq!(report["kept_tokens"].as_array().unwrap().len(), 2);
    let cfg: serde_json::Value = json_file(&adapter.join("adapter_config.json"));
    assert_eq!(
        (
            cfg["num_virtual_tokens"].as_u64(),
            cfg["prune_step"].as_u64()
        ),
        (Some(2), Some(0))
    );
    let o = eval(ms, &val, &["--adapter", adapter.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let saved = json_loss(&o);
    let trained = sum["eval_after"]["loss"].as_f64().unwrap();
    assert!(
        (saved - trained).abs() < 1e-5 * trained,
        "saved {saved} vs trained {trained}"
    );
    // PASTA cannot merge: the refusal says why
    let out2 = d.path().join("pasta");
    let o = petal(
        &[
            &train(ms, ds, out2.to_str().unwrap())[..],
            &["--method", "pasta", "--max-steps", "1"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = merge(&m, &out2.join("adapter"), &d.path().join("merged"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("PASTA"), "{}", stderr(&o));
}
