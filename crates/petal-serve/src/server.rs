//! `petal serve`: one base model and many adapters behind an HTTP server with the shape of the
//! OpenAI completions API, the way vLLM serves LoRA adapters: the request's `model` field names
//! the adapter (the base model's id, or `__base__`, for none). Every request runs through its
//! own adapter with no merging, swapping or reloading (`petal_core::with_adapter_rows`), so
//! any number of loaded adapters are served side by side.
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` (`prompt`) and
//! `POST /v1/chat/completions` (`messages`, rendered with the model's chat template). Sampling
//! fields: `max_tokens` (default 16, as OpenAI), `temperature` (default 1; 0 is greedy),
//! `top_p`, `top_k`, `repetition_penalty`, `stop` (a string or a list), `seed`. Fields this
//! server does not read are ignored, as OpenAI clients send many; `stream` and `n` > 1 are
//! refused with a 400. Completions are decoded together with continuous batching (`Decoder`:
//! up to `max_batch` sequences, each through its own adapter and KV cache; a request arriving
//! mid-way joins at the next step, each is answered when it finishes); the response's
//! `petal.batch` says with how many at most.
//!
//! Errors come back as OpenAI's `{"error": {"message", "type", "code"}}` with a 4xx status: bad
//! JSON (with its line and column), a missing or mistyped field, an unknown adapter (the
//! available ones listed), a prompt longer than the context.

use crate::{Decoder, Generated, SamplingParams, StopReason};
use petal_core::mixed::{with_adapter_rows, BASE};
use petal_core::Adaptable;
use petal_data::template::Message;
use petal_data::Tokenizer;
use petal_models::Llama;
use serde_json::{json, Value};
use std::io::Read;

/// What the server serves.
pub struct Served<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a Tokenizer,
    /// The base model's id in `/v1/models` and responses (e.g. the model path or hub id).
    pub model_id: String,
    /// The most completions generated together (those waiting when the server turns to them).
    pub max_batch: usize,
}

/// A completion to generate: prompt ids, sampling, adapter (`BASE`: none), chat or not.
struct Job {
    ids: Vec<u32>,
    params: SamplingParams,
    adapter: String,
    chat: bool,
}

/// A request answered at once, or a completion to generate.
enum Handled {
    Now(Value),
    Job(Job),
}

/// Sends `r` as JSON (a failure as OpenAI's error object with its status).
fn respond(req: tiny_http::Request, r: Result<Value, Failure>) {
    let (status, body) = match r {
        Ok(v) => (200, v),
        Err(Failure(status, kind, message)) => (
            status,
            json!({"error": {"message": message, "type": kind, "code": status}}),
        ),
    };
    let mut resp = tiny_http::Response::from_string(body.to_string()).with_status_code(status);
    if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", "application/json") {
        resp = resp.with_header(h);
    }
    // a client that hung up is its own loss, not the server's
    let _ = req.respond(resp);
}

/// A failed request: HTTP status, OpenAI error type, message.
#[derive(Debug)]
struct Failure(u16, &'static str, String);

fn bad(msg: impl Into<String>) -> Failure {
    Failure(400, "invalid_request_error", msg.into())
}

impl Served<'_> {
    /// The adapters requests may name, sorted.
    pub fn adapters(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .model
            .linears()
            .iter()
            .flat_map(|l| l.adapter_names())
            .map(str::to_string)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Serves `http`'s requests until it is unblocked (`tiny_http::Server::unblock`) or fails.
    /// Continuous batching: between decoding steps, the requests that have arrived are taken
    /// (a completion is prefilled and joins the batch while there is room, up to
    /// `max_batch`), and each completion is answered as soon as it finishes. Refuses at once a
    /// model whose adapters cannot be chosen per request (prompt learning, active LN tuning).
    pub fn serve(&self, http: &tiny_http::Server) -> petal_core::Result<()> {
        with_adapter_rows(self.model, &[BASE], || Ok(()))?;
        let mut dec: Decoder<(tiny_http::Request, Job)> = Decoder::new(self.model, self.tokenizer);
        loop {
            if dec.is_empty() {
                match http.recv() {
                    Ok(req) => self.take(req, &mut dec),
                    Err(_) => break, // unblocked
                }
            }
            while dec.len() < self.max_batch.max(1) {
                match http.try_recv() {
                    Ok(Some(req)) => self.take(req, &mut dec),
                    _ => break,
                }
            }
            match dec.step() {
                Ok(done) => {
                    for f in done {
                        let ((req, job), g) = (f.key, f.generated);
                        respond(req, Ok(self.completion(&job, &g, f.batch)));
                    }
                }
                Err((keys, e)) => {
                    for (req, _) in keys {
                        respond(req, Err(Failure(500, "server_error", e.to_string())));
                    }
                }
            }
        }
        Ok(())
    }

    /// Answers `req` at once, or prefills its completion into the batch.
    fn take(&self, mut req: tiny_http::Request, dec: &mut Decoder<(tiny_http::Request, Job)>) {
        match self.handle(&mut req) {
            Ok(Handled::Now(v)) => respond(req, Ok(v)),
            Err(f) => respond(req, Err(f)),
            Ok(Handled::Job(job)) => {
                let (ids, params, adapter) =
                    (job.ids.clone(), job.params.clone(), job.adapter.clone());
                match dec.add((req, job), &ids, params, &adapter) {
                    Ok(None) => {}
                    Ok(Some(f)) => {
                        let ((req, job), g) = (f.key, f.generated);
                        respond(req, Ok(self.completion(&job, &g, f.batch)));
                    }
                    Err(((req, _), e)) => {
                        respond(req, Err(Failure(500, "server_error", e.to_string())))
                    }
                }
            }
        }
    }

    fn handle(&self, req: &mut tiny_http::Request) -> Result<Handled, Failure> {
        use tiny_http::Method::{Get, Post};
        let path = req.url().split('?').next().unwrap_or("").to_string();
        match (req.method(), path.as_str()) {
            (Get, "/health") => Ok(Handled::Now(json!({"status": "ok"}))),
            (Get, "/v1/models") => Ok(Handled::Now(self.models())),
            (Post, "/v1/completions") => Ok(Handled::Job(self.job(&body(req)?, false)?)),
            (Post, "/v1/chat/completions") => Ok(Handled::Job(self.job(&body(req)?, true)?)),
            (_, "/health" | "/v1/models" | "/v1/completions" | "/v1/chat/completions") => {
                Err(Failure(
                    405,
                    "invalid_request_error",
                    format!("{} {path}: method not allowed", req.method()),
                ))
            }
            _ => Err(Failure(
                404,
                "not_found_error",
                format!("no endpoint {path}"),
            )),
        }
    }

    fn models(&self) -> Value {
        let mut data = vec![json!({"id": self.model_id, "object": "model", "owned_by": "petal"})];
        for a in self.adapters() {
            data.push(
                json!({"id": a, "object": "model", "owned_by": "petal", "parent": self.model_id}),
            );
        }
        json!({"object": "list", "data": data})
    }

    /// The adapter a request's `model` field names (`BASE` for the base model).
    fn adapter(&self, req: &Value) -> Result<String, Failure> {
        let name = match req.get("model") {
            None | Some(Value::Null) => return Ok(BASE.to_string()),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(bad("`model` must be a string")),
        };
        if name == self.model_id || name == BASE {
            return Ok(BASE.to_string());
        }
        let known = self.adapters();
        if known.contains(&name) {
            return Ok(name);
        }
        Err(Failure(
            404,
            "not_found_error",
            format!(
                "model `{name}` is not served (serving: {}{})",
                self.model_id,
                known.iter().map(|a| format!(", {a}")).collect::<String>()
            ),
        ))
    }

    /// A completion request checked and tokenized.
    fn job(&self, req: &Value, chat: bool) -> Result<Job, Failure> {
        if req.get("stream").and_then(Value::as_bool) == Some(true) {
            return Err(bad(
                "`stream`: streaming responses are not supported yet; send stream: false",
            ));
        }
        if req.get("n").and_then(Value::as_u64).is_some_and(|n| n != 1) {
            return Err(bad("`n`: one completion per request"));
        }
        let adapter = self.adapter(req)?;
        let ids = if chat {
            self.chat_ids(req)?
        } else {
            let prompt = match req.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    a[0].as_str().unwrap_or_default().to_string()
                }
                Some(_) => return Err(bad("`prompt` must be a string (or a list of one)")),
                None => return Err(bad("`prompt` is required")),
            };
            self.tokenizer
                .encode(&prompt, true)
                .map_err(|e| bad(e.to_string()))?
        };
        if ids.is_empty() {
            return Err(bad("the prompt is empty"));
        }
        let ctx = self.model.cfg.max_position_embeddings;
        if ids.len() >= ctx {
            return Err(bad(format!(
                "the prompt has {} tokens; the model's context is {ctx}",
                ids.len()
            )));
        }
        Ok(Job {
            ids,
            params: sampling(req)?,
            adapter,
            chat,
        })
    }

    /// The OpenAI-style response to `job`, generated as `g` in a batch of `batch`.
    fn completion(&self, job: &Job, g: &Generated, batch: usize) -> Value {
        let finish = match g.stop {
            StopReason::Eos | StopReason::StopString => "stop",
            StopReason::MaxTokens | StopReason::ContextFull => "length",
        };
        let name = if job.adapter == BASE {
            self.model_id.as_str()
        } else {
            job.adapter.as_str()
        };
        let chat = job.chat;
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": g.text, "logprobs": null, "finish_reason": finish})
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let n = job.ids.len();
        json!({
            "id": format!("{}-{created}", if chat { "chatcmpl" } else { "cmpl" }),
            "object": if chat { "chat.completion" } else { "text_completion" },
            "created": created,
            "model": name,
            "choices": [choice],
            "usage": {"prompt_tokens": n, "completion_tokens": g.ids.len(), "total_tokens": n + g.ids.len()},
            // petal's own: the most sequences decoded together with this one (itself included)
            "petal": {"batch": batch},
        })
    }

    fn chat_ids(&self, req: &Value) -> Result<Vec<u32>, Failure> {
        let msgs = req
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("`messages` (a list of {role, content}) is required"))?;
        let msgs = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let field = |k: &str| {
                    m.get(k)
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("messages[{i}].{k} must be a string")))
                };
                Ok(Message {
                    role: field("role")?,
                    content: field("content")?,
                })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        let t = self
            .tokenizer
            .chat_template
            .as_ref()
            .ok_or_else(|| bad("this model has no chat template: use /v1/completions"))?;
        let text = t.render(&msgs, true).map_err(|e| bad(e.to_string()))?;
        self.tokenizer
            .encode(&text, true)
            .map_err(|e| bad(e.to_string()))
    }
}

/// The request body as JSON.
fn body(req: &mut tiny_http::Request) -> Result<Value, Failure> {
    let mut text = String::new();
    req.as_reader()
        .take(16 << 20)
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("reading the request body: {e}")))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("the request body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("the request body must be a JSON object"));
    }
    Ok(v)
}

/// Sampling settings from a request, with OpenAI's defaults.
fn sampling(req: &Value) -> Result<SamplingParams, Failure> {
    let num = |k: &str| -> Result<Option<f64>, Failure> {
        match req.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(format!("`{k}` must be a number"))),
        }
    };
    let count = |k: &str| -> Result<Option<usize>, Failure> {
        match num(k)? {
            None => Ok(None),
            Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as usize)),
            Some(x) => Err(bad(format!("`{k}` must be a whole number >= 0, not {x}"))),
        }
    };
    let stop = match req.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`stop` must be a string or a list of strings"))?,
        Some(_) => return Err(bad("`stop` must be a string or a list of strings")),
    };
    let temperature = num("temperature")?.unwrap_or(1.0);
    if temperature < 0.0 {
        return Err(bad("`temperature` must be >= 0"));
    }
    let top_p = num("top_p")?.filter(|p| *p < 1.0);
    if top_p.is_some_and(|p| p <= 0.0) {
        return Err(bad("`top_p` must be in (0, 1]"));
    }
    Ok(SamplingParams {
        temperature,
        top_k: count("top_k")?.filter(|k| *k > 0),
        top_p,
        repetition_penalty: num("repetition_penalty")?.unwrap_or(1.0),
        max_new_tokens: count("max_tokens")?.unwrap_or(16),
        stop,
        seed: count("seed")?.unwrap_or(0) as u64,
    })
}
