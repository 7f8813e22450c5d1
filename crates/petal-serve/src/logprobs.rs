//! Log-probabilities of tokens, as OpenAI's APIs return them: for each generated (or, with
//! `echo`, prompt) token its log-probability under the model and the `top` most likely
//! alternatives at that position. Taken from the model's logits before any sampling setting
//! (temperature, top-k/p, repetition penalty) acts, as vLLM's default does: a score of the
//! text under the model, which is what evaluation harnesses sum.

use petal_data::Tokenizer;
use serde_json::{json, Map, Value};

/// Token `id`'s log-probability at one position, and the `top` alternatives there (most
/// likely first).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The most alternatives a request may ask for (vLLM's default `max_logprobs`).
pub const MAX_TOP: usize = 20;

/// The max of `logits` and the log-sum-exp of the logits shifted by it (no overflow, and no
/// rounding of a large max into a log-probability).
fn normaliser(logits: &[f32]) -> (f32, f64) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits
        .iter()
        .map(|&x| ((x - max) as f64).exp())
        .sum::<f64>()
        .ln();
    (max, lse)
}

/// `id`'s log-softmax of `logits`, in f64 (a sum of many stays exact enough).
pub fn logprob(logits: &[f32], id: u32) -> f64 {
    let (max, lse) = normaliser(logits);
    (logits[id as usize] - max) as f64 - lse
}

/// `id`'s log-softmax of `logits`, with the `top` largest (ties: the lower id first).
pub fn of(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let (max, lse) = normaliser(logits);
    let lp = |j: u32| ((logits[j as usize] - max) as f64 - lse) as f32;
    let mut best: Vec<u32> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            let better = |j: &u32| logits[*j as usize] < x;
            if best.len() < top || best.last().is_some_and(better) {
                let at = best.partition_point(|&j| logits[j as usize] >= x);
                best.insert(at, i as u32);
                best.truncate(top);
            }
        }
    }
    TokenLogprob {
        id,
        logprob: lp(id),
        top: best.into_iter().map(|j| (j, lp(j))).collect(),
    }
}

/// A token as text (alone: a byte-level piece of a character comes out as U+FFFD).
fn piece(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// `/v1/completions`' `logprobs` object: the `prompt` tokens first (echoed; empty without
/// `echo`), `prompt_lps` being those of its second token on (its first has none: nothing
/// precedes it), then the `generated` ones: token strings, their log-probabilities, the top
/// alternatives as {token: logprob} and each token's offset in the choice's text.
pub fn completion(
    tok: &Tokenizer,
    prompt: &[u32],
    prompt_lps: &[TokenLogprob],
    generated: &[TokenLogprob],
    top: usize,
) -> Value {
    let (mut tokens, mut values, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    let mut at = 0usize;
    let mut push = |id: u32, lp: Option<&TokenLogprob>| {
        let s = piece(tok, id);
        offsets.push(at);
        at += s.chars().count();
        tokens.push(s);
        values.push(lp.map_or(Value::Null, |l| json!(l.logprob)));
        tops.push(lp.map_or(Value::Null, |l| {
            let mut m = Map::new();
            for &(j, v) in l.top.iter().take(top) {
                m.entry(piece(tok, j)).or_insert(json!(v));
            }
            Value::Object(m)
        }));
    };
    for (i, &id) in prompt.iter().enumerate() {
        push(id, i.checked_sub(1).and_then(|j| prompt_lps.get(j)));
    }
    for l in generated {
        push(l.id, Some(l));
    }
    json!({"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets})
}

/// `/v1/chat/completions`' `logprobs` object: `{"content": [{token, logprob, bytes,
/// top_logprobs: [{token, logprob, bytes}]}]}`.
pub fn chat(tok: &Tokenizer, lps: &[TokenLogprob], top: usize) -> Value {
    let entry = |id: u32, lp: f32| {
        let s = piece(tok, id);
        json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.id, l.logprob);
            e["top_logprobs"] = l.top.iter().take(top).map(|&(j, v)| entry(j, v)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_of_a_token_and_its_top_alternatives_match_the_closed_form() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let l = of(&logits, 4, 3);
        assert!((l.logprob as f64 - (0.5 - z.ln())).abs() < 1e-6);
        let ids: Vec<u32> = l.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 0], "largest first, ties by lower id");
        let total: f64 = logits
            .iter()
            .map(|&x| (of(&logits, 0, 0).logprob as f64 + (x - logits[0]) as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "probabilities sum to {total}");
        assert!(of(&logits, 2, 0).top.is_empty());
        // large logits do not overflow
        let big = [1000.0f32, 999.0];
        assert!((of(&big, 1, 1).logprob - (-1.0 - (1.0f32 + (-1.0f32).exp()).ln())).abs() < 1e-5);
    }
}
