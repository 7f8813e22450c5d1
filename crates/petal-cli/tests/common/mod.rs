//! What the CLI tests share: the tiny golden models, running the `petal` binary, a data file.

#![allow(dead_code)] // each test binary uses some of these

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

pub fn petal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_petal"))
        .args(args)
        .output()
        .unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `petal merge` of `adapter` onto `model` into `out`.
pub fn merge(model: &Path, adapter: &Path, out: &Path) -> Output {
    petal(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

pub fn words(dir: &Path) -> PathBuf {
    let p = dir.join("w.txt");
    let text: Vec<String> = (0..600).map(|i| format!("w{}", (i * 7) % 96)).collect();
    std::fs::write(&p, text.join(" ")).unwrap();
    p
}

pub fn train<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--val-fraction",
        "0.1",
        "--out",
        out,
    ]
}

/// A JSON file read back.
pub fn json_file(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// `petal eval --json` of `model` on `data`, sequences of 16, with `extra` flags.
pub fn eval(model: &str, data: &Path, extra: &[&str]) -> Output {
    let args = [
        "eval",
        "--model",
        model,
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "16",
        "--json",
    ];
    petal(&[&args[..], extra].concat())
}

/// The `loss` of a `--json` summary.
pub fn json_loss(o: &Output) -> f64 {
    serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["loss"]
        .as_f64()
        .unwrap()
}
