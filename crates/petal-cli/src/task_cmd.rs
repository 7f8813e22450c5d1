//! `petal eval --task`: accuracy on a task (petal-data's `tasks.rs` formats). Multiple-choice
//! examples are scored as lm-evaluation-harness scores them: each choice's log-likelihood
//! after the prompt, `acc` the share whose best choice is the answer, `acc_norm` the same with
//! each log-likelihood divided by the choice's length in characters. Generation examples are
//! generated greedily (batched) and scored by exact match after the answer extractor.

use anyhow::{bail, Result};
use candle_core::Tensor;
use petal_core::Ctx;
use petal_data::tasks::{Extract, Item, TaskExample};
use petal_data::Tokenizer;
use petal_models::Llama;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Built-in tasks on the data `petal assets` fetches.
pub const BUILT_IN: [&str; 5] = [
    "gsm8k",
    "elementary_math_qa",
    "multiemo",
    "spamassassin",
    "mmlu",
];

/// How a task is scored besides its examples.
pub struct Scoring {
    pub extract: Extract,
    /// Applied to generation references too (a task file's answers); built-ins give theirs
    /// already extracted
    pub extract_reference: bool,
    pub stop: Vec<String>,
    pub max_new_tokens: usize,
}

/// A task's examples and scoring: a built-in name or a JSONL file. `chat`: the prompts will go
/// through a chat template, whose replies may hold blank lines (the end of the assistant's turn
/// ends them), so a blank line is no default stop.
pub fn load(
    task: &str,
    extract: &str,
    stop: &[String],
    max_new: usize,
    chat: bool,
) -> Result<(Vec<TaskExample>, Scoring)> {
    let user = Extract::parse(extract).map_err(anyhow::Error::msg)?;
    let stop = |default: &[&str]| -> Vec<String> {
        if stop.is_empty() {
            let kept = default.iter().filter(|s| !(chat && **s == "\n\n"));
            kept.map(|s| s.to_string()).collect()
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
            // BIG-bench's task.json files, unpacked as SUBTASK.json
            let dir = crate::assets::ensure(task)?;
            let pick: &[&str] = if task == "multiemo" {
                // the English texts of every domain (the other languages translate them)
                &["all_text_en"]
            } else {
                // the questions alone first, then with each kind of hint
                &[
                    "question_only",
                    "question_with_mathematical_hint",
                    "question_with_language_hint",
                    "mathematical_hint_only",
                    "language_hint_only",
                ]
            };
            let mut ex = Vec::new();
            for sub in pick {
                let f = dir.join(format!("{sub}.json"));
                ex.extend(petal_data::tasks::bigbench(&f, &format!("{task}/{sub}"))?);
            }
            Ok((ex, scoring(Extract::Whole, false, stop(&["\n\n"]))))
        }
        "mmlu" => {
            let p = crate::assets::ensure(task)?;
            let ex = petal_data::tasks::mmlu(&p)?;
            Ok((ex, scoring(Extract::Whole, false, stop(&["\n\n"]))))
        }
        "spamassassin" => {
            let dir = crate::assets::ensure(task)?;
            let ex = petal_data::tasks::spamassassin(&dir)?;
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
            let (ex, said) = petal_data::tasks::load_task_file(p, &name)?;
            // the file's own scoring (a dumped built-in's), unless the flags give one
            let x = match &said.extract {
                Some(x) if extract.is_empty() => Extract::parse(x).map_err(anyhow::Error::msg)?,
                _ => user,
            };
            let default: Vec<&str> = said
                .stop
                .as_ref()
                .map_or(vec!["\n\n"], |s| s.iter().map(String::as_str).collect());
            Ok((ex, scoring(x, true, stop(&default))))
        }
    }
}

/// An example in the task-file form (`load_task_file` reads it back as it was); a generation
/// example carries `scoring`'s extractor and stops, so that it scores as it did.
pub fn as_json(e: &TaskExample, scoring: &Scoring) -> Value {
    let mut v = match &e.item {
        Item::Choice { choices, answer } => {
            json!({"prompt": e.prompt, "choices": choices, "answer": answer, "task": e.task})
        }
        Item::Generate { answer } => json!({"prompt": e.prompt, "answer": answer, "task": e.task,
                                            "extract": scoring.extract.as_arg(), "stop": scoring.stop}),
    };
    if !e.description.is_empty() {
        v["description"] = json!(e.description);
    }
    v
}

/// Refuses to dump examples whose references a task file would read differently: a built-in's
/// references are stored already read (GSM8K's number), while a file's pass through its
/// extractor, so an extractor that does not give them back as they are would score nothing.
pub fn dumpable(examples: &[TaskExample], scoring: &Scoring) -> Result<()> {
    if scoring.extract_reference {
        return Ok(());
    }
    for (i, e) in examples.iter().enumerate() {
        if let Item::Generate { answer } = &e.item {
            if scoring.extract.apply(answer).as_deref() != Some(answer.trim()) {
                bail!(
                    "--dump-task: --extract `{}` reads example {i}'s reference `{answer}` as \
                     something else, and a dumped task reads its references through it: leave \
                     --extract out to keep the task's own",
                    scoring.extract.as_arg()
                );
            }
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
    /// tokens generated
    tokens: usize,
}

/// Scores `examples`: the report as JSON (`accuracy`, and for multiple choice `acc_norm`,
/// `examples`, `unmatched` generations, `generated_tokens`, `tasks`), and one record an
/// example (the choices' log-likelihoods, or the generated text and what was read from it;
/// whether right), in the examples' order.
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
        for ((i, e), (scores, acc, norm)) in group.iter().zip(choose(model, tok, &exs)?) {
            let t = tally.entry(e.task.clone()).or_default();
            t.n += 1;
            t.choice += 1;
            t.correct += usize::from(acc);
            t.correct_norm += usize::from(norm);
            let Item::Choice { choices, answer } = &e.item else {
                continue;
            };
            samples[*i] = json!({"index": i, "task": e.task, "prompt": e.prompt,
                                 "choices": choices, "answer": answer, "loglikelihoods": scores,
                                 "correct": acc, "correct_norm": norm});
        }
        bar.inc(group.len() as u64);
    }
    let exs: Vec<&TaskExample> = generate.iter().map(|(_, e)| *e).collect();
    generated(model, tok, &exs, scoring, batch, &mut |k, text, tokens| {
        let (i, e) = generate[k];
        let Item::Generate { answer } = &e.item else {
            return;
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
        t.tokens += tokens;
        t.correct += usize::from(right);
        samples[i] = json!({"index": i, "task": e.task, "prompt": e.prompt, "output": text,
                            "extracted": got, "reference": gold, "correct": right});
        bar.inc(1);
    })?;
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
    if choices < n {
        out["generated_tokens"] = json!(sum(|t| t.tokens));
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
/// answer, and whether the best per character is. The prompt is read once into a KV cache and
/// each choice continued from a copy of it.
fn choose(
    model: &Llama,
    tok: &Tokenizer,
    group: &[&TaskExample],
) -> Result<Vec<(Vec<f64>, bool, bool)>> {
    let mut out = Vec::new();
    for e in group {
        let Item::Choice { choices, answer } = &e.item else {
            continue;
        };
        let s = choice_logprobs(model, tok, &e.prompt, choices)?;
        let best =
            |f: &dyn Fn(usize) -> f64| (0..s.len()).fold(0, |b, i| if f(i) > f(b) { i } else { b });
        let acc = best(&|i| s[i]);
        // per character of the choice, its leading space not counted (as the harness's
        // choices come without their delimiter)
        let norm = best(&|i| s[i] / choices[i].trim_start().chars().count().max(1) as f64);
        out.push((s.clone(), acc == *answer, norm == *answer));
    }
    Ok(out)
}

/// lm-evaluation-harness's `_encode_pair`: the context's trailing spaces move onto the
/// continuation, both are encoded without special tokens, and the continuation's tokens are
/// those of `context + continuation` after the context's length; an empty context is the
/// end-of-sequence token. The context's ids and the continuation's.
fn encode_pair(tok: &Tokenizer, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let moved = format!("{}{continuation}", &context[trimmed.len()..]);
    let whole = tok.encode(&format!("{trimmed}{moved}"), false)?;
    let ctx = tok.encode(trimmed, false)?;
    let cont = whole[ctx.len().min(whole.len())..].to_vec();
    if ctx.is_empty() {
        return Ok((vec![tok.eos_id.unwrap_or(0)], cont));
    }
    Ok((ctx, cont))
}

/// Sum of the continuation tokens' log-probabilities for each choice after `prompt`: the
/// prompt's tokens (cut from the front to leave room for the longest choice in the model's
/// context) through the model once, each choice's tokens after a copy of its KV cache.
fn choice_logprobs(
    model: &Llama,
    tok: &Tokenizer,
    prompt: &str,
    choices: &[String],
) -> Result<Vec<f64>> {
    let pairs = choices
        .iter()
        .map(|c| encode_pair(tok, prompt, c))
        .collect::<Result<Vec<_>>>()?;
    // the context is the same for every choice (it depends on the prompt alone)
    let ctx_ids = &pairs[0].0;
    let longest = pairs.iter().map(|p| p.1.len()).max().unwrap_or(0);
    let room = model
        .cfg
        .max_position_embeddings
        .saturating_sub(longest)
        .max(1);
    let ctx_ids = &ctx_ids[ctx_ids.len().saturating_sub(room)..];
    let dev = model.device();
    let ctx = Ctx::eval();
    // the context through the model, rotated as one pass over `span` tokens (context and
    // choice) would be: its cache and the hidden state that predicts a choice's first token
    let context = |span: usize| -> Result<(petal_models::KvCache, Tensor)> {
        let mut cache = model.new_cache();
        cache.set_rope_span(span);
        let ids = Tensor::new(ctx_ids, dev)?.unsqueeze(0)?;
        let h = model.hidden_states(&ids, Some(&mut cache), &ctx)?;
        // the last position: prompt tuning's virtual tokens lead h, so it is not ctx_ids' last
        let last = h.dim(1)? - 1;
        Ok((cache, h.narrow(1, last, 1)?.squeeze(0)?))
    };
    // once for every choice, except under LongRoPE, whose tables depend on the whole pass's
    // length (lm-evaluation-harness runs context and choice as one pass): once per length;
    // with its logits for a choice's first token
    let mut passes = std::collections::HashMap::new();
    let span = |cont: &[u32]| {
        model
            .rope_switch()
            .map_or(0, |_| ctx_ids.len() + cont.len() - 1)
    };
    // each choice's later tokens: hidden states after its earlier ones, from a copy of the cache
    let mut rows = Vec::new();
    for (_, cont) in pairs.iter().filter(|p| !p.1.is_empty()) {
        let span = span(cont);
        if let std::collections::hash_map::Entry::Vacant(e) = passes.entry(span) {
            let (cache, last) = context(span)?;
            let first: Vec<f32> = model
                .head(&last, &ctx)?
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            e.insert((cache, first));
        }
        if cont.len() > 1 {
            let mut c = passes[&span].0.clone();
            let x = Tensor::new(&cont[..cont.len() - 1], dev)?.unsqueeze(0)?;
            rows.push(model.hidden_states(&x, Some(&mut c), &ctx)?.squeeze(0)?);
        }
    }
    // the head once over every choice's later positions
    let later: Vec<Vec<f32>> = match rows.is_empty() {
        true => Vec::new(),
        false => model
            .head(&Tensor::cat(&rows, 0)?, &ctx)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?,
    };
    let mut later = later.iter();
    let mut out = Vec::with_capacity(pairs.len());
    for (_, cont) in &pairs {
        let Some((&id, rest)) = cont.split_first() else {
            out.push(0.0);
            continue;
        };
        let first = petal_serve::logprobs::logprob(&passes[&span(cont)].1, id);
        let rest: f64 = rest
            .iter()
            .zip(later.by_ref())
            .map(|(&id, row)| petal_serve::logprobs::logprob(row, id))
            .sum();
        out.push(first + rest);
    }
    Ok(out)
}

/// Greedy continuations of the prompts, each given to `done` with its index in `prompts` and
/// its length in tokens as it finishes: up to `batch` decoded together, each through the model
/// as it is (every attached adapter active, as in a plain forward), and a finished one's place
/// taken by the next prompt at once (continuous batching: a long answer holds up no other).
fn generated(
    model: &Llama,
    tok: &Tokenizer,
    prompts: &[&TaskExample],
    scoring: &Scoring,
    batch: usize,
    done: &mut dyn FnMut(usize, String, usize),
) -> Result<()> {
    let params = petal_serve::SamplingParams {
        max_new_tokens: scoring.max_new_tokens,
        stop: scoring.stop.clone(),
        ..Default::default()
    };
    let context = model.cfg.max_position_embeddings;
    // the prompt's end kept, with room for the answer and an input-side adapter's positions
    let room = scoring.max_new_tokens + 1 + model.virtual_positions();
    let keep = context.saturating_sub(room).max(1);
    let ids = prompts
        .iter()
        .map(|e| {
            let ids = tok.encode(&e.prompt, false)?;
            Ok(ids[ids.len().saturating_sub(keep)..].to_vec())
        })
        .collect::<Result<Vec<_>>>()?;
    let reqs: Vec<_> = ids
        .iter()
        .map(|prompt| petal_serve::Request {
            prompt,
            params: &params,
            adapter: petal_core::mixed::ACTIVE,
        })
        .collect();
    petal_serve::generate_continuous(model, tok, &reqs, batch, &mut |k, g| {
        done(k, g.text, g.ids.len())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_is_refused_where_its_extractor_would_not_read_the_references_back() {
        let ex = vec![TaskExample {
            task: "t".into(),
            prompt: "Question: 2 + 2?\nAnswer:".into(),
            item: Item::Generate { answer: "4".into() },
            description: String::new(),
        }];
        let with = |extract: &str, extract_reference| Scoring {
            extract: Extract::parse(extract).unwrap(),
            extract_reference,
            stop: vec![],
            max_new_tokens: 8,
        };
        for ok in ["last-number", "whole", r"(\d+)"] {
            dumpable(&ex, &with(ok, false)).unwrap();
        }
        let e = dumpable(&ex, &with(r"#### (\d+)", false)).unwrap_err();
        assert!(e.to_string().contains("example 0's reference `4`"), "{e}");
        // a file's references are read through the extractor already: nothing changes
        dumpable(&ex, &with(r"#### (\d+)", true)).unwrap();
    }
}
