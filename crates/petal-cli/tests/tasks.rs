//! `petal eval --task` on the tiny golden Llama: multiple-choice log-likelihoods, `acc` and
//! `acc_norm` against transformers scoring them as lm-evaluation-harness does
//! (tests/fixtures/golden/task_mc.*, tools/golden/make_task_fixture.py), batched or not;
//! generation scored by exact match after the extractor against `generate` run one prompt at a
//! time; and the task file's bad input.

mod common;
use common::{golden, petal, stderr};
use serde_json::Value;
use std::path::Path;

fn run(task: &Path, extra: &[&str]) -> (Value, Vec<Value>) {
    let d = tempfile::tempdir().unwrap();
    let samples = d.path().join("samples.jsonl");
    let model = golden().join("llama");
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--task",
        task.to_str().unwrap(),
        "--samples",
        samples.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = petal(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = serde_json::from_slice(&o.stdout).unwrap();
    let text = std::fs::read_to_string(samples).unwrap();
    let rows = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (report, rows)
}

/// Prompts of the generation tests (words of the golden Llama's vocabulary).
const PROMPTS: [&str; 7] = [
    "w5 w9",
    "w33 w7 w40",
    "w60 w8",
    "w3 w90 w45",
    "w71 w44",
    "w50 w51 w52",
    "w12 w2",
];

fn golden_lm() -> petal_io::LoadedModel {
    let model = golden().join("llama");
    let dev = candle_core::Device::Cpu;
    petal_io::load_model(model.to_str().unwrap(), candle_core::DType::F32, &dev).unwrap()
}

/// `lm`'s greedy continuation of `prompt` (`petal_serve::generate`, one prompt at a time,
/// itself checked against transformers) and its length in tokens.
fn greedy(
    lm: &petal_io::LoadedModel,
    prompt: &str,
    max_new_tokens: usize,
    stop: &[String],
) -> (String, usize) {
    let p = petal_serve::SamplingParams {
        max_new_tokens,
        stop: stop.to_vec(),
        ..Default::default()
    };
    let ids = lm.tokenizer.encode(prompt, false).unwrap();
    let g = petal_serve::generate(&lm.model, &lm.tokenizer, &ids, &p, &mut |_| {}).unwrap();
    (g.text, g.ids.len())
}

#[test]
fn multiple_choice_scores_equal_the_harness_way_computed_by_transformers_batched_or_not() {
    let task = golden().join("task_mc.jsonl");
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(golden().join("task_mc_scores.json")).unwrap(),
    )
    .unwrap();
    for batch in ["1", "5"] {
        let (report, rows) = run(&task, &["--batch-size", batch]);
        let scores = want["scores"].as_array().unwrap();
        assert_eq!(rows.len(), scores.len());
        for (i, (row, w)) in rows.iter().zip(scores).enumerate() {
            let got = row["loglikelihoods"].as_array().unwrap();
            let w = w.as_array().unwrap();
            assert_eq!(got.len(), w.len(), "example {i}");
            for (g, w) in got.iter().zip(w) {
                let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
                assert!(
                    (g - w).abs() < 1e-4,
                    "batch {batch}, example {i}: {g} vs {w}"
                );
            }
        }
        assert_eq!(report["accuracy"], want["acc"], "batch {batch}");
        assert_eq!(report["acc_norm"], want["acc_norm"], "batch {batch}");
        let tasks = report["tasks"].as_object().unwrap();
        assert_eq!(tasks.len(), 2, "{report}");
        let n: u64 = tasks
            .values()
            .map(|t| t["examples"].as_u64().unwrap())
            .sum();
        assert_eq!(n, 12);
    }
}

#[test]
fn input_side_adapters_score_choices_as_peft_does() {
    // prompt tuning's virtual tokens lead the hidden states of the prompt's pass (its choice's
    // first token was once read from the wrong position: up to 0.49 off); prefix tuning's
    // keys and values lead every layer's cache
    let task = golden().join("task_mc.jsonl");
    for name in ["llama_prompt_tuning", "llama_prefix_tuning"] {
        let want: Value = serde_json::from_str(
            &std::fs::read_to_string(golden().join(format!("task_mc_scores_{name}.json"))).unwrap(),
        )
        .unwrap();
        let adapter = golden().join("adapters").join(name);
        let (_, rows) = run(&task, &["--adapter", adapter.to_str().unwrap()]);
        let scores = want["scores"].as_array().unwrap();
        assert_eq!(rows.len(), scores.len(), "{name}: one row per example");
        for (i, (row, w)) in rows.iter().zip(scores).enumerate() {
            let got = row["loglikelihoods"].as_array().unwrap();
            let w = w.as_array().unwrap();
            assert_eq!(
                got.len(),
                w.len(),
                "{name}, example {i}: one score per choice"
            );
            for (g, w) in got.iter().zip(w) {
                let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
                assert!((g - w).abs() < 1e-4, "{name}, example {i}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn generation_is_scored_by_exact_match_after_the_extractor_and_unmatched_answers_are_counted() {
    // the references: half the model's own greedy continuation (`greedy`), half something else
    let lm = golden_lm();
    let prompts = &PROMPTS[..6];
    let d = tempfile::tempdir().unwrap();
    let task = d.path().join("gen.jsonl");
    let mut lines = String::new();
    let mut tokens = 0;
    for (i, prompt) in prompts.iter().enumerate() {
        let (text, n) = greedy(&lm, prompt, 4, &[]);
        tokens += n;
        let answer = if i % 2 == 0 {
            text
        } else {
            "w0 w0".to_string()
        };
        lines += &serde_json::json!({"prompt": prompt, "answer": answer}).to_string();
        lines.push('\n');
    }
    std::fs::write(&task, lines).unwrap();
    let (report, rows) = run(&task, &["--max-new-tokens", "4", "--batch-size", "4"]);
    assert_eq!(report["accuracy"], 0.5, "{report}");
    assert_eq!(report["unmatched"], 0);
    assert_eq!(report["generated_tokens"], tokens, "{report}");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["correct"], i % 2 == 0, "{row}");
    }
    // an extractor that finds nothing: counted, scored wrong, no crash
    let (report, _) = run(
        &task,
        &["--max-new-tokens", "4", "--extract", "#### (\\d+)"],
    );
    assert_eq!(report["unmatched"], 6, "{report}");
    assert_eq!(report["accuracy"], 0.0);
    // a task dumped with its scoring (the first word read; a stop at " w4") scores as it did
    // with those flags when read back with none (a dumped built-in keeps its extractor so)
    let flags = ["--extract", r"^\s*(w\d+)", "--stop", " w4"];
    let dumped = d.path().join("dumped.jsonl");
    let mut args = vec!["eval", "--task", task.to_str().unwrap(), "--dump-task"];
    args.extend([dumped.to_str().unwrap()].iter().chain(&flags));
    let o = petal(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&dumped)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&first["extract"], &first["stop"]),
        (&Value::from(flags[1]), &serde_json::json!([flags[3]]))
    );
    let mut with_flags = vec!["--max-new-tokens", "4"];
    with_flags.extend(flags);
    let (want, want_rows) = run(&task, &with_flags);
    let (plain, plain_rows) = run(&task, &["--max-new-tokens", "4"]);
    let (got, got_rows) = run(&dumped, &["--max-new-tokens", "4"]);
    assert_eq!(got, want);
    assert_ne!(
        plain_rows, want_rows,
        "the flags change nothing: a test that cannot fail"
    );
    for (g, w) in got_rows.iter().zip(&want_rows) {
        for k in ["output", "extracted", "reference", "correct"] {
            assert_eq!(g[k], w[k], "{k}");
        }
    }
    assert_eq!(plain["examples"], got["examples"]);
}

#[test]
fn batched_generation_gives_each_prompt_its_own_answer_as_places_free_up() {
    // seven prompts, three decoded at a time, a stop word that ends some answers early: the
    // places those leave are taken by the next prompts while the others go on; each output
    // must still be the prompt's own greedy answer (`greedy`, one prompt at a time)
    let lm = golden_lm();
    let prompts = PROMPTS;
    // " w51" ends some answers after a few words (the first prompt's ends at its first token)
    let stop = vec![" w51".to_string()];
    let want: Vec<(String, usize)> = prompts.iter().map(|p| greedy(&lm, p, 6, &stop)).collect();
    let lengths: std::collections::BTreeSet<usize> = want.iter().map(|w| w.1).collect();
    assert!(
        lengths.len() > 1,
        "every answer as long: nothing frees a place early: {want:?}"
    );
    let d = tempfile::tempdir().unwrap();
    let task = d.path().join("gen.jsonl");
    let lines: String = prompts
        .iter()
        .map(|p| serde_json::json!({"prompt": p, "answer": "w0"}).to_string() + "\n")
        .collect();
    std::fs::write(&task, lines).unwrap();
    for batch in ["3", "1"] {
        let (report, rows) = run(
            &task,
            &[
                "--max-new-tokens",
                "6",
                "--stop",
                &stop[0],
                "--batch-size",
                batch,
            ],
        );
        for (i, (row, w)) in rows.iter().zip(&want).enumerate() {
            assert_eq!(row["index"], i, "batch {batch}");
            assert_eq!(row["output"], w.0.as_str(), "batch {batch}, prompt {i}");
        }
        let tokens: usize = want.iter().map(|w| w.1).sum();
        assert_eq!(report["generated_tokens"], tokens, "batch {batch}");
    }
}

#[test]
fn a_bad_task_is_refused_in_one_line_naming_the_line_or_the_choices() {
    let d = tempfile::tempdir().unwrap();
    let task = d.path().join("t.jsonl");
    std::fs::write(
        &task,
        "{\"prompt\": \"w5\", \"answer\": \"w6\"}\n{\"prompt\": \"w7\"}\n",
    )
    .unwrap();
    let model = golden().join("llama");
    let m = model.to_str().unwrap();
    let mc = golden().join("task_mc.jsonl"); // a model without a chat template
    let empty = d.path().join("e.jsonl"); // an empty choice would score log-likelihood 0
    let line = "{\"prompt\": \"w5\", \"choices\": [\"\", \" w6\"], \"answer\": 1}\n";
    std::fs::write(&empty, line).unwrap();
    for (args, want) in [
        (
            vec!["--task", empty.to_str().unwrap()],
            "e.jsonl:1: `choices`[0] is empty",
        ),
        (
            vec!["--task", task.to_str().unwrap()],
            "t.jsonl:2: no `answer` key",
        ),
        (
            vec!["--task", "nope"],
            "neither a built-in task (gsm8k, elementary_math_qa, multiemo, spamassassin, mmlu)",
        ),
        (
            vec!["--task", "nope", "--data", "x.jsonl"],
            "--data and --task: give one",
        ),
        (
            vec![],
            "give --data (loss, perplexity) or --task (accuracy)",
        ),
        (
            vec!["--task", task.to_str().unwrap(), "--extract", "("],
            "not a regex",
        ),
        (
            vec!["--task", mc.to_str().unwrap(), "--chat"],
            "has no chat template",
        ),
    ] {
        let mut all = vec!["eval", "--model", m];
        all.extend(args);
        let o = petal(&all);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains(want) && e.lines().count() == 1, "{all:?}: {e}");
    }
}

#[test]
fn a_task_dumped_in_the_task_file_form_reads_back_as_it_was() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("dump.jsonl");
    let src = golden().join("task_mc.jsonl");
    let o = petal(&[
        "eval",
        "--task",
        src.to_str().unwrap(),
        "--max-examples",
        "5",
        "--dump-task",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (got, want) = (read(&out), read(&src));
    assert_eq!(got.len(), 5);
    for (g, w) in got.iter().zip(&want) {
        for k in ["prompt", "choices", "answer"] {
            assert_eq!(g[k], w[k], "{k}");
        }
        let task = w["task"].as_str().unwrap_or("task_mc");
        assert_eq!(g["task"], task);
    }
    // a task's description comes back with it
    let src = d.path().join("described.jsonl");
    let row = r#"{"prompt": "About w.\n\nw5 w9", "description": "About w.\n\n", "answer": "w3"}"#;
    std::fs::write(&src, format!("{row}\n")).unwrap();
    let o = petal(&[
        "eval",
        "--task",
        src.to_str().unwrap(),
        "--dump-task",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(&out)[0]["description"], "About w.\n\n");
}
