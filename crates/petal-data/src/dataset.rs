//! Training examples from JSONL (`{"text"}`, `{"prompt","completion"}`, `{"messages"}`) or
//! plain text, with loss masks, truncation, packing, a seeded split and padded batches.

use crate::template::Message;
use crate::{DataError, Result, Tokenizer, IGNORE};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use std::path::Path;

/// One sequence: ids and, per position, the label (the id itself, or IGNORE for no loss).
/// Labels are *not* shifted: position i's logits are scored against labels[i + 1]. `task`: the
/// JSONL line's `task` field, for multi-task data (per-task losses, task-balanced sampling).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub task: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DataOptions {
    pub max_seq_len: usize,
    pub pack: bool,
}

pub(crate) fn line_err(path: &Path, line: usize, msg: impl Into<String>) -> DataError {
    DataError::Line {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

/// Read a .jsonl or .txt file into examples.
pub fn load_examples(path: &Path, tok: &Tokenizer, opts: &DataOptions) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    let mut out = if is_jsonl {
        read_jsonl(path, &text, tok, opts)?
    } else {
        chunk_text(&text, tok, opts.max_seq_len)?
    };
    if opts.pack && is_jsonl {
        out = pack(out, opts.max_seq_len, tok.eos_id);
    }
    let read = out.len();
    out.retain(|e| e.labels.iter().skip(1).any(|&l| l != IGNORE));
    if out.is_empty() {
        let why = match read {
            0 => "the file holds none".to_string(),
            n => format!(
                "none of its {n} examples has a token to learn within its first {} tokens (the \
                 part that carries the loss, a completion or the assistant turns, starts later): \
                 raise --seq-len",
                opts.max_seq_len
            ),
        };
        return Err(DataError::Msg(format!(
            "{}: no examples to learn from: {why}",
            path.display()
        )));
    }
    Ok(out)
}

fn read_jsonl(
    path: &Path,
    text: &str,
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    // the first line with a task and the first without: both is a mistake
    let (mut tagged, mut untagged) = (None, None);
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| line_err(path, n, format!("malformed JSON: {e}")))?;
        let mut ex = example_from_json(&v, tok).map_err(|m| line_err(path, n, m))?;
        ex.task = task_field(&v).map_err(|m| line_err(path, n, m))?;
        match ex.task {
            Some(_) => tagged = tagged.or(Some(n)),
            None => untagged = untagged.or(Some(n)),
        }
        if let (Some(t), Some(u)) = (tagged, untagged) {
            return Err(line_err(
                path,
                t.max(u),
                format!(
                    "line {t} has a `task` and line {u} has none: give every example a task \
                     (multi-task data), or none"
                ),
            ));
        }
        ex.ids.truncate(opts.max_seq_len);
        ex.labels.truncate(opts.max_seq_len);
        out.push(ex);
    }
    Ok(out)
}

/// The optional `task` field: a non-empty string of at most 200 characters.
pub(crate) fn task_field(v: &Value) -> std::result::Result<Option<String>, String> {
    match v.get("task") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= 200 => {
            Ok(Some(s.clone()))
        }
        Some(_) => Err("field `task` must be a non-empty string (at most 200 characters)".into()),
    }
}

/// Examples grouped by task, in task-name order (examples without one under "").
pub fn group_by_task(examples: Vec<Example>) -> std::collections::BTreeMap<String, Vec<Example>> {
    let mut m: std::collections::BTreeMap<String, Vec<Example>> = Default::default();
    for e in examples {
        m.entry(e.task.clone().unwrap_or_default())
            .or_default()
            .push(e);
    }
    m
}

/// Keep the examples of the tasks `keep` (multi-task data); a listed task the data lacks, or
/// data without tasks, is refused naming it and the tasks there are. `what` names the option.
pub fn select_tasks(examples: Vec<Example>, keep: &[String], what: &str) -> Result<Vec<Example>> {
    let have = tasks(&examples);
    if have.is_empty() {
        return Err(DataError::Msg(format!(
            "{what}: the data has no `task` field, so there are no tasks to choose"
        )));
    }
    if let Some(t) = keep.iter().find(|t| !have.contains(t)) {
        return Err(DataError::Msg(format!(
            "{what}: task `{t}` is not in the data (its tasks: {})",
            have.join(", ")
        )));
    }
    Ok(examples
        .into_iter()
        .filter(|e| e.task.as_ref().is_some_and(|t| keep.contains(t)))
        .collect())
}

/// The tasks of `examples`, sorted, without repeats (empty for single-task data).
pub fn tasks(examples: &[Example]) -> Vec<String> {
    let mut t: Vec<String> = examples.iter().filter_map(|e| e.task.clone()).collect();
    t.sort();
    t.dedup();
    t
}

/// One epoch's order of `examples` drawing the tasks in turn (task-balanced sampling): slot j
/// takes task `j mod T`'s next example in that task's shuffled order, wrapping around a task that
/// runs out, so every task gets the same share of each batch whatever its size. The epoch has
/// as many slots as examples. Without tasks: a plain shuffle.
pub fn balanced_order(examples: &[Example], seed: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let names = tasks(examples);
    if names.len() < 2 {
        let mut o: Vec<usize> = (0..examples.len()).collect();
        o.shuffle(&mut rng);
        return o;
    }
    let mut per: Vec<Vec<usize>> = names
        .iter()
        .map(|n| {
            (0..examples.len())
                .filter(|&i| examples[i].task.as_deref() == Some(n.as_str()))
                .collect()
        })
        .collect();
    for p in &mut per {
        p.shuffle(&mut rng);
    }
    (0..examples.len())
        .map(|j| {
            let p = &per[j % per.len()];
            p[(j / per.len()) % p.len()]
        })
        .collect()
}

fn str_field<'a>(v: &'a Value, k: &str) -> std::result::Result<&'a str, String> {
    v.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("field `{k}` must be a string"))
}

fn example_from_json(v: &Value, tok: &Tokenizer) -> std::result::Result<Example, String> {
    let terr = |e: DataError| e.to_string();
    if v.get("messages").is_some() {
        return chat_example(v, tok);
    }
    if v.get("prompt").is_some() || v.get("completion").is_some() {
        let p = tok.encode(str_field(v, "prompt")?, true).map_err(terr)?;
        let mut c = tok
            .encode(str_field(v, "completion")?, false)
            .map_err(terr)?;
        c.extend(tok.eos_id);
        let labels = p
            .iter()
            .map(|_| IGNORE)
            .chain(c.iter().map(|&t| t as i64))
            .collect();
        let ids = p.into_iter().chain(c).collect();
        return Ok(Example {
            ids,
            labels,
            task: None,
        });
    }
    if v.get("text").is_some() {
        let mut ids = tok.encode(str_field(v, "text")?, true).map_err(terr)?;
        ids.extend(tok.eos_id);
        let labels = ids.iter().map(|&t| t as i64).collect();
        return Ok(Example {
            ids,
            labels,
            task: None,
        });
    }
    Err("expected one of the fields `text`, `prompt`+`completion` or `messages`".into())
}

/// The roles a chat turn may have (OpenAI's, which chat templates know).
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// A conversation rendered with the chat template; loss only on the assistant turns' tokens.
fn chat_example(v: &Value, tok: &Tokenizer) -> std::result::Result<Example, String> {
    let msgs: Vec<Message> = serde_json::from_value(v["messages"].clone())
        .map_err(|e| format!("`messages` must be a list of {{\"role\", \"content\"}}: {e}"))?;
    if let Some(m) = msgs.iter().find(|m| !ROLES.contains(&m.role.as_str())) {
        return Err(format!(
            "`messages` has a turn with role `{}` (roles: {})",
            m.role,
            ROLES.join(", ")
        ));
    }
    if !msgs.iter().any(|m| m.role == "assistant") {
        return Err("conversation has no assistant turn, so nothing to learn from".into());
    }
    let tmpl = tok
        .chat_template
        .as_ref()
        .ok_or("the model has no chat template; use `text` or `prompt`/`completion`")?;
    let full = tmpl.render(&msgs, false).map_err(|e| e.to_string())?;
    // Character spans of assistant contents: the render up to turn i with a generation prompt
    // ends where the reply starts; the render through turn i ends after it.
    let mut spans = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = tmpl
            .render(&msgs[..i], true)
            .map_err(|e| e.to_string())?
            .len();
        let end = tmpl
            .render(&msgs[..=i], false)
            .map_err(|e| e.to_string())?
            .len();
        if !full.starts_with(&tmpl.render(&msgs[..=i], false).map_err(|e| e.to_string())?) {
            return Err(
                "chat template does not render turns as prefixes; cannot mask the loss".into(),
            );
        }
        spans.push((start, end));
    }
    let (ids, offs) = tok.encode_with_offsets(&full).map_err(|e| e.to_string())?;
    let labels = ids
        .iter()
        .zip(&offs)
        .map(|(&id, &(s, _))| {
            if spans.iter().any(|&(a, b)| s >= a && s < b) {
                id as i64
            } else {
                IGNORE
            }
        })
        .collect();
    Ok(Example {
        ids,
        labels,
        task: None,
    })
}

/// Plain text cut into consecutive windows of `len` tokens (one shorter tail kept).
pub fn chunk_text(text: &str, tok: &Tokenizer, len: usize) -> Result<Vec<Example>> {
    let ids = tok.encode(text, false)?;
    Ok(ids
        .chunks(len.max(2))
        .filter(|c| c.len() >= 2)
        .map(|c| Example {
            ids: c.to_vec(),
            labels: c.iter().map(|&t| t as i64).collect(),
            task: None,
        })
        .collect())
}

/// Concatenate short examples (separated by EOS) into windows of at most `len` tokens; with
/// tasks, each task's examples on their own (a window holds one task).
pub fn pack(examples: Vec<Example>, len: usize, eos: Option<u32>) -> Vec<Example> {
    if examples.iter().any(|e| e.task.is_some()) {
        return group_by_task(examples)
            .into_values()
            .flat_map(|g| pack_one(g, len, eos))
            .collect();
    }
    pack_one(examples, len, eos)
}

fn pack_one(examples: Vec<Example>, len: usize, eos: Option<u32>) -> Vec<Example> {
    let mut out = Vec::new();
    let task = examples.first().and_then(|e| e.task.clone());
    let empty = || Example {
        task: task.clone(),
        ..Default::default()
    };
    let mut cur = empty();
    for e in examples {
        if !cur.ids.is_empty() && cur.ids.len() + e.ids.len() + 1 > len {
            out.push(std::mem::replace(&mut cur, empty()));
        }
        if !cur.ids.is_empty() {
            if let Some(t) = eos {
                cur.ids.push(t);
                cur.labels.push(IGNORE);
            }
        }
        cur.ids.extend(e.ids);
        cur.labels.extend(e.labels);
    }
    if !cur.ids.is_empty() {
        out.push(cur);
    }
    out
}

/// Shuffle with `seed`, then hold out `fraction` (at least one example) for validation.
pub fn split(mut examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    examples.shuffle(&mut rng);
    if fraction <= 0.0 || examples.len() < 2 {
        return (examples, Vec::new());
    }
    let n_val = ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let val = examples.split_off(examples.len() - n_val);
    (examples, val)
}

/// A padded batch, row-major (rows, len).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub rows: usize,
    pub len: usize,
}

impl Batch {
    /// Tokens that carry a loss (after the shift).
    pub fn target_tokens(&self) -> usize {
        (0..self.rows)
            .map(|r| {
                self.labels[r * self.len + 1..(r + 1) * self.len]
                    .iter()
                    .filter(|&&l| l != IGNORE)
                    .count()
            })
            .sum()
    }
}

/// Group examples (in the given order) into padded batches of `size` rows.
pub fn batches(examples: &[Example], size: usize, pad: u32) -> Vec<Batch> {
    examples
        .chunks(size.max(1))
        .map(|chunk| {
            let len = chunk.iter().map(|e| e.ids.len()).max().unwrap_or(0);
            let mut b = Batch {
                ids: Vec::new(),
                labels: Vec::new(),
                rows: chunk.len(),
                len,
            };
            for e in chunk {
                b.ids.extend(&e.ids);
                b.ids.extend(std::iter::repeat_n(pad, len - e.ids.len()));
                b.labels.extend(&e.labels);
                b.labels
                    .extend(std::iter::repeat_n(IGNORE, len - e.ids.len()));
            }
            b
        })
        .collect()
}
