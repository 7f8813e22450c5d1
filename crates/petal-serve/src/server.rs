//! `petal serve`: one base model and many adapters behind an HTTP server with the shape of the
//! OpenAI completions API, the way vLLM serves LoRA adapters: the request's `model` field names
//! the adapter (the base model's id, or `__base__`, for none). Every request runs through its
//! own adapter with no merging, swapping or reloading (`petal_core::rows_ctx`), so
//! any number of loaded adapters are served side by side.
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` (`prompt`) and
//! `POST /v1/chat/completions` (`messages`, rendered with the model's chat template). Sampling
//! fields: `max_tokens` (default 16, as OpenAI, >= 1), `temperature` (default 1, in 0..2;
//! below 1e-5 is greedy), `top_p` in (0, 1], `top_k` >= 0, `repetition_penalty` > 0, `stop` (a
//! string or a list), `seed`; out of range: a 400 naming the field. Fields this
//! server does not read are ignored, as OpenAI clients send many; `n` > 1 is refused with a
//! 400. `"stream": true` answers with server-sent events (chunked) as the text is generated,
//! OpenAI's chunk objects, a closing chunk with the finish reason and usage, then `[DONE]`;
//! text that could begin a stop string is held back until it cannot. Completions are decoded together with continuous batching (`Decoder`:
//! up to `max_batch` sequences, each through its own adapter and KV cache; a request arriving
//! mid-way joins at the next step, each is answered when it finishes); the response's
//! `petal.batch` says with how many at most.
//!
//! Errors come back as OpenAI's `{"error": {"message", "type", "code"}}` with a 4xx status: bad
//! JSON (with its line and column), a missing or mistyped field, an unknown adapter (the
//! available ones listed), a prompt longer than the context.
//!
//! This file is the engine: the thread that owns the model, takes completions from the HTTP
//! side (`http.rs`, hyper on tokio) and sends back their answers. A completion whose client has
//! gone leaves the batch at the next step.

use crate::fields::sampling;
use crate::http::{self, error_body, Limits, Metrics, Out, Stop, ToEngine};
use crate::{Decoder, Generated, SamplingParams, StopReason};
use petal_core::mixed::{rows_ctx, BASE};
use petal_data::template::Message;
use petal_data::Tokenizer;
use petal_models::Llama;
use serde_json::{json, Value};
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// What the server serves.
pub struct Served<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a Tokenizer,
    /// The base model's id in `/v1/models` and responses (`petal serve --served-model-name`).
    pub model_id: String,
    /// The most completions generated together (those waiting when the server turns to them).
    pub max_batch: usize,
    /// The most tokens a request may ask for (`max_tokens` above it: a 400).
    pub max_tokens: usize,
}

/// A completion to generate: prompt ids, sampling, adapter (`BASE`: none), chat or not.
struct Job {
    ids: Vec<u32>,
    params: SamplingParams,
    adapter: String,
    chat: bool,
    /// Server-sent events as the text is generated (`"stream": true`)
    stream: bool,
    /// Unix seconds at arrival (the response's `created` and `id`)
    created: u64,
    /// arrival at the engine (latency metrics)
    arrived: Instant,
}

/// A completion in the batch: where its answer goes (the HTTP side's channel), and its request.
type Key = (UnboundedSender<Out>, Job);

/// A failed request: HTTP status, OpenAI error type, message.
#[derive(Debug)]
pub(crate) struct Failure(pub u16, pub &'static str, pub String);

pub(crate) fn bad(msg: impl Into<String>) -> Failure {
    Failure(400, "invalid_request_error", msg.into())
}

impl Served<'_> {
    /// The adapters requests may name, sorted.
    pub fn adapters(&self) -> Vec<String> {
        petal_core::mixed::adapter_names(self.model)
    }

    /// Serves HTTP on `listener` until `stop` (or, with `limits.signals`, SIGTERM or SIGINT),
    /// then lets the running completions finish within `limits.grace`.
    /// Continuous batching: between decoding steps, the completions that have arrived are taken
    /// (prefilled, joining the batch while there is room, up to `max_batch`; the others wait,
    /// up to `limits.max_queue`), and each is answered as soon as it finishes. Refuses at once a
    /// model whose adapters cannot be chosen per request (prompt learning, active LN tuning).
    pub fn serve(
        &self,
        listener: std::net::TcpListener,
        limits: Limits,
        stop: Stop,
    ) -> petal_core::Result<()> {
        rows_ctx(self.model, &[BASE])?; // refuse now adapters that cannot be chosen per row
        let (tx, rx) = mpsc::channel();
        let metrics = Arc::new(Metrics::new());
        let capacity = self.max_batch.max(1) + limits.max_queue;
        let (grace, chunk) = (limits.grace, limits.prefill_chunk);
        let (models, m) = (self.models(), metrics.clone());
        std::thread::scope(|s| {
            let side = s.spawn(move || http::run(listener, tx, capacity, models, limits, m, stop));
            self.engine(rx, &metrics, grace, chunk);
            match side.join() {
                Ok(r) => r.map_err(|e| petal_core::Error::Msg(format!("petal serve: {e}"))),
                Err(_) => Err(petal_core::Error::Msg(
                    "petal serve: the HTTP thread panicked".into(),
                )),
            }
        })
    }

    /// The engine loop: completions in, answers out, until the HTTP side has gone.
    fn engine(
        &self,
        rx: mpsc::Receiver<ToEngine>,
        metrics: &Metrics,
        grace: std::time::Duration,
        chunk: usize,
    ) {
        let mut dec: Decoder<Key> =
            Decoder::new(self.model, self.tokenizer).with_prefill_chunk(chunk);
        let mut stopping: Option<Instant> = None;
        loop {
            if dec.is_empty() {
                match rx.recv() {
                    Ok(m) => self.take(m, &mut dec, &mut stopping, metrics),
                    Err(_) => break, // the HTTP side is done
                }
                if dec.is_empty() {
                    continue;
                }
            }
            while dec.len() < self.max_batch.max(1) || stopping.is_some() {
                match rx.try_recv() {
                    Ok(m) => self.take(m, &mut dec, &mut stopping, metrics),
                    Err(_) => break,
                }
            }
            let gone = dec.remove(|(out, _)| out.is_closed()).len();
            metrics.cancelled.inc_by(gone as u64);
            if gone > 0 {
                tracing::info!(count = gone, "completions cancelled: their clients left");
            }
            if stopping.is_some_and(|t| t.elapsed() >= grace) {
                for (out, job) in dec.remove(|_| true) {
                    let f = Failure(
                        503,
                        "server_error",
                        "the server stopped before this completion finished".into(),
                    );
                    self.fail((out, job), f);
                }
            }
            metrics.running.set(dec.len() as i64);
            match dec.step(&mut |key, text| self.stream(key, text)) {
                Ok(done) => done.into_iter().for_each(|f| self.done(f, metrics)),
                Err((keys, e)) => {
                    for key in keys {
                        self.fail(key, Failure(500, "server_error", e.to_string()));
                    }
                }
            }
            metrics.running.set(dec.len() as i64);
        }
    }

    /// Sends a piece of a streamed completion's text (whole replies wait for the end).
    fn stream(&self, key: &mut Key, text: &str) {
        let (out, job) = key;
        if job.stream {
            let _ = out.send(Out::Event(self.chunk(job, text, None).to_string()));
        }
    }

    /// Checks a completion and prefills it into the batch (a streamed one's response starts
    /// first); after a stop, refuses it.
    fn take(
        &self,
        m: ToEngine,
        dec: &mut Decoder<Key>,
        stopping: &mut Option<Instant>,
        metrics: &Metrics,
    ) {
        let (chat, body, out) = match m {
            ToEngine::Stop => {
                stopping.get_or_insert_with(Instant::now);
                return;
            }
            ToEngine::Job { chat, body, out } => (chat, body, out),
        };
        if out.is_closed() {
            metrics.cancelled.inc(); // the client left while it waited
            return;
        }
        if stopping.is_some() {
            let f = Failure(503, "server_error", "the server is shutting down".into());
            return whole(&out, Err(f));
        }
        let job = match parse(&body).and_then(|v| self.job(&v, chat)) {
            Ok(job) => job,
            Err(f) => return whole(&out, Err(f)),
        };
        if job.stream && out.send(Out::Stream).is_err() {
            return; // the client left
        }
        let m = metrics;
        m.lora_requests
            .get_or_create(&crate::metrics::Adapter {
                adapter: job.adapter.clone(),
            })
            .inc();
        m.prompt_tokens.inc_by(job.ids.len() as u64);
        let (ids, params, adapter) = (job.ids.clone(), job.params.clone(), job.adapter.clone());
        let added = dec.add((out, job), &ids, params, &adapter, &mut |key, text| {
            self.stream(key, text)
        });
        match added {
            Ok(None) => {}
            Ok(Some(f)) => self.done(f, metrics),
            Err((key, e)) => self.fail(key, Failure(500, "server_error", e.to_string())),
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
        let stream = match req.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("`stream` must be true or false")),
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let params = sampling(req)?;
        if params.max_new_tokens > self.max_tokens {
            return Err(bad(format!(
                "`max_tokens` {} is above this server's limit of {} (petal serve --max-tokens)",
                params.max_new_tokens, self.max_tokens
            )));
        }
        Ok(Job {
            ids,
            params,
            adapter,
            chat,
            stream,
            created,
            arrived: Instant::now(),
        })
    }

    /// The OpenAI-style response to `job`, generated as `g` in a batch of `batch`.
    fn completion(&self, job: &Job, g: &Generated, batch: usize) -> Value {
        let finish = finish_reason(g.stop);
        let choice = if job.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": g.text, "logprobs": null, "finish_reason": finish})
        };
        let mut v = self.envelope(job, choice, false);
        let n = job.ids.len();
        v["usage"] = json!({"prompt_tokens": n, "completion_tokens": g.ids.len(), "total_tokens": n + g.ids.len()});
        // petal's own: the most sequences decoded together with this one (itself included)
        v["petal"] = json!({"batch": batch});
        v
    }

    /// One streamed event: a piece of text, or (with `finish`) the closing one.
    fn chunk(&self, job: &Job, text: &str, finish: Option<&str>) -> Value {
        let choice = if job.chat {
            let delta = if text.is_empty() {
                json!({})
            } else {
                json!({"content": text})
            };
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        };
        self.envelope(job, choice, true)
    }

    /// id, object, created, model and the one choice of a response or streamed chunk.
    fn envelope(&self, job: &Job, choice: Value, chunk: bool) -> Value {
        let name = if job.adapter == BASE {
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
            "choices": [choice],
        })
    }

    /// A finished completion: its metrics and log line, then its answer.
    fn done(&self, f: crate::Finished<Key>, metrics: &Metrics) {
        let (job, g) = (&f.key.1, &f.generated);
        let m = metrics;
        let reason = finish_reason(g.stop);
        m.success
            .get_or_create(&crate::metrics::Finish {
                finished_reason: reason.to_string(),
            })
            .inc();
        m.generation_tokens.inc_by(g.ids.len() as u64);
        let ttft = f.first_token_at.duration_since(job.arrived).as_secs_f64();
        let e2e = job.arrived.elapsed().as_secs_f64();
        m.time_to_first_token.observe(ttft);
        m.e2e_latency.observe(e2e);
        if g.ids.len() > 1 {
            m.time_per_output_token
                .observe((e2e - ttft) / (g.ids.len() - 1) as f64);
        }
        tracing::info!(
            adapter = %job.adapter,
            prompt_tokens = job.ids.len(),
            completion_tokens = g.ids.len(),
            finish_reason = reason,
            batch = f.batch,
            ttft_ms = (ttft * 1e3).round(),
            e2e_ms = (e2e * 1e3).round(),
            stream = job.stream,
            "completion"
        );
        self.finish(f.key, g, f.batch)
    }

    /// Sends a finished completion: the whole response, or a stream's closing events.
    fn finish(&self, (out, job): Key, g: &Generated, batch: usize) {
        if !job.stream {
            return whole(&out, Ok(self.completion(&job, g, batch)));
        }
        let mut last = self.chunk(&job, "", Some(finish_reason(g.stop)));
        let n = job.ids.len();
        last["usage"] = json!({"prompt_tokens": n, "completion_tokens": g.ids.len(), "total_tokens": n + g.ids.len()});
        last["petal"] = json!({"batch": batch});
        let _ = out.send(Out::Event(last.to_string()));
        let _ = out.send(Out::Done);
    }

    /// Sends a failure: an error response, or a stream's error event.
    fn fail(&self, (out, job): Key, f: Failure) {
        if !job.stream {
            return whole(&out, Err(f));
        }
        let Failure(status, kind, message) = f;
        let _ = out.send(Out::Event(error_body(status, kind, &message).to_string()));
        let _ = out.send(Out::Done);
    }

    fn chat_ids(&self, req: &Value) -> Result<Vec<u32>, Failure> {
        let msgs = req
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("`messages` (a list of {role, content}) is required"))?;
        if msgs.is_empty() {
            return Err(bad(
                "`messages` is empty: give at least one {role, content}",
            ));
        }
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

/// OpenAI's finish reason for a stop.
fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}

/// Answers a whole (not streamed) request: the value, or the failure as OpenAI's error object
/// with its status. A client that has gone is its own loss, not the server's.
fn whole(out: &UnboundedSender<Out>, r: Result<Value, Failure>) {
    let msg = match r {
        Ok(v) => Out::Whole(200, v),
        Err(Failure(status, kind, message)) => {
            Out::Whole(status, error_body(status, kind, &message))
        }
    };
    let _ = out.send(msg);
}

/// The request body as a JSON object.
fn parse(body: &[u8]) -> Result<Value, Failure> {
    let text = std::str::from_utf8(body)
        .map_err(|e| bad(format!("the request body is not UTF-8: {e}")))?;
    let v: Value = serde_json::from_str(text)
        .map_err(|e| bad(format!("the request body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("the request body must be a JSON object"));
    }
    Ok(v)
}
