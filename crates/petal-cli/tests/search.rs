//! The search driver (tools/search/search.py) on the real Optuna (pinned in
//! tools/search/requirements.txt, installed into target/venv-search on first use) over the
//! petal binary, on the tiny golden Llama: a study with the method as a parameter (a
//! conditional space) runs, prunes, writes its table, plots and a best config that trains;
//! started again it continues the study; a bad space is refused in one line. Skips, saying
//! why, where no venv can be made (no python3, PyPI unreachable).

mod common;
use common::{golden, root};
use std::path::{Path, PathBuf};
use std::process::Command;

fn search(python: &Path, space: &Path) -> std::process::Output {
    Command::new(python)
        .arg(root().join("tools/search/search.py"))
        .arg("--config")
        .arg(space)
        .arg("--petal")
        .arg(env!("CARGO_BIN_EXE_petal"))
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A study's space over the tiny model: `trials` finished trials, then `extra` lines.
fn space(d: &Path, trials: usize, extra: &str) -> PathBuf {
    let data = d.join("words.jsonl");
    let mut lines = String::new();
    for i in 0..120 {
        let words: Vec<String> = (0..16)
            .map(|j| format!("w{}", 3 + (i * 7 + j * 13) % 93))
            .collect();
        lines += &format!("{{\"text\": \"{}\"}}\n", words.join(" "));
    }
    std::fs::write(&data, lines).unwrap();
    let base = d.join("base.toml");
    std::fs::write(
        &base,
        format!(
            "model = \"{}\"\ndata = \"{}\"\nmethod = \"lora\"\nmax_steps = 9\neval_every = 3\n\
             seq_len = 16\nbatch_size = 2\nval_fraction = 0.1\nseed = 0\nr = 16\n",
            golden().join("llama").display(),
            data.display()
        ),
    )
    .unwrap();
    let p = d.join("space.toml");
    std::fs::write(
        &p,
        format!(
            "study = \"tiny\"\nstorage = \"sqlite:///{}\"\nout = \"{}\"\nbase = \"{}\"\n\
             trials = {trials}\nseed = 0\n{extra}",
            d.join("study.db").display(),
            d.join("out").display(),
            base.display()
        ),
    )
    .unwrap();
    p
}

const PARAMS: &str = "[params]\nlr = { low = 1e-4, high = 3e-2, log = true }\n\
    method = { choices = [\"lora\", \"ia3\", \"loha\"] }\n\
    [params.lora]\nr = { choices = [2, 4, 8] }\nlora_dropout = { low = 0.0, high = 0.1 }\n\
    [params.loha]\nr = { choices = [2, 4] }\n";

#[test]
fn a_study_over_methods_and_settings_runs_prunes_reports_and_continues_when_started_again() {
    let Some(python) = common::venv("venv-search", "tools/search/requirements.txt") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let o = search(&python, &space(d.path(), 6, PARAMS));
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    let out = d.path().join("out");
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    let rows = |t: &str, state: &str| {
        t.lines()
            .filter(|l| l.contains(&format!("| {state} |")))
            .count()
    };
    assert_eq!(
        rows(&table, "complete") + rows(&table, "pruned"),
        6,
        "{table}"
    );
    assert!(rows(&table, "complete") >= 1, "{table}");
    // the method is a parameter, and a method's options appear only on its trials
    assert!(
        table.contains("| method |") && table.contains("lora.r"),
        "{table}"
    );
    // a trial's rank is its own, not the base's top-level `r = 16` (the run's run.toml holds
    // the options it trained with)
    let lora_r = |text: &str| {
        let table = text.split("[lora]\n").nth(1)?;
        Some(
            table
                .lines()
                .find_map(|l| l.strip_prefix("r = "))?
                .trim()
                .to_string(),
        )
    };
    let mut checked = 0;
    for e in std::fs::read_dir(out.join("trials")).unwrap().flatten() {
        let Some(asked) = lora_r(&std::fs::read_to_string(e.path()).unwrap_or_default()) else {
            continue;
        };
        let run = std::fs::read_to_string(e.path().with_extension("").join("run.toml"));
        assert_eq!(lora_r(&run.unwrap()), Some(asked), "{}", e.path().display());
        checked += 1;
    }
    assert!(checked >= 1, "no LoRA trial to check");
    for svg in ["history.svg", "importance.svg"] {
        let s = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(s.contains("<svg"), "{svg}");
    }
    // the best trial as a runnable config
    let best = out.join("best.toml");
    let run = d.path().join("best-run");
    let o = common::petal(&[
        "train",
        "--config",
        best.to_str().unwrap(),
        "--max-steps",
        "2",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    // started again with a larger target: the same study goes on
    let o = search(&python, &space(d.path(), 9, PARAMS));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("6 of 9 trials finished"),
        "{}",
        text(&o.stdout)
    );
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert_eq!(
        rows(&table, "complete") + rows(&table, "pruned"),
        9,
        "{table}"
    );
}

#[test]
fn a_bad_space_or_storage_is_refused_in_one_line_naming_it() {
    let Some(python) = common::venv("venv-search", "tools/search/requirements.txt") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    for (extra, want) in [
        (
            "[params]\nlearning_rate = { low = 1e-4, high = 1e-2 }\n",
            "unknown parameter `learning_rate`",
        ),
        (
            "[params]\nlr = { low = 1e-2, high = 1e-4 }\n",
            "`lr`: the range [0.01, 0.0001] is empty",
        ),
        (
            "[params]\nmethod = { choices = [] }\n",
            "`method`: `choices` is empty",
        ),
        (
            "[params]\nlr = { low = \"a\", high = 1e-2 }\n",
            "`lr`: `low` and `high` must be numbers",
        ),
        (
            "[params]\nmethod = { choices = \"lora\" }\n",
            "`choices` must be a list",
        ),
        (
            "[params.lora]\nrank = { choices = [2] }\n",
            "unknown option `rank` of lora",
        ),
        (
            "[params]\nmethod = { choices = [\"nope\"] }\n",
            "unknown method `nope`",
        ),
    ] {
        let o = search(&python, &space(d.path(), 2, extra));
        assert_eq!(o.status.code(), Some(2), "{extra}: {}", text(&o.stderr));
        let e = text(&o.stderr);
        assert!(e.contains(want) && e.lines().count() == 1, "{extra}: {e}");
    }
    let p = space(d.path(), 2, PARAMS);
    let bad = std::fs::read_to_string(&p)
        .unwrap()
        .replace("sqlite:///", "sqlite:////nonexistent/dir/");
    std::fs::write(&p, bad).unwrap();
    let o = search(&python, &p);
    let e = text(&o.stderr);
    assert!(
        o.status.code() == Some(2) && e.contains("cannot be opened") && e.lines().count() == 1,
        "{e}"
    );
}
