//! Tests of the task formats, extractors and readers (`super`).

use super::*;

/// MMLU and GSM8K prompts through SmolLM2's and Qwen2.5-Coder's chat templates as
/// lm-evaluation-harness's `--apply_chat_template` makes them, through transformers'
/// `apply_chat_template` (tools/golden/make_chat_fixture.py).
#[test]
fn chatted_prompts_are_the_harness_own() {
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(golden("chat_tasks.json")).unwrap()).unwrap();
    let mmlu = mmlu(&golden("mmlu_raw.jsonl")).unwrap();
    let gsm = gsm8k(&golden("gsm8k_raw.jsonl")).unwrap();
    let text = |v: &Value| v.as_str().unwrap().to_string();
    let models = g["models"].as_object().unwrap();
    assert_eq!(models.len(), 2);
    for (name, m) in models {
        let t = ChatTemplate::new(&text(&m["chat_template"]), text(&m["bos"]), text(&m["eos"]))
            .unwrap();
        for (key, examples) in [("mmlu", &mmlu), ("gsm8k", &gsm)] {
            let want = m[key].as_array().unwrap();
            assert!(want.len() >= 3, "{name} {key}");
            for w in want {
                let e = examples
                    .iter()
                    .find(|e| e.prompt == text(&w["plain"]))
                    .unwrap_or_else(|| panic!("{name} {key}: no example {}", w["plain"]));
                let c = chatted(e, &t).unwrap();
                assert_eq!(c.prompt, text(&w["prompt"]), "{name} {key}");
                if let Item::Choice { choices, answer } = &c.item {
                    let want: Vec<String> =
                        w["choices"].as_array().unwrap().iter().map(text).collect();
                    assert_eq!(
                        (choices, *answer as u64),
                        (&want, w["answer"].as_u64().unwrap())
                    );
                }
            }
        }
    }
}

#[test]
fn a_description_must_start_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.jsonl");
    let row = r#"{"prompt": "About x.\n\nQ?", "description": "About x.\n\n", "answer": "4"}"#;
    std::fs::write(&p, format!("{row}\n")).unwrap();
    let e = load_task_file(&p, "t").unwrap().0;
    assert_eq!(e[0].description, "About x.\n\n");
    std::fs::write(
        &p,
        format!("\n{}\n", row.replace("About x.\\n\\n\"", "About y.\"")),
    )
    .unwrap();
    let err = load_task_file(&p, "t").unwrap_err().to_string();
    assert!(
        err.contains("t.jsonl:2:") && err.contains("description"),
        "{err}"
    );
}

#[test]
fn a_file_says_how_its_generations_are_scored_one_way() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.jsonl");
    let said = r#"{"prompt": "Q", "answer": "4", "extract": "last-number", "stop": ["Q:"]}"#;
    let plain = r#"{"prompt": "R", "answer": "5"}"#;
    std::fs::write(&p, format!("{plain}\n{said}\n{said}\n")).unwrap();
    let (ex, scoring) = load_task_file(&p, "t").unwrap();
    assert_eq!(ex.len(), 3);
    assert_eq!(scoring.extract.as_deref(), Some("last-number"));
    assert_eq!(scoring.stop, Some(vec!["Q:".to_string()]));
    assert_eq!(
        Extract::parse("last-number").unwrap().as_arg(),
        "last-number"
    );
    assert_eq!(
        Extract::parse(r"#### (\d+)").unwrap().as_arg(),
        r"#### (\d+)"
    );
    std::fs::write(&p, format!("{plain}\n")).unwrap();
    assert_eq!(load_task_file(&p, "t").unwrap().1, FileScoring::default());
    for (line, want) in [
        (
            said.replace("Q:", "A:"),
            "t.jsonl:3: `extract` or `stop` differs from line 2's",
        ),
        (
            said.replace("last-number", "("),
            "t.jsonl:3: `extract`: --extract `(`: not a regex",
        ),
        (
            said.replace(r#"["Q:"]"#, "3"),
            "t.jsonl:3: `stop` must be a list of strings",
        ),
        (
            r#"{"prompt": "x", "choices": ["a", "b"], "answer": 0, "stop": []}"#.into(),
            "t.jsonl:3: `extract` and `stop` are for generation examples",
        ),
    ] {
        std::fs::write(&p, format!("{plain}\n{said}\n{line}\n")).unwrap();
        let e = load_task_file(&p, "t").unwrap_err().to_string();
        assert!(e.contains(want), "{line}: {e}");
    }
}

#[test]
fn extractors_read_gsm8k_answers_numbers_and_regex_groups() {
    let last = Extract::LastNumber;
    assert_eq!(
        last.apply("so 3 + 4 = 7. The answer is 1,234."),
        Some("1234".into())
    );
    assert_eq!(last.apply("it costs -5.50 dollars"), Some("-5.50".into()));
    assert_eq!(last.apply("no digits here"), None);
    assert_eq!(last.apply("18.0"), Some("18".into()));
    let r = Extract::parse(r"#### (\d+)").unwrap();
    assert_eq!(r.apply("work\n#### 42\n"), Some("42".into()));
    assert_eq!(r.apply("nothing"), None);
    assert_eq!(
        Extract::parse("whole").unwrap().apply("  Paris \n"),
        Some("Paris".into())
    );
    assert!(Extract::parse("(").unwrap_err().contains("not a regex"));
}

#[test]
fn task_files_read_both_forms_and_name_the_line_of_a_bad_example() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\": \"2+2=\", \"choices\": [\" 3\", \" 4\"], \"answer\": 1}\n\
         {\"prompt\": \"Capital of France?\", \"answer\": \"Paris\", \"task\": \"geo\"}\n",
    )
    .unwrap();
    let ex = load_task_file(&p, "t").unwrap().0;
    assert_eq!(ex.len(), 2);
    assert_eq!(
        ex[0].item,
        Item::Choice {
            choices: vec![" 3".into(), " 4".into()],
            answer: 1
        }
    );
    assert_eq!((ex[0].task.as_str(), ex[1].task.as_str()), ("t", "geo"));
    for (line, want) in [
        (
            "{\"choices\": [\"a\", \"b\"], \"answer\": 0}",
            "t.jsonl:2: no `prompt` key",
        ),
        ("{\"prompt\": \"x\"}", "t.jsonl:2: no `answer` key"),
        (
            "{\"prompt\": \"x\", \"choices\": [\"a\", \"b\"], \"answer\": 2}",
            "0..1",
        ),
        (
            "{\"prompt\": \"x\", \"choices\": [\"a\"], \"answer\": 0}",
            "2 or more",
        ),
        ("{\"prompt\": \"x\", \"answer\": 3}", "must be a string"),
    ] {
        std::fs::write(
            &p,
            format!("{{\"prompt\": \"ok\", \"answer\": \"y\"}}\n{line}\n"),
        )
        .unwrap();
        let e = load_task_file(&p, "t").unwrap_err().to_string();
        assert!(e.contains(want), "{line}: {e}");
    }
}

#[test]
fn bigbench_examples_take_the_best_scored_target_as_the_answer() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("task.json");
    let task = serde_json::json!({
        "examples": [
            {"input": "What is 1+1?", "target_scores": {"1": 0, "2": 1, "3": 0}},
            {"input": "no scores", "target": "x"}
        ]
    });
    std::fs::write(&p, task.to_string()).unwrap();
    let ex = bigbench(&p, "math").unwrap();
    assert_eq!(ex.len(), 1);
    assert_eq!(
        ex[0].prompt,
        "Q: What is 1+1?\n  choice: 1\n  choice: 2\n  choice: 3\nA:"
    );
    let Item::Choice { choices, answer } = &ex[0].item else {
        panic!("{:?}", ex[0].item)
    };
    assert_eq!(choices[*answer], " 2");
}

/// GSM8K's scoring (`gsm8k`'s reference, `last-number` on the output, exact match) gives
/// lm-evaluation-harness's own verdict under its "flexible-extract" filter
/// (tools/golden/make_gsm8k_extract.py runs the harness's filter and metric), except where
/// evaluation.md says petal differs: a zero fraction (`18.0` is 18 here, wrong there), and a run
/// of periods, which the harness reads as part of a number or as a number (`7...`, `30 ...`).
#[test]
fn gsm8k_verdicts_are_the_harness_own_but_for_the_documented_differences() {
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(golden("gsm8k_extract.json")).unwrap())
            .unwrap();
    let cases = g["cases"].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test.jsonl");
    let lines: Vec<String> = cases
        .iter()
        .map(|c| serde_json::json!({"question": "q", "answer": c["answer"]}).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    let refs = gsm8k(&path).unwrap();
    let differ = [
        "So she makes 18.0 dollars.",
        "The total is 18.00",
        "The result is 7...",
        "It is 30 ... I think",
    ];
    let (mut same, mut different) = (0, 0);
    for (c, r) in cases.iter().zip(&refs) {
        let Item::Generate { answer } = &r.item else {
            panic!("a generation example")
        };
        let output = c["output"].as_str().unwrap();
        let got = Extract::LastNumber.apply(output);
        let ours = got.is_some() && got.as_deref() == Some(answer.as_str());
        let theirs = c["harness_correct"].as_bool().unwrap();
        if differ.contains(&output) {
            assert!(
                ours && !theirs,
                "{output:?}: expected the documented difference"
            );
            different += 1;
        } else {
            assert_eq!(
                ours, theirs,
                "{output:?} against {:?}: petal read {got:?}",
                c["answer"]
            );
            same += 1;
        }
    }
    assert_eq!(
        (same, different),
        (cases.len() - differ.len(), differ.len())
    );
    // both verdicts well represented
    for verdict in [true, false] {
        let n = cases
            .iter()
            .filter(|c| c["harness_correct"] == verdict)
            .count();
        assert!(n >= 10, "{n} cases the harness scores {verdict}");
    }
}
