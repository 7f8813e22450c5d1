//! `petal serve`: one base model and many adapters behind an HTTP server with the shape of the
//! OpenAI completions API, the way vLLM serves LoRA adapters: the request's `model` field names
//! the adapter (the base model's id, or `__base__`, for none). Every request runs through its
//! own adapter with no merging, swapping or reloading (`petal_core::with_adapter_rows`), so
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

use crate::{Decoder, Generated, SamplingParams, StopReason};
use petal_core::mixed::{rows_ctx, BASE};
use petal_data::template::Message;
use petal_data::Tokenizer;
use petal_models::Llama;
use serde_json::{json, Value};
use std::io::{Read, Write};

/// What the server serves.
pub struct Served<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a Tokenizer,
    /// The base model's id in `/v1/models` and responses (e.g. the model path or hub id).
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
}

/// Where a completion's answer goes: one JSON response, or a stream of server-sent events
/// (chunked, written as the text is generated).
enum Reply {
    Whole(tiny_http::Request),
    Stream(Box<dyn Write + Send>),
}

/// A completion in the batch: its reply and its request.
type Key = (Reply, Job);

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
        petal_core::mixed::adapter_names(self.model)
    }

    /// Serves `http`'s requests until it is unblocked (`tiny_http::Server::unblock`) or fails.
    /// Continuous batching: between decoding steps, the requests that have arrived are taken
    /// (a completion is prefilled and joins the batch while there is room, up to
    /// `max_batch`), and each completion is answered as soon as it finishes. Refuses at once a
    /// model whose adapters cannot be chosen per request (prompt learning, active LN tuning).
    pub fn serve(&self, http: &tiny_http::Server) -> petal_core::Result<()> {
        rows_ctx(self.model, &[BASE])?; // refuse now adapters that cannot be chosen per row
        let mut dec: Decoder<Key> = Decoder::new(self.model, self.tokenizer);
        loop {
            if dec.is_empty() {
                match http.recv() {
                    Ok(req) => self.take(req, &mut dec),
                    Err(_) => break, // unblocked
                }
                if dec.is_empty() {
                    // answered at once: wait for the next request in `recv`, which alone sees
                    // an unblock (`try_recv` would swallow it and the loop would never end)
                    continue;
                }
            }
            while dec.len() < self.max_batch.max(1) {
                match http.try_recv() {
                    Ok(Some(req)) => self.take(req, &mut dec),
                    _ => break,
                }
            }
            match dec.step(&mut |key, text| self.stream(key, text)) {
                Ok(done) => done
                    .into_iter()
                    .for_each(|f| self.finish(f.key, &f.generated, f.batch)),
                Err((keys, e)) => {
                    for (reply, _) in keys {
                        self.fail(reply, Failure(500, "server_error", e.to_string()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends a piece of a streamed completion's text (whole replies wait for the end).
    fn stream(&self, key: &mut Key, text: &str) {
        if let (Reply::Stream(w), job) = key {
            let _ = event(w, &self.chunk(job, text, None).to_string());
        }
    }

    /// Answers `req` at once, or prefills its completion into the batch (a streamed one gets
    /// its response head first).
    fn take(&self, mut req: tiny_http::Request, dec: &mut Decoder<Key>) {
        let job = match self.handle(&mut req) {
            Ok(Handled::Now(v)) => return respond(req, Ok(v)),
            Err(f) => return respond(req, Err(f)),
            Ok(Handled::Job(job)) => job,
        };
        let reply = if job.stream {
            let mut w = req.into_writer();
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
            if w.write_all(head.as_bytes())
                .and_then(|_| w.flush())
                .is_err()
            {
                return; // the client left
            }
            Reply::Stream(w)
        } else {
            Reply::Whole(req)
        };
        let (ids, params, adapter) = (job.ids.clone(), job.params.clone(), job.adapter.clone());
        let added = dec.add((reply, job), &ids, params, &adapter, &mut |key, text| {
            self.stream(key, text)
        });
        match added {
            Ok(None) => {}
            Ok(Some(f)) => self.finish(f.key, &f.generated, f.batch),
            Err(((reply, _), e)) => self.fail(reply, Failure(500, "server_error", e.to_string())),
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

    /// Sends a finished completion: the whole response, or a stream's closing events.
    fn finish(&self, key: Key, g: &Generated, batch: usize) {
        match key {
            (Reply::Whole(req), job) => respond(req, Ok(self.completion(&job, g, batch))),
            (Reply::Stream(mut w), job) => {
                let mut last = self.chunk(&job, "", Some(finish_reason(g.stop)));
                let n = job.ids.len();
                last["usage"] = json!({"prompt_tokens": n, "completion_tokens": g.ids.len(), "total_tokens": n + g.ids.len()});
                last["petal"] = json!({"batch": batch});
                let _ = event(&mut w, &last.to_string())
                    .and_then(|_| event(&mut w, "[DONE]"))
                    .and_then(|_| end_stream(&mut w));
            }
        }
    }

    /// Sends a failure: an error response, or a stream's error event.
    fn fail(&self, reply: Reply, f: Failure) {
        match reply {
            Reply::Whole(req) => respond(req, Err(f)),
            Reply::Stream(mut w) => {
                let Failure(status, kind, message) = f;
                let e = json!({"error": {"message": message, "type": kind, "code": status}});
                let _ = event(&mut w, &e.to_string()).and_then(|_| end_stream(&mut w));
            }
        }
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

/// One server-sent event (`data: ...`) as one chunk of a chunked body.
fn event(w: &mut dyn Write, data: &str) -> std::io::Result<()> {
    let ev = format!("data: {data}\n\n");
    write!(w, "{:x}\r\n{ev}\r\n", ev.len())?;
    w.flush()
}

/// The end of a chunked body.
fn end_stream(w: &mut dyn Write) -> std::io::Result<()> {
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
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
    // OpenAI's ranges; petal's extensions top_k >= 0 and repetition_penalty > 0
    let within = |k: &str, v: Option<f64>, ok: fn(f64) -> bool, range: &str| match v {
        Some(x) if !ok(x) => Err(bad(format!("`{k}` must be {range}, not {x}"))),
        _ => Ok(v),
    };
    let temperature = within(
        "temperature",
        num("temperature")?,
        |t| (0.0..=2.0).contains(&t),
        "in 0..2",
    )?
    .unwrap_or(1.0);
    // below 1e-5 the softmax over 1/temperature overflows: greedy, as vLLM takes it
    let temperature = if temperature < 1e-5 { 0.0 } else { temperature };
    let top_p =
        within("top_p", num("top_p")?, |p| p > 0.0 && p <= 1.0, "in (0, 1]")?.filter(|p| *p < 1.0);
    let repetition_penalty = within(
        "repetition_penalty",
        num("repetition_penalty")?,
        |r| r > 0.0 && r.is_finite(),
        "> 0",
    )?
    .unwrap_or(1.0);
    match count("n")? {
        None | Some(1) => {}
        Some(0) => return Err(bad("`n` must be >= 1, not 0")),
        Some(n) => {
            return Err(bad(format!(
                "`n` = {n}: one completion per request for now"
            )))
        }
    }
    let max_new_tokens = match count("max_tokens")? {
        Some(0) => return Err(bad("`max_tokens` must be >= 1, not 0")),
        m => m.unwrap_or(16),
    };
    Ok(SamplingParams {
        temperature,
        top_k: count("top_k")?.filter(|k| *k > 0),
        top_p,
        repetition_penalty,
        max_new_tokens,
        stop,
        seed: count("seed")?.unwrap_or(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(body: Value) -> String {
        sampling(&body)
            .err()
            .map(|Failure(_, _, m)| m)
            .unwrap_or_default()
    }

    #[test]
    fn sampling_fields_out_of_openai_ranges_are_refused_naming_the_field() {
        for (body, want) in [
            (json!({"temperature": 3}), "`temperature` must be in 0..2"),
            (json!({"temperature": -1}), "`temperature`"),
            (json!({"top_p": 2}), "`top_p` must be in (0, 1]"),
            (json!({"top_p": 0}), "`top_p`"),
            (
                json!({"repetition_penalty": 0}),
                "`repetition_penalty` must be > 0",
            ),
            (json!({"repetition_penalty": -1.5}), "`repetition_penalty`"),
            (json!({"n": 0}), "`n` must be >= 1"),
            (json!({"n": 3}), "`n` = 3"),
            (json!({"max_tokens": 0}), "`max_tokens` must be >= 1"),
            (json!({"top_k": -1}), "`top_k`"),
        ] {
            let e = error(body.clone());
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn a_temperature_below_1e_5_is_greedy_and_top_p_1_is_no_filter() {
        let p = sampling(&json!({"temperature": 1e-60, "top_p": 1.0, "n": 1})).unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_p, None);
        let p = sampling(&json!({"temperature": 0.7})).unwrap();
        assert_eq!(p.temperature, 0.7);
    }
}
