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

/// A copy of the files of folder `from` (not its subfolders) in `to`, made if missing.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
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

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The python of a venv under target/ (`name`) with `requirements` (a file under tools/)
/// installed, made on first use (once for the tests of one binary that run side by side);
/// None, having said why, where none can be made (no python3, PyPI unreachable): the caller
/// skips.
pub fn venv(name: &str, requirements: &str) -> Option<PathBuf> {
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    match make_venv(name, requirements) {
        Ok(p) => Some(p),
        Err(why) => {
            petal_ops::testing::skip_missing_tool(&format!("no venv with {requirements} ({why})"));
            None
        }
    }
}

fn make_venv(name: &str, requirements: &str) -> Result<PathBuf, String> {
    let dir = root().join("target").join(name);
    let python = dir.join("bin/python");
    let stamp = dir.join("installed");
    let req = root().join(requirements);
    let wanted = std::fs::read_to_string(&req).map_err(|e| e.to_string())?;
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(python);
    }
    let run = |c: &mut Command| -> Result<(), String> {
        let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{c:?}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q", "-r"])
        .arg(&req))?;
    std::fs::write(&stamp, wanted).map_err(|e| e.to_string())?;
    Ok(python)
}

/// Classification data on the tiny BERT fixture's vocabulary (`bert_minilm_names`): 64 training
/// and 16 held-out sentences of two classes ("neg", "pos") told apart by their words, a third of
/// them with a second text. Returns the two files' paths.
pub fn cls_data(dir: &std::path::Path) -> (String, String) {
    let vocab = json_file(&golden().join("bert_minilm_names/tokenizer.json"));
    let mut words: Vec<&str> = vocab["model"]["vocab"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .filter(|w| w.chars().all(|c| c.is_ascii_lowercase()))
        .collect();
    words.sort();
    let line = |i: usize| {
        let lab = i % 2;
        let text: Vec<&str> = (0..4)
            .map(|j| words[lab * 20 + (i * 7 + j * 3) % 20])
            .collect();
        let label = ["neg", "pos"][lab];
        let mut row = serde_json::json!({"text": text.join(" "), "label": label});
        if i % 3 == 0 {
            row["text_pair"] = words[(i * 5) % words.len()].into();
        }
        row.to_string()
    };
    let train = dir.join("train.jsonl");
    let val = dir.join("val.jsonl");
    let rows: Vec<String> = (0..80).map(line).collect();
    std::fs::write(&train, rows[..64].join("\n")).unwrap();
    std::fs::write(&val, rows[64..].join("\n")).unwrap();
    (
        train.to_str().unwrap().to_string(),
        val.to_str().unwrap().to_string(),
    )
}
