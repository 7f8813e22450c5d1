//! `--task-type seq-cls` through the CLI on the tiny random BERT saved as a plain BertModel (as
//! all-MiniLM-L6-v2 ships): training with named labels (the head trained as modules_to_save,
//! the labels' mapping saved), evaluation by accuracy and macro-F1, and the bad inputs refused
//! with a one-line cause.

mod common;

use common::{cls_data as data, golden, json_file, petal, stderr};

#[test]
fn a_classifier_trains_saves_its_labels_and_evaluates_by_accuracy_and_macro_f1() {
    let d = tempfile::tempdir().unwrap();
    let (train, val) = data(d.path());
    let model = golden().join("bert_minilm_names");
    let m = model.to_str().unwrap();
    let out = d.path().join("run");
    let o = petal(&[
        "train",
        "--task-type",
        "seq-cls",
        "--model",
        m,
        "--data",
        &train,
        "--val-data",
        &val,
        "--max-steps",
        "30",
        "--lr",
        "0.01",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (before, after) = (&sum["eval_before"], &sum["eval_after"]);
    assert!(
        after["loss"].as_f64().unwrap() < before["loss"].as_f64().unwrap(),
        "{sum}"
    );
    let adapter = out.join("adapter");
    let cfg: serde_json::Value = json_file(&adapter.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["target_modules"], "all-linear", "LoRA's default");
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
    let labels: serde_json::Value = json_file(&adapter.join("labels.json"));
    assert_eq!(labels["names"], serde_json::json!(["neg", "pos"]));
    let eval = |data: &str| {
        petal(&[
            "eval",
            "--task-type",
            "seq-cls",
            "--model",
            m,
            "--adapter",
            adapter.to_str().unwrap(),
            "--data",
            data,
            "--json",
        ])
    };
    let o = eval(&val);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["examples"], 16);
    for k in ["accuracy", "macro_f1"] {
        let v = r[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k}: {v}");
        assert!(
            (v - after[k].as_f64().unwrap()).abs() < 1e-12,
            "{k}: as trained"
        );
    }
    // a label outside the saved classes, named with its line
    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"the cat\", \"label\": \"maybe\"}\n").unwrap();
    let o = eval(bad.to_str().unwrap());
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("bad.jsonl:1:") && e.contains("\"maybe\" is not one of the classes (neg, pos)"),
        "{e}"
    );
}

#[test]
fn bad_classification_input_is_refused_with_its_cause() {
    let d = tempfile::tempdir().unwrap();
    let (train, _) = data(d.path());
    let bert = golden().join("bert_minilm_names");
    let llama = golden().join("llama");
    let run = |model: &std::path::Path, data: &str, extra: &[&str]| {
        let out = d.path().join("r");
        let mut a = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data,
            "--max-steps",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--overwrite",
            "true",
        ];
        a.extend(extra);
        let o = petal(&a);
        assert!(!o.status.success(), "{a:?} succeeded");
        stderr(&o)
    };
    let e = run(&llama, &train, &["--task-type", "seq-cls"]);
    assert!(e.contains("model_type") && e.contains("`llama`"), "{e}");
    let e = run(&bert, &train, &["--task-type", "regression"]);
    assert!(e.contains("--task-type \"regression\""), "{e}");
    let e = run(&bert, &train, &["--task-type", "seq-cls", "--pack", "true"]);
    assert!(e.contains("--pack") && e.contains("one label"), "{e}");
    let mixed = d.path().join("mixed.jsonl");
    std::fs::write(
        &mixed,
        "{\"text\": \"a cat\", \"label\": 1}\n{\"text\": \"a dog\", \"label\": \"pos\"}\n",
    )
    .unwrap();
    let e = run(&bert, mixed.to_str().unwrap(), &["--task-type", "seq-cls"]);
    assert!(e.contains("whole numbers 0..C-1 or all strings"), "{e}");
    let nolabel = d.path().join("nolabel.jsonl");
    std::fs::write(&nolabel, "{\"text\": \"a cat\"}\n").unwrap();
    let e = run(
        &bert,
        nolabel.to_str().unwrap(),
        &["--task-type", "seq-cls"],
    );
    assert!(
        e.contains("nolabel.jsonl:1:") && e.contains("`label` is missing"),
        "{e}"
    );
    // a label that would size a head of 4e9 rows
    let huge = d.path().join("huge.jsonl");
    let lines =
        "{\"text\": \"a cat\", \"label\": 4000000000}\n{\"text\": \"a dog\", \"label\": 0}\n";
    std::fs::write(&huge, lines).unwrap();
    let e = run(&bert, huge.to_str().unwrap(), &["--task-type", "seq-cls"]);
    assert!(
        e.contains("huge.jsonl") && e.contains("label 4000000000 is out of range"),
        "{e}"
    );
    // and a saved labels.json claiming as many classes
    let warm = d.path().join("warm");
    std::fs::create_dir(&warm).unwrap();
    std::fs::write(warm.join("labels.json"), "{\"count\": 4000000000}").unwrap();
    let w = warm.to_str().unwrap();
    let e = run(
        &bert,
        &train,
        &["--task-type", "seq-cls", "--init-adapter", w],
    );
    assert!(
        e.contains("labels.json") && e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn a_warm_start_keeps_the_adapters_weights_and_classes_whatever_labels_the_data_holds() {
    // a federated client: its data holds one class only; from the global adapter it keeps both
    // classes (the head's shape) and starts from the adapter's weights
    let d = tempfile::tempdir().unwrap();
    let (train, val) = data(d.path());
    let model = golden().join("bert_minilm_names");
    let m = model.to_str().unwrap();
    // `petal train` of the classifier on `data`, from `init` when given
    let train_on = |data: &str, steps: &str, out: &str, init: Option<&std::path::Path>| {
        let out = d.path().join(out);
        let mut args = vec![
            "train",
            "--task-type",
            "seq-cls",
            "--model",
            m,
            "--data",
            data,
            "--val-data",
            &val,
            "--max-steps",
            steps,
            "--lr",
            "0.01",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ];
        if let Some(i) = init {
            args.extend(["--init-adapter", i.to_str().unwrap()]);
        }
        (petal(&args), out.join("adapter"))
    };
    let run = |data: &str, steps: &str, out: &str, init: Option<&std::path::Path>| {
        let (o, adapter) = train_on(data, steps, out, init);
        assert!(o.status.success(), "{}", stderr(&o));
        let sum: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (adapter, sum)
    };
    let (global, trained) = run(&train, "20", "global", None);
    let one_class = d.path().join("pos.jsonl");
    let pos: Vec<String> = std::fs::read_to_string(&train)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"pos\""))
        .map(String::from)
        .collect();
    std::fs::write(&one_class, pos.join("\n")).unwrap();
    let (client, warm) = run(one_class.to_str().unwrap(), "0", "client", Some(&global));
    assert_eq!(
        warm["eval_before"]["loss"], trained["eval_after"]["loss"],
        "the warm start begins where the global adapter ended"
    );
    let labels: serde_json::Value = json_file(&client.join("labels.json"));
    assert_eq!(labels["names"], serde_json::json!(["neg", "pos"]));
    // without the warm start the same data makes a one-class head, which the held-out data's
    // other class does not fit
    let (o, _) = train_on(one_class.to_str().unwrap(), "0", "cold", None);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is not one of the classes (pos)"),
        "{}",
        stderr(&o)
    );
}
