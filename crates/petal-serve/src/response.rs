//! The answers' JSON, in the shape of OpenAI's completions and chat completions: one choice a
//! generated sequence (`index` = prompt x `n` + its number among the prompt's `n`), gathered
//! into one response (or streamed as chunks, each naming its choice's index), with usage.

use crate::logprobs::{self, TokenLogprob};
use crate::request::{Job, Prompt};
use crate::server::Served;
use crate::{Generated, StopReason};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::rc::Rc;
use tokio::sync::mpsc::UnboundedSender;

/// A request's choices as they finish, until the last.
pub(crate) struct Answer {
    pub choices: Vec<Value>,
    /// sequences still generating
    pub left: usize,
    pub completion_tokens: usize,
    /// the most sequences any of its choices was decoded together with
    pub batch: usize,
    /// an error went back already: the other choices are dropped
    pub failed: bool,
    /// each prompt's tokens taken from the prefix cache
    pub cached: Vec<usize>,
}

impl Answer {
    pub fn new(choices: usize, prompts: usize) -> Rc<RefCell<Answer>> {
        Rc::new(RefCell::new(Answer {
            choices: vec![Value::Null; choices],
            left: choices,
            completion_tokens: 0,
            batch: 0,
            failed: false,
            cached: vec![0; prompts],
        }))
    }
}

/// One sequence in the batch: where its request's answer goes (the HTTP side's channel), the
/// request, which choice it is, and the answer it is gathered into.
pub(crate) struct Key {
    pub out: UnboundedSender<Out>,
    pub job: Rc<Job>,
    pub index: usize,
    pub answer: Rc<RefCell<Answer>>,
}

use crate::http::Out;

impl Key {
    pub fn prompt(&self) -> &Prompt {
        &self.job.prompts[self.index / self.job.asked.n]
    }
}

/// OpenAI's finish reason for a stop.
pub(crate) fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}

impl Served<'_> {
    /// A finished sequence's choice (not streamed).
    pub(crate) fn choice(&self, key: &Key, g: &Generated) -> Value {
        let (job, finish) = (&key.job, finish_reason(g.stop));
        let top = job.asked.top;
        if job.chat {
            let lps = top.map_or(Value::Null, |t| {
                logprobs::chat(self.tokenizer, &g.logprobs, t)
            });
            return json!({"index": key.index, "message": {"role": "assistant", "content": g.text},
                "logprobs": lps, "finish_reason": finish});
        }
        let p = key.prompt();
        let echo = job.asked.echo;
        let lps = top.map_or(Value::Null, |t| {
            let (ids, plps) = if echo {
                (&p.ids[..], &g.prompt_logprobs[..])
            } else {
                (&[][..], &[][..])
            };
            logprobs::completion(self.tokenizer, ids, plps, &g.logprobs, t)
        });
        let text = if echo {
            format!("{}{}", p.text, g.text)
        } else {
            g.text.clone()
        };
        json!({"index": key.index, "text": text, "logprobs": lps, "finish_reason": finish})
    }

    /// The whole response once every choice has finished.
    pub(crate) fn completion(&self, job: &Job, a: &Answer) -> Value {
        let mut v = self.envelope(job, a.choices.clone(), false);
        v["usage"] = usage(job, a);
        // petal's own: the most sequences decoded together with its choices (themselves included)
        v["petal"] = json!({"batch": a.batch});
        v
    }

    /// One streamed event of choice `key.index`: a piece of text with its tokens'
    /// log-probabilities, or (with `finish`) the closing one.
    pub(crate) fn chunk(
        &self,
        key: &Key,
        text: &str,
        lps: &[TokenLogprob],
        finish: Option<&str>,
    ) -> Value {
        let job = &key.job;
        let top = job.asked.top;
        let choice = if job.chat {
            let delta = if text.is_empty() {
                json!({})
            } else {
                json!({"content": text})
            };
            let lps = top
                .filter(|_| !lps.is_empty())
                .map_or(Value::Null, |t| logprobs::chat(self.tokenizer, lps, t));
            json!({"index": key.index, "delta": delta, "logprobs": lps, "finish_reason": finish})
        } else {
            let lps = top.filter(|_| !lps.is_empty()).map_or(Value::Null, |t| {
                logprobs::completion(self.tokenizer, &[], &[], lps, t)
            });
            json!({"index": key.index, "text": text, "logprobs": lps, "finish_reason": finish})
        };
        self.envelope(job, vec![choice], true)
    }

    /// The last chunk of a stream: the closing one of its last choice, with the usage.
    pub(crate) fn closing(&self, key: &Key, stop: StopReason, a: &Answer) -> Value {
        let mut last = self.chunk(key, "", &[], Some(finish_reason(stop)));
        if a.left == 0 {
            last["usage"] = usage(&key.job, a);
            last["petal"] = json!({"batch": a.batch});
        }
        last
    }

    /// id, object, created, model and the choices of a response or streamed chunk.
    fn envelope(&self, job: &Job, choices: Vec<Value>, chunk: bool) -> Value {
        let name = if job.adapter == petal_core::mixed::BASE {
            self.model_id.as_str()
        } else {
            job.adapter.as_str()
        };
        let object = match (job.chat, chunk) {
            (true, false) => "chat.completion",
            (true, true) => "chat.completion.chunk",
            (false, _) => "text_completion",
        };
        let created = job.created;
        json!({
            "id": format!("{}-{created}", if job.chat { "chatcmpl" } else { "cmpl" }),
            "object": object,
            "created": created,
            "model": name,
            "choices": choices,
        })
    }
}

/// Prompt tokens (each prompt once, whatever `n`; those found in the prefix cache in
/// `prompt_tokens_details`, as OpenAI reports cached tokens) and generated ones.
fn usage(job: &Job, a: &Answer) -> Value {
    let prompt: usize = job.prompts.iter().map(|p| p.ids.len()).sum();
    let completion = a.completion_tokens;
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": a.cached.iter().sum::<usize>()}})
}
