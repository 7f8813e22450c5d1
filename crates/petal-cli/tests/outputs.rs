//! Outputs never take the place of what petal did not write: `--out` on an input, on a
//! folder holding other files, or on a file is refused and leaves them as they were; a run
//! resumed without `--out` continues in its own folder; flags win over a run file's table.

mod common;

use common::{copy_dir, golden, json_file, merge, petal, stderr, train, words};
use std::path::Path;

/// Every file under `dir` with its bytes, to compare before and after.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = walk(dir)
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        match e.file_type().unwrap().is_dir() {
            true => out.extend(walk(&e.path())),
            false => out.push(e.path()),
        }
    }
    out
}

#[test]
fn merge_quantize_and_export_refuse_an_out_that_holds_an_input_or_other_files() {
    let d = tempfile::tempdir().unwrap();
    let m = golden().join("llama");
    let adapter = d.path().join("adapter");
    let src = golden().join("adapters/llama_lora_qv");
    copy_dir(&src, &adapter);
    let kept = snapshot(&adapter);
    // the adapter itself, and a folder holding it
    for out in [adapter.clone(), d.path().to_path_buf()] {
        let o = merge(&m, &adapter, &out);
        assert!(!o.status.success(), "merge onto {}", out.display());
        assert!(stderr(&o).contains("input"), "{}", stderr(&o));
    }
    // a folder with a file of the user's
    let mine = d.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep").unwrap();
    let o = merge(&m, &adapter, &mine);
    let refused = |o: &std::process::Output, why: &str| {
        assert!(
            !o.status.success() && stderr(o).contains(why),
            "{}",
            stderr(o)
        );
    };
    refused(&o, "petal did not write");
    assert_eq!(std::fs::read(mine.join("notes.txt")).unwrap(), b"keep");
    // another model folder (the golden model's copy): not petal's output either
    let other = d.path().join("other_model");
    copy_dir(&m, &other);
    refused(&merge(&m, &adapter, &other), "petal did not write");
    // a file where a folder would go
    let file = d.path().join("f.txt");
    std::fs::write(&file, "keep").unwrap();
    let o = merge(&m, &adapter, &file);
    assert!(stderr(&o).contains("a file is there"), "{}", stderr(&o));
    let (ms, fs) = (m.to_str().unwrap(), file.to_str().unwrap());
    let q = [
        "quantize", "--model", ms, "--method", "rtn", "--group", "32", "--out", fs,
    ];
    let o = petal(&q);
    assert!(stderr(&o).contains("a file is there"), "{}", stderr(&o));
    assert!(!o.status.success());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // export over the adapter's own weights
    let weights = adapter.join("adapter_model.safetensors");
    let (a, w) = (adapter.to_str().unwrap(), weights.to_str().unwrap());
    let o = petal(&["export", "--model", ms, "--adapter", a, "--out", w]);
    assert!(
        !o.status.success() && stderr(&o).contains("input"),
        "{}",
        stderr(&o)
    );
    assert_eq!(snapshot(&adapter), kept, "the adapter is as it was");
    // an earlier merge is an output: merging again replaces it
    let merged = d.path().join("merged");
    for _ in 0..2 {
        let o = merge(&m, &adapter, &merged);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // but not with a file of the user's added to it; nor `.`, which names no folder
    std::fs::write(merged.join("notes.txt"), "keep").unwrap();
    refused(&merge(&m, &adapter, &merged), "notes.txt");
    refused(&merge(&m, &adapter, Path::new(".")), "own name");
}

#[test]
fn a_resumed_run_continues_in_its_own_folder_and_a_missing_one_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let (m, dat) = (golden().join("llama"), data.to_str().unwrap().to_string());
    let run = d.path().join("run");
    let args = train(m.to_str().unwrap(), &dat, run.to_str().unwrap());
    let o = petal(&[&args[..], &["--max-steps", "2"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let before = snapshot(&run);
    // a checkpoint that is not there: refused before anything is written
    let other = d.path().join("other");
    let (r, ot) = (run.to_str().unwrap(), other.to_str().unwrap());
    let o = petal(&[&args[..], &["--max-steps", "4", "--resume", ot]].concat());
    assert!(
        !o.status.success() && stderr(&o).contains("--resume"),
        "{}",
        stderr(&o)
    );
    assert_eq!(snapshot(&run), before, "the run folder is untouched");
    assert!(!other.exists());
    // --resume without --out: the resumed run's folder, even with the data named another way
    let mut rel = train(m.to_str().unwrap(), "w.txt", "");
    rel.truncate(rel.len() - 2); // no --out
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_petal"))
        .current_dir(d.path())
        .args([&rel[..], &["--max-steps", "4", "--resume", r]].concat())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let steps = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(steps.contains("\"step\":4"), "{steps}");
    assert!(
        !d.path().join("runs").exists(),
        "nothing went to runs/latest"
    );
    // a finished run whose checkpoints are gone still holds its adapter
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let args = train(m.to_str().unwrap(), &dat, r);
    let o = petal(&[&args[..], &["--max-steps", "2"]].concat());
    assert!(
        !o.status.success() && stderr(&o).contains("holds an adapter"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn flags_and_top_level_keys_win_over_the_method_table_and_a_run_toml_replays() {
    let d = tempfile::tempdir().unwrap();
    let data = words(d.path());
    let (m, dat) = (golden().join("llama"), data.to_str().unwrap().to_string());
    let run = d.path().join("run");
    let c = d.path().join("run.toml");
    std::fs::write(&c, "[lora]\nr = 8\n").unwrap();
    let args = train(m.to_str().unwrap(), &dat, run.to_str().unwrap());
    let cfg = ["--config", c.to_str().unwrap(), "--max-steps", "1"];
    let o = petal(&[&args[..], &cfg, &["--r", "4"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_file(&run.join("adapter/adapter_config.json"))["r"], 4);
    // a run's own run.toml (r at its top level and in [lora]) repeats it
    let again = d.path().join("again");
    let rt = run.join("run.toml");
    let o = petal(&[
        "train",
        "--config",
        rt.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        json_file(&again.join("adapter/adapter_config.json"))["r"],
        4
    );
    // a top-level key, like a flag, wins over the table
    std::fs::write(&c, "r = 2\n[lora]\nr = 8\n").unwrap();
    let o = petal(&[&args[..], &cfg, &["--overwrite", "true"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_file(&run.join("adapter/adapter_config.json"))["r"], 2);
}
