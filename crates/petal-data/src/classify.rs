//! Sequence-classification data: JSONL lines `{"text", "label"}` or `{"text", "text_pair",
//! "label"}` (an optional `task` too). Labels are whole numbers 0..C-1, or strings mapped to
//! classes through their sorted set; the mapping ([`Labels`]) is saved with the adapter so that
//! evaluation reads labels the same way. An example holds the tokens (BERT's `[CLS] a [SEP] b
//! [SEP]`) as `ids` and its class as the only entry of `labels`.

use crate::dataset::{line_err, task_field, Example};
use crate::{DataError, Result, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// How labels map to classes: named (strings, in class order) or numbered 0..count-1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Labels {
    /// Class names in class order; None for whole-number labels.
    pub names: Option<Vec<String>>,
    /// Number of classes.
    pub count: usize,
}

impl Labels {
    /// The most classes a head may have (a row of the classifier each): far above any real
    /// task's; a label past it is a typo or a corrupt file, which would size the head.
    pub const MAX_CLASSES: usize = 1 << 16;

    /// Refuses a mapping a classifier cannot be built from: no class or more than
    /// [`Self::MAX_CLASSES`], or names that are not `count` distinct strings (a saved
    /// `labels.json` is read through this; a federated client's data may hold one class).
    pub fn check(&self) -> std::result::Result<(), String> {
        if !(1..=Self::MAX_CLASSES).contains(&self.count) {
            return Err(format!(
                "`count` {} is out of range: 1 to {}",
                self.count,
                Self::MAX_CLASSES
            ));
        }
        if let Some(names) = &self.names {
            let mut sorted = names.clone();
            sorted.sort();
            sorted.dedup();
            if names.len() != self.count || sorted.len() != names.len() {
                return Err(format!(
                    "`names` must be {} distinct class names (`count`), not {:?}",
                    self.count, names
                ));
            }
        }
        Ok(())
    }

    /// The labels of some data: its strings' sorted set, or its numbers 0..=max (at least
    /// `min_count` classes, e.g. a saved head's).
    pub fn of(values: &[Value], min_count: usize) -> std::result::Result<Self, String> {
        if values.iter().all(Value::is_string) {
            let mut names: Vec<String> = values
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            return Ok(Labels {
                count: names.len(),
                names: Some(names),
            });
        }
        let max = values
            .iter()
            .map(|v| v.as_u64().ok_or(()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| "labels must all be whole numbers 0..C-1 or all strings".to_string())?
            .into_iter()
            .max()
            .unwrap_or(0);
        if max >= Self::MAX_CLASSES as u64 {
            return Err(format!(
                "label {max} is out of range: at most {} (the head has a row per class)",
                Self::MAX_CLASSES - 1
            ));
        }
        Ok(Labels {
            names: None,
            count: (max as usize + 1).max(min_count),
        })
    }

    /// The class of one label value, or why it has none.
    pub fn class(&self, v: &Value) -> std::result::Result<usize, String> {
        match (&self.names, v) {
            (Some(names), Value::String(s)) => names.iter().position(|n| n == s).ok_or_else(|| {
                format!(
                    "label {s:?} is not one of the classes ({})",
                    names.join(", ")
                )
            }),
            (None, v) if v.as_u64().is_some_and(|n| (n as usize) < self.count) => {
                Ok(v.as_u64().unwrap_or(0) as usize)
            }
            (None, v) => Err(format!(
                "label {v} is outside the classes 0..{}",
                self.count.saturating_sub(1)
            )),
            (Some(_), v) => Err(format!("label {v} is not a string like the classes' names")),
        }
    }
}

/// One example as read: its line, text, optional pair, label value and optional task.
type Row = (usize, String, Option<String>, Value, Option<String>);

/// The examples of a classification JSONL file, checked field by field, untokenized.
fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let v: Value = serde_json::from_str(line)
            .map_err(|e| line_err(path, n, format!("malformed JSON: {e}")))?;
        let field = |k: &str| -> std::result::Result<Option<String>, DataError> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(line_err(path, n, format!("field `{k}` must be a string"))),
            }
        };
        let text = field("text")?.ok_or_else(|| {
            line_err(
                path,
                n,
                "a classification example needs `text` (and `label`; `text_pair` for pairs)",
            )
        })?;
        let label = v
            .get("label")
            .filter(|l| !l.is_null())
            .cloned()
            .ok_or_else(|| line_err(path, n, "field `label` is missing"))?;
        let task = task_field(&v).map_err(|m| line_err(path, n, m))?;
        rows.push((n, text, field("text_pair")?, label, task));
    }
    if rows.is_empty() {
        return Err(DataError::Msg(format!(
            "{}: no classification examples: the file holds none",
            path.display()
        )));
    }
    Ok(rows)
}

/// The labels' mapping of some classification files together: their strings' sorted set, or
/// their numbers 0..=max (read without tokenizing, before the files are loaded with it).
pub fn labels_of(paths: &[std::path::PathBuf]) -> Result<Labels> {
    let mut values = Vec::new();
    for p in paths {
        values.extend(read_rows(p)?.into_iter().map(|r| r.3));
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let err = |m: String| DataError::Msg(format!("{}: {m}", names.join(", ")));
    let labels = Labels::of(&values, 0).map_err(err)?;
    labels.check().map_err(err)?;
    Ok(labels)
}

/// The examples of a classification JSONL file, each cut to `max_len` tokens, with the labels'
/// mapping: `labels` when given (evaluation, or a saved head's classes), else the file's own.
pub fn load_classification(
    path: &Path,
    tok: &Tokenizer,
    max_len: usize,
    labels: Option<&Labels>,
) -> Result<(Vec<Example>, Labels)> {
    let rows = read_rows(path)?;
    let labels = match labels {
        Some(l) => l.clone(),
        None => {
            let values: Vec<Value> = rows.iter().map(|r| r.3.clone()).collect();
            Labels::of(&values, 0)
                .map_err(|m| DataError::Msg(format!("{}: {m}", path.display())))?
        }
    };
    let mut out = Vec::with_capacity(rows.len());
    for (n, text, pair, label, task) in rows {
        let class = labels.class(&label).map_err(|m| line_err(path, n, m))?;
        let (ids, _) = tok.encode_classification(&text, pair.as_deref(), max_len)?;
        out.push(Example {
            ids,
            labels: vec![class as i64],
            task,
        });
    }
    Ok((out, labels))
}
