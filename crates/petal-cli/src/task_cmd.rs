//! `petal eval --task`: accuracy on a task (petal-data's `tasks.rs` formats). Multiple-choice
//! examples are scored as lm-evaluation-harness scores them: each choice's log-likelihood
//! after the prompt, `acc` the share whose best choice is the answer, `acc_norm` the same with
//! each log-likelihood divided by the choice's length in characters. Generation examples are
//! generated greedily (batched) and scored by exact match after the answer extractor.

use anyhow::{bail, Context, Result};
use candle_core::{IndexOp, Tensor};
use petal_core::Ctx;
use petal_data::tasks::{Extract, Item, TaskExample};
use petal_data::Tokenizer;
use petal_models::Llama;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Built-in tasks on the data `petal assets` fetches.
pub const BUILT_IN: [&str; 3] = ["gsm8k", "elementary_math_qa", "multiemo"];

/// How a task is scored besides its examples.
pub struct Scoring {
    pub extract: Extract,
    /// Applied to generation references too (a task file's answers); built-ins give theirs
    /// already extracted
    pub extract_reference: bool,
    pub stop: Vec<String>,
    pub max_new_tokens: usize,
}

/// A task's examples and scoring: a built-in name or a JSONL file.
pub fn load(
    task: &str,
    extract: &str,
    stop: &[String],
    max_new: usize,
) -> Result<(Vec<TaskExample>, Scoring)> {
    let user = Extract::parse(extract).map_err(anyhow::Error::msg)?;
    let stop = |default: &[&str]| -> Vec<String> {
        if stop.is_empty() {
            default.iter().map(|s| s.to_string()).collect()
        } else {
            stop.to_vec()
        }
    };
    let scoring = |extract, extract_reference, stop| Scoring {
        extract,
        extract_reference,
        stop,
        max_new_tokens: max_new,
    };
    match task {
        "gsm8k" => {
            let p = crate::assets::ensure("gsm8k")?;
            let ex = petal_data::tasks::gsm8k(&p)?;
            // lm-evaluation-harness's zero-shot GSM8K: stop at the next question, read the
            // last number ("flexible-extract")
            let x = if extract.is_empty() {
                Extract::LastNumber
            } else {
                user
            };
            Ok((
                ex,
                scoring(x, false, stop(&["Question:", "</s>", "<|im_end|>", "\n\n"])),
            ))
        }
        "elementary_math_qa" | "multiemo" => {
            let dir = crate::assets::ensure(task)?;
            let mut files = Vec::new();
            collect_task_files(&dir, &mut files)?;
            if task == "multiemo" {
                // the English sentences (the other languages are translations of them)
                files.retain(|f| f.parent().is_some_and(|p| p.ends_with("en")));
            }
            files.sort();
            let mut ex = Vec::new();
            for f in &files {
                let sub = f
                    .parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .filter(|n| n != task)
                    .map_or(task.to_string(), |n| format!("{task}/{n}"));
                ex.extend(petal_data::tasks::bigbench(f, &sub)?);
            }
            if ex.is_empty() {
                bail!(
                    "{}: no task.json with multiple-choice examples",
                    dir.display()
                );
            }
            Ok((ex, scoring(Extract::Whole, false, stop(&["\n\n"]))))
        }
        file => {
            let p = Path::new(file);
            if !p.is_file() {
                bail!(
                    "--task {file}: neither a built-in task ({}) nor a file",
                    BUILT_IN.join(", ")
                );
            }
            let name = p.file_stem().map_or("task".into(), |s| s.to_string_lossy());
            let ex = petal_data::tasks::load_task_file(p, &name)?;
            Ok((ex, scoring(user, true, stop(&["\n\n"]))))
        }
    }
}

fn collect_task_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect_task_files(&p, out)?;
        } else if p.file_name().is_some_and(|n| n == "task.json") {
            out.push(p);
        }
    }
    Ok(())
}

/// Per-task counts.
#[derive(Default)]
struct Tally {
    n: usize,
    correct: usize,
    correct_norm: usize,
    choice: usize,
    unmatched: usize,
}

/// Scores `examples`: the report as JSON (`accuracy`, and for multiple choice `acc_norm`,
/// `examples`, `unmatched` generations, `tasks`), and one record an example (the choices'
/// log-likelihoods, or the generated text and what was read from it; whether right), in the
/// examples' order.
pub fn evaluate(
    model: &Llama,
    tok: &Tokenizer,
    examples: &[TaskExample],
    scoring: &Scoring,
    batch: usize,
    bar: &indicatif::ProgressBar,
) -> Result<(Value, Vec<Value>)> {
    let mut tally: BTreeMap<String, Tally> = BTreeMap::new();
    let mut samples = vec![Value::Null; examples.len()];
    let (choice, generate): (Vec<_>, Vec<_>) = examples
        .iter()
        .enumerate()
        .partition(|(_, e)| matches!(e.item, Item::Choice { .. }));
    for group in choice.chunks(batch.max(1)) {
        let exs: Vec<&TaskExample> = group.iter().map(|(_, e)| *e).collect();
        for ((i, e), (scores, acc, norm)) in group.iter().zip(choose(model, tok, &exs, batch)?) {
            let t = tally.entry(e.task.clone()).or_default();
            t.n += 1;
            t.choice += 1;
            t.correct += usize::from(acc);
            t.correct_norm += usize::from(norm);
            samples[*i] = json!({"index": i, "task": e.task, "loglikelihoods": scores,
                                 "correct": acc, "correct_norm": norm});
        }
        bar.inc(group.len() as u64);
    }
    let rows = row_adapter(model);
    for group in generate.chunks(batch.max(1)) {
        let exs: Vec<&TaskExample> = group.iter().map(|(_, e)| *e).collect();
        let texts = generated(model, tok, &exs, scoring, rows.as_deref())?;
        for ((i, e), text) in group.iter().zip(texts) {
            let Item::Generate { answer } = &e.item else {
                continue;
            };
            let gold = if scoring.extract_reference {
                scoring.extract.apply(answer)
            } else {
                Some(answer.trim().to_string())
            };
            let got = scoring.extract.apply(&text);
            let right = got.is_some() && got == gold;
            let t = tally.entry(e.task.clone()).or_default();
            t.n += 1;
            t.unmatched += usize::from(got.is_none());
            t.correct += usize::from(right);
            samples[*i] = json!({"index": i, "task": e.task, "output": text, "extracted": got,
                                 "reference": gold, "correct": right});
        }
        bar.inc(group.len() as u64);
    }
    let sum = |f: fn(&Tally) -> usize| tally.values().map(f).sum::<usize>();
    let (n, choices) = (sum(|t| t.n), sum(|t| t.choice));
    let mut out = json!({
        "accuracy": sum(|t| t.correct) as f64 / n.max(1) as f64,
        "examples": n,
        "unmatched": sum(|t| t.unmatched),
    });
    if choices > 0 {
        out["acc_norm"] = json!(sum(|t| t.correct_norm) as f64 / choices as f64);
    }
    if tally.len() > 1 {
        out["tasks"] = tally
            .iter()
            .map(|(k, t)| {
                let mut v =
                    json!({"accuracy": t.correct as f64 / t.n.max(1) as f64, "examples": t.n});
                if t.choice > 0 {
                    v["acc_norm"] = json!(t.correct_norm as f64 / t.choice as f64);
                }
                if t.unmatched > 0 {
                    v["unmatched"] = json!(t.unmatched);
                }
                (k.clone(), v)
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    Ok((out, samples))
}

/// For each multiple-choice example: its choices' log-likelihoods, whether the best one is the
/// answer, and whether the best per character is.
fn choose(
    model: &Llama,
    tok: &Tokenizer,
    group: &[&TaskExample],
    batch: usize,
) -> Result<Vec<(Vec<f64>, bool, bool)>> {
    // every (example, choice) as one sequence: its ids and where the choice's tokens begin
    let mut seqs = Vec::new();
    for e in group {
        let Item::Choice { choices, .. } = &e.item else {
            continue;
        };
        for c in choices {
            let (ids, from) = encode_pair(tok, &e.prompt, c)?;
            seqs.push(fit(ids, from, model.cfg.max_position_embeddings));
        }
    }
    let mut scores = Vec::with_capacity(seqs.len());
    for part in seqs.chunks(batch.max(1)) {
        scores.extend(continuation_logprobs(model, part)?);
    }
    let mut out = Vec::new();
    let mut at = 0;
    for e in group {
        let Item::Choice { choices, answer } = &e.item else {
            continue;
        };
        let s = &scores[at..at + choices.len()];
        at += choices.len();
        let best =
            |f: &dyn Fn(usize) -> f64| (0..s.len()).fold(0, |b, i| if f(i) > f(b) { i } else { b });
        let acc = best(&|i| s[i]);
        // per character of the choice, its leading space not counted (as the harness's
        // choices come without their delimiter)
        let norm = best(&|i| s[i] / choices[i].trim_start().chars().count().max(1) as f64);
        out.push((s.to_vec(), acc == *answer, norm == *answer));
    }
    Ok(out)
}

/// lm-evaluation-harness's `_encode_pair`: the context's trailing spaces move onto the
/// continuation, both are encoded without special tokens, and the continuation's tokens are
/// those of `context + continuation` after the context's; an empty context is the
/// end-of-sequence token. The ids and where the continuation begins.
fn encode_pair(tok: &Tokenizer, context: &str, continuation: &str) -> Result<(Vec<u32>, usize)> {
    let trimmed = context.trim_end();
    let moved = format!("{}{continuation}", &context[trimmed.len()..]);
    let whole = tok.encode(&format!("{trimmed}{moved}"), false)?;
    let ctx = tok.encode(trimmed, false)?;
    if ctx.is_empty() {
        let eos = tok.eos_id.unwrap_or(0);
        return Ok((std::iter::once(eos).chain(whole).collect(), 1));
    }
    let from = ctx.len().min(whole.len());
    Ok((whole, from))
}

/// `ids` cut from the front to the model's context (the choice's tokens kept), and where the
/// choice begins in it.
fn fit(ids: Vec<u32>, from: usize, context: usize) -> (Vec<u32>, usize) {
    let cut = ids.len().saturating_sub(context);
    (ids[cut..].to_vec(), from.saturating_sub(cut).max(1))
}

/// Sum of log p(ids[p] | ids[..p]) over p from each sequence's start of continuation, the
/// sequences run as one right-padded batch (causal: padding after a sequence cannot reach it).
fn continuation_logprobs(model: &Llama, seqs: &[(Vec<u32>, usize)]) -> Result<Vec<f64>> {
    let t = seqs.iter().map(|s| s.0.len()).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(seqs.len() * t);
    for (ids, _) in seqs {
        flat.extend_from_slice(ids);
        flat.extend(std::iter::repeat_n(0u32, t - ids.len()));
    }
    let ids = Tensor::from_vec(flat, (seqs.len(), t), model.device())?;
    let logits = model.forward(&ids, None, &Ctx::eval())?;
    let mut out = Vec::with_capacity(seqs.len());
    for (r, (ids, from)) in seqs.iter().enumerate() {
        let mut sum = 0.0f64;
        for p in *from..ids.len() {
            let row: Vec<f32> = logits.i((r, p - 1))?.to_vec1()?;
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            sum += row[ids[p] as usize] as f64 - lse;
        }
        out.push(sum);
    }
    Ok(out)
}

/// The adapter batched generation runs each row through (None: generate one at a time, with
/// every attached adapter active as in a plain forward): the one linear-layer adapter, or the
/// base model without one.
fn row_adapter(model: &Llama) -> Option<String> {
    let names = petal_core::mixed::adapter_names(model);
    let name = match names.as_slice() {
        [] => petal_core::mixed::BASE.to_string(),
        [one] => one.clone(),
        _ => return None,
    };
    petal_core::mixed::rows_ctx(model, &[name.as_str()]).ok()?;
    Some(name)
}

/// Greedy continuations of the prompts, batched where `rows` names the adapter.
fn generated(
    model: &Llama,
    tok: &Tokenizer,
    group: &[&TaskExample],
    scoring: &Scoring,
    rows: Option<&str>,
) -> Result<Vec<String>> {
    let params = petal_serve::SamplingParams {
        max_new_tokens: scoring.max_new_tokens,
        stop: scoring.stop.clone(),
        ..Default::default()
    };
    let context = model.cfg.max_position_embeddings;
    let ids = group
        .iter()
        .map(|e| {
            let ids = tok.encode(&e.prompt, false)?;
            // the prompt's end kept, with room for the answer
            let keep = context.saturating_sub(scoring.max_new_tokens + 1).max(1);
            Ok(ids[ids.len().saturating_sub(keep)..].to_vec())
        })
        .collect::<Result<Vec<_>>>()?;
    let Some(adapter) = rows else {
        return ids
            .iter()
            .map(|i| Ok(petal_serve::generate(model, tok, i, &params, &mut |_| {})?.text))
            .collect();
    };
    let reqs: Vec<petal_serve::Request> = ids
        .iter()
        .map(|prompt| petal_serve::Request {
            prompt,
            params: &params,
            adapter,
        })
        .collect();
    Ok(petal_serve::generate_batch(model, tok, &reqs)?
        .into_iter()
        .map(|g| g.text)
        .collect())
}
