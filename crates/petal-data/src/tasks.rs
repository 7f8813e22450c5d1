//! Evaluation tasks (`petal eval --task`): examples scored by accuracy, not loss.
//!
//! A task file is JSONL, one example a line, in one of two forms (an optional `"task"` key
//! names its sub-task for the per-task breakdown):
//! - multiple choice: `{"prompt": "...", "choices": ["...", ...], "answer": INDEX}`; each
//!   choice is scored by its log-likelihood after the prompt (the text `prompt + choice`, so
//!   a choice carries its own leading space);
//! - generation: `{"prompt": "...", "answer": "..."}`; the greedy continuation of the prompt
//!   is compared with the answer after both pass the task's answer extractor.
//!
//! A generation example may say how it is scored: `"extract"` (`whole`, `last-number` or a
//! regex, as `--extract`) and `"stop"` (a list of stop strings, as `--stop`), which the flags
//! override; every line that says must say the same ([`FileScoring`]). `--dump-task` writes
//! them, so that a built-in generation task dumped to a file scores as the built-in does.
//!
//! An optional `"description"` (a start of the prompt, such as MMLU's "The following are
//! multiple choice questions ...\n\n") is the system turn when prompts go through a chat
//! template ([`chatted`]), as lm-evaluation-harness's `--apply_chat_template` makes a task's
//! description one.
//!
//! Built-in tasks read the real data petal fetches: GSM8K's test split (`gsm8k`: generation,
//! the number after `####` in the reference, the last number of the output) and BIG-bench's
//! multiple-choice `task.json` files (`elementary_math_qa`, `multiemo`: the choices are
//! `target_scores`' keys, the answer its best-scored one), SpamAssassin's emails
//! (`spamassassin`: spam or not, [`spamassassin`]) and MMLU's test split (`mmlu`: four-choice
//! questions in 57 subjects, as lm-evaluation-harness asks them, [`mmlu`]).

use crate::error::{DataError, Result};
use crate::template::{ChatTemplate, Message};
use serde_json::Value;
use std::path::Path;

mod mmlu;
mod spam;
pub use mmlu::mmlu;
pub use spam::spamassassin;

/// What an example asks.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Choice { choices: Vec<String>, answer: usize },
    Generate { answer: String },
}

/// One scored example.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskExample {
    pub task: String,
    pub prompt: String,
    pub item: Item,
    /// The start of `prompt` that describes the task (a system turn under a chat template);
    /// empty for most tasks
    pub description: String,
}

/// How an answer is read out of a text before exact matching.
#[derive(Debug, Clone)]
pub enum Extract {
    /// The whole text, trimmed
    Whole,
    /// The first capture group (or the whole match) of the first match
    Regex(regex::Regex),
    /// The last number in the text (commas and a trailing period dropped), as
    /// lm-evaluation-harness's GSM8K "flexible-extract"
    LastNumber,
}

impl Extract {
    /// The answer in `text`, or None when the extractor finds nothing.
    pub fn apply(&self, text: &str) -> Option<String> {
        match self {
            Extract::Whole => Some(text.trim().to_string()),
            Extract::Regex(r) => r.captures(text).map(|c| {
                c.get(1)
                    .or_else(|| c.get(0))
                    .map_or("", |m| m.as_str())
                    .trim()
                    .to_string()
            }),
            Extract::LastNumber => {
                static NUMBER: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
                    regex::Regex::new(r"-?[0-9][0-9,]*(\.[0-9]+)?").expect("a valid regex")
                });
                NUMBER
                    .find_iter(text)
                    .last()
                    .map(|m| normalise_number(m.as_str()))
            }
        }
    }

    /// The `--extract` value that parses back to this.
    pub fn as_arg(&self) -> String {
        match self {
            Extract::Whole => "whole".into(),
            Extract::LastNumber => "last-number".into(),
            Extract::Regex(r) => r.as_str().into(),
        }
    }

    /// `--extract`'s values: `whole`, `last-number`, or a regex (its first group).
    pub fn parse(s: &str) -> std::result::Result<Extract, String> {
        match s {
            "" | "whole" => Ok(Extract::Whole),
            "last-number" => Ok(Extract::LastNumber),
            r => regex::Regex::new(r).map(Extract::Regex).map_err(|e| {
                // regex's message draws the pattern over several lines: its last says why
                let e = e.to_string();
                let why = e.lines().last().unwrap_or_default().trim();
                format!("--extract `{r}`: not a regex ({why})")
            }),
        }
    }
}

/// `1,234` -> `1234`, `72.` -> `72`, `5.0` -> `5`.
fn normalise_number(s: &str) -> String {
    let s = s.replace(',', "");
    let s = s.trim_end_matches('.');
    match s.split_once('.') {
        Some((int, frac)) if frac.chars().all(|c| c == '0') => int.to_string(),
        _ => s.to_string(),
    }
}

fn line_err(path: &Path, line: usize, msg: impl Into<String>) -> DataError {
    DataError::Line {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

/// A JSONL file's records with their line numbers (from 1), blank lines skipped; a line that is
/// not JSON is an error naming it.
fn json_lines(path: &Path) -> Result<Vec<(usize, Value)>> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .map(|v| (i + 1, v))
                .map_err(|e| line_err(path, i + 1, format!("not JSON: {e}")))
        })
        .collect()
}

/// `e` asked through a chat template, as lm-evaluation-harness's `--apply_chat_template` asks
/// it zero-shot: the description (if any) a system turn, the rest of the prompt a user turn,
/// then the assistant's generation prompt; each choice loses its leading space (the harness's
/// target delimiter is empty then: the reply starts the assistant's turn).
pub fn chatted(e: &TaskExample, template: &ChatTemplate) -> Result<TaskExample> {
    let turn = |role: &str, content: &str| Message {
        role: role.into(),
        content: content.into(),
    };
    let question = e.prompt.strip_prefix(&e.description).ok_or_else(|| {
        DataError::Msg(format!(
            "task {}: the description does not start the prompt",
            e.task
        ))
    })?;
    let mut turns = Vec::new();
    if !e.description.is_empty() {
        turns.push(turn("system", &e.description));
    }
    turns.push(turn("user", question));
    let item = match &e.item {
        Item::Choice { choices, answer } => Item::Choice {
            choices: choices
                .iter()
                .map(|c| c.strip_prefix(' ').unwrap_or(c).to_string())
                .collect(),
            answer: *answer,
        },
        other => other.clone(),
    };
    Ok(TaskExample {
        task: e.task.clone(),
        prompt: template.render(&turns, true)?,
        item,
        description: String::new(),
    })
}

/// How a task file's generation examples are scored where its lines say (`"extract"`,
/// `"stop"`); None where none says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileScoring {
    pub extract: Option<String>,
    pub stop: Option<Vec<String>>,
}

/// Line `n`'s `"extract"` and `"stop"`, if it has either.
fn line_scoring(path: &Path, n: usize, v: &Value) -> Result<Option<FileScoring>> {
    let (extract, stop) = (v.get("extract"), v.get("stop"));
    if extract.is_none() && stop.is_none() {
        return Ok(None);
    }
    if v.get("choices").is_some() {
        return Err(line_err(
            path,
            n,
            "`extract` and `stop` are for generation examples (those without `choices`)",
        ));
    }
    let extract = match extract {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            Extract::parse(s).map_err(|e| line_err(path, n, format!("`extract`: {e}")))?;
            Some(s.clone())
        }
        Some(_) => {
            return Err(line_err(
                path,
                n,
                "`extract` must be a string: whole, last-number or a regex",
            ))
        }
    };
    let stop = match stop {
        None | Some(Value::Null) => None,
        Some(s) => Some(
            s.as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| line_err(path, n, "`stop` must be a list of strings"))?,
        ),
    };
    Ok(Some(FileScoring { extract, stop }))
}

/// A task file in petal's JSONL form (see the module doc) and how it says its generation
/// examples are scored; `task` names examples without a `"task"` key.
pub fn load_task_file(path: &Path, task: &str) -> Result<(Vec<TaskExample>, FileScoring)> {
    let mut out = Vec::new();
    let mut said: Option<(usize, FileScoring)> = None;
    for (n, v) in json_lines(path)? {
        match (line_scoring(path, n, &v)?, &said) {
            (Some(s), None) => said = Some((n, s)),
            (Some(s), Some((first, before))) if s != *before => {
                let why = format!("`extract` or `stop` differs from line {first}'s");
                return Err(line_err(path, n, why + " (a file is scored one way)"));
            }
            _ => {}
        }
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| line_err(path, n, format!("no `{k}` key")))
        };
        let prompt = field("prompt")?
            .as_str()
            .ok_or_else(|| line_err(path, n, "`prompt` must be a string"))?
            .to_string();
        let description = match v.get("description") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(d)) if prompt.starts_with(d.as_str()) => d.clone(),
            Some(_) => {
                return Err(line_err(
                    path,
                    n,
                    "`description` must be a string that starts the prompt",
                ))
            }
        };
        let answer = field("answer")?;
        let item = match v.get("choices") {
            Some(c) => {
                let choices = c
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>()
                    })
                    .filter(|c| c.len() >= 2)
                    .ok_or_else(|| {
                        line_err(path, n, "`choices` must be a list of 2 or more strings")
                    })?;
                if let Some(i) = choices.iter().position(String::is_empty) {
                    // an empty continuation scores log-likelihood 0, above every other
                    let e = format!("`choices`[{i}] is empty: every choice needs some text");
                    Err(line_err(path, n, e))?;
                }
                let answer = answer
                    .as_u64()
                    .map(|a| a as usize)
                    .filter(|&a| a < choices.len())
                    .ok_or_else(|| {
                        line_err(
                            path,
                            n,
                            format!(
                                "`answer` must be a choice's index, 0..{}",
                                choices.len() - 1
                            ),
                        )
                    })?;
                Item::Choice { choices, answer }
            }
            None => Item::Generate {
                answer: answer
                    .as_str()
                    .ok_or_else(|| {
                        line_err(path, n, "`answer` must be a string (or add `choices`)")
                    })?
                    .to_string(),
            },
        };
        let task = match v.get("task") {
            None | Some(Value::Null) => task.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(line_err(path, n, "`task` must be a string")),
        };
        out.push(TaskExample {
            task,
            prompt,
            item,
            description,
        });
    }
    if out.is_empty() {
        return Err(DataError::Msg(format!("{}: no examples", path.display())));
    }
    Ok((out, said.map(|(_, s)| s).unwrap_or_default()))
}

/// GSM8K's `test.jsonl` (`question`, `answer` ending in `#### N`) as generation examples in
/// lm-evaluation-harness's zero-shot form: `Question: ...\nAnswer:`, the reference being N.
pub fn gsm8k(path: &Path) -> Result<Vec<TaskExample>> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let gold = regex::Regex::new(r"####\s*(-?[0-9.,]+)").expect("a valid regex");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| line_err(path, i + 1, format!("not JSON: {e}")))?;
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| line_err(path, i + 1, format!("no `{k}` string")))
        };
        let answer = gold
            .captures(s("answer")?)
            .and_then(|c| c.get(1))
            .map(|m| normalise_number(m.as_str()))
            .ok_or_else(|| line_err(path, i + 1, "`answer` has no `#### N`"))?;
        out.push(TaskExample {
            task: "gsm8k".into(),
            prompt: format!("Question: {}\nAnswer:", s("question")?),
            item: Item::Generate { answer },
            description: String::new(),
        });
    }
    Ok(out)
}

/// A BIG-bench multiple-choice `task.json` (examples with `input` and `target_scores`), in
/// BIG-bench's own prompt form: `task_prefix`, `example_input_prefix` (default `\nQ: `) +
/// input, the choices appended as BIG-bench does by default (`append_choices_to_input`, each
/// after `choice_prefix`, default `\n  choice: `), `example_output_prefix` (default `\nA: `),
/// trimmed; each choice scored after it with a space; the answer is the choice
/// with the highest target score. Examples without `target_scores` are skipped.
pub fn bigbench(path: &Path, task: &str) -> Result<Vec<TaskExample>> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| DataError::Msg(format!("{}: not JSON: {e}", path.display())))?;
    let prefix = |k: &str, default: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let (before, after) = (
        prefix("example_input_prefix", "\nQ: "),
        prefix("example_output_prefix", "\nA: "),
    );
    let task_prefix = prefix("task_prefix", "");
    let choice_prefix = prefix("choice_prefix", "\n  choice: ");
    let append = v
        .get("append_choices_to_input")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let examples = v
        .get("examples")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::Msg(format!("{}: no `examples` list", path.display())))?;
    let mut out = Vec::new();
    for e in examples {
        let (Some(input), Some(scores)) = (
            e.get("input").and_then(Value::as_str),
            e.get("target_scores").and_then(Value::as_object),
        ) else {
            continue;
        };
        let choices: Vec<String> = scores.keys().cloned().collect();
        let best = scores
            .values()
            .enumerate()
            .max_by(|a, b| {
                let f = |v: &Value| v.as_f64().unwrap_or(f64::MIN);
                f(a.1).total_cmp(&f(b.1)).then(b.0.cmp(&a.0))
            })
            .map(|(i, _)| i);
        let Some(answer) = best.filter(|_| choices.len() >= 2) else {
            continue;
        };
        let listed: String = if append {
            choices
                .iter()
                .map(|c| format!("{choice_prefix}{c}"))
                .collect()
        } else {
            String::new()
        };
        out.push(TaskExample {
            task: task.to_string(),
            prompt: format!("{task_prefix}{before}{input}{listed}{after}")
                .trim()
                .to_string(),
            item: Item::Choice {
                choices: choices
                    .into_iter()
                    .map(|c| format!(" {}", c.trim()))
                    .collect(),
                answer,
            },
            description: String::new(),
        });
    }
    if out.is_empty() {
        return Err(DataError::Msg(format!(
            "{}: no multiple-choice examples (`input` with `target_scores`)",
            path.display()
        )));
    }
    Ok(out)
}

/// A file of the repository's golden fixtures (tests/fixtures/golden).
#[cfg(test)]
fn golden(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden")
        .join(name)
}

#[cfg(test)]
mod tests;
