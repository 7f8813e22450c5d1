//! `petal serve`: one base model and many adapters behind an HTTP server with the shape of the
//! OpenAI completions API, the way vLLM serves LoRA adapters: the request's `model` field names
//! the adapter (the base model's id, or `__base__`, for none). Every request runs through its
//! own adapter with no merging, swapping or reloading (`petal_core::rows_ctx`), so
//! any number of loaded adapters are served side by side.
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` (`prompt`: a string, a
//! list of strings, token ids or a list of token-id lists) and `POST /v1/chat/completions`
//! (`messages`, rendered with the model's chat template). Sampling fields: `max_tokens`
//! (default 16, as OpenAI, >= 1; 0 with `echo`), `temperature` (default 1, in 0..2; below
//! 1e-5 is greedy), `top_p` in (0, 1], `top_k` >= 0, `repetition_penalty` > 0, `stop` (a
//! string or a list), `seed` (choice i of a request draws with seed + i; without one, a random
//! seed), `n` >= 1 choices a prompt; `logprobs` (0..=20 alternatives; chat: `logprobs` true and
//! `top_logprobs`) and `echo` (the prompt in front of the text, with its tokens'
//! log-probabilities: what lm-evaluation-harness asks for), see `logprobs.rs`. Out of range: a
//! 400 naming the field. Fields this server does not read are ignored, as OpenAI clients send
//! many. `"stream": true` answers with server-sent events (chunked) as the text is generated,
//! OpenAI's chunk objects (each naming its choice's index), a closing chunk a choice with its
//! finish reason (the last with the usage), then `[DONE]`; text that could begin a stop string
//! is held back until it cannot. Completions are decoded together with continuous batching
//! (`Decoder`: up to `max_batch` sequences, each through its own adapter and KV cache; a
//! request arriving mid-way joins at the next step, each is answered when its last choice
//! finishes); the response's `petal.batch` says with how many at most. A prompt that begins as
//! a finished completion's did, through the same adapter, goes on from that completion's KV
//! cache (prefix caching, `Limits::prefix_cache`; `usage.prompt_tokens_details.cached_tokens`).
//!
//! Errors come back as OpenAI's `{"error": {"message", "type", "code"}}` with a 4xx status: bad
//! JSON (with its line and column), a missing or mistyped field, an unknown adapter (the
//! available ones listed), a prompt longer than the context.
//!
//! This file is the engine: the thread that owns the model, takes completions from the HTTP
//! side (`http.rs`, hyper on tokio) and sends back their answers. A completion whose client has
//! gone leaves the batch at the next step.

use crate::adapters::{AdapterDir, Lifecycle};
use crate::http::{self, error_body, Limits, Metrics, Models, Out, Stop, ToEngine};
use crate::logprobs::TokenLogprob;
use crate::response::{finish_reason, Answer, Key};
use crate::{Decoder, Generated};
use petal_core::mixed::{every_row, rows_ctx, ACTIVE, BASE};
use petal_data::Tokenizer;
use petal_models::Llama;
use serde_json::{json, Value};
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// What the server serves.
pub struct Served<'a> {
    /// Mutable: with `adapter_dir`, adapters are attached and detached between steps.
    pub model: &'a mut Llama,
    pub tokenizer: &'a Tokenizer,
    /// The base model's id in `/v1/models` and responses (`petal serve --served-model-name`).
    pub model_id: String,
    /// The most completions generated together (those waiting when the server turns to them).
    pub max_batch: usize,
    /// The most tokens a request may ask for (`max_tokens` above it: a 400).
    pub max_tokens: usize,
    /// Adapters loaded and unloaded at run time, and their caps (`petal serve --adapter-dir`);
    /// None: only those attached at start.
    pub adapter_dir: Option<AdapterDir>,
}

/// The engine's state between steps: the batch, when a stop began, the run-time adapters.
type State<'d, 't> = (
    &'d mut Decoder<'t, Key>,
    &'d mut Option<Instant>,
    &'d mut Lifecycle,
);

/// A failed request: HTTP status, OpenAI error type, message.
#[derive(Debug)]
pub(crate) struct Failure(pub u16, pub &'static str, pub String);

pub(crate) fn bad(msg: impl Into<String>) -> Failure {
    Failure(400, "invalid_request_error", msg.into())
}

impl Served<'_> {
    /// The adapters requests may name, sorted.
    pub fn adapters(&self) -> Vec<String> {
        match every_row(&*self.model) {
            Some(n) => vec![n],
            None => petal_core::mixed::adapter_names(&*self.model),
        }
    }

    /// Serves HTTP on `listener` until `stop` (or, with `limits.signals`, SIGTERM or SIGINT),
    /// then lets the running completions finish within `limits.grace`.
    /// Continuous batching: between decoding steps, the completions that have arrived are taken
    /// (prefilled, joining the batch while there is room, up to `max_batch`; the others wait,
    /// up to `limits.max_queue`), and each is answered as soon as it finishes. An adapter that
    /// acts on every row (prompt learning, PASTA, active LN tuning) is served alone: every
    /// request through it (its name or the model's id), none through the base model; with
    /// other adapters, or beside `adapter_dir`, it is refused at once.
    pub fn serve(
        mut self,
        listener: std::net::TcpListener,
        limits: Limits,
        stop: Stop,
    ) -> petal_core::Result<()> {
        match every_row(&*self.model) {
            // refuse now adapters that cannot be chosen per row
            None => drop(rows_ctx(&*self.model, &[BASE])?),
            Some(n) => {
                let others: Vec<String> = petal_core::mixed::adapter_names(&*self.model)
                    .into_iter()
                    .filter(|a| *a != n)
                    .collect();
                if !others.is_empty() || self.adapter_dir.is_some() {
                    let beside = match others.is_empty() {
                        true => "adapters loaded at run time (--adapter-dir)".to_string(),
                        false => format!("other adapters ({})", others.join(", ")),
                    };
                    return Err(petal_core::Error::Unsupported(format!(
                        "petal serve: adapter `{n}` acts on every request (prompt learning, \
                         PASTA or LN tuning), so it cannot be served beside {beside}: serve \
                         it alone"
                    )));
                }
                tracing::info!(adapter = %n, "an adapter that acts on every row: every request goes through it");
            }
        }
        let (tx, rx) = mpsc::channel();
        let metrics = Arc::new(Metrics::new());
        let capacity = self.max_batch.max(1) + limits.max_queue;
        let (grace, chunk, kept) = (limits.grace, limits.prefill_chunk, limits.prefix_cache);
        let models: Models = Arc::new(std::sync::RwLock::new(self.models()));
        let lifecycle = self.adapter_dir.is_some();
        let (shown, m) = (models.clone(), metrics.clone());
        std::thread::scope(|s| {
            let side = s.spawn(move || {
                http::run(listener, tx, capacity, shown, lifecycle, limits, m, stop)
            });
            self.engine(rx, &metrics, &models, grace, (chunk, kept));
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
        &mut self,
        rx: mpsc::Receiver<ToEngine>,
        metrics: &Metrics,
        models: &Models,
        grace: std::time::Duration,
        (chunk, kept): (usize, usize),
    ) {
        let tok = self.tokenizer;
        let mut dec: Decoder<Key> = Decoder::new(tok)
            .with_prefill_chunk(chunk)
            .with_prefix_cache(kept);
        let mut stopping: Option<Instant> = None;
        let mut life = Lifecycle::default();
        let mut st = (&mut dec, &mut stopping, &mut life);
        loop {
            if st.0.is_empty() {
                match rx.recv() {
                    Ok(m) => self.take(m, &mut st, metrics, models),
                    Err(_) => break, // the HTTP side is done
                }
                if st.0.is_empty() {
                    continue;
                }
            }
            while st.0.len() < self.max_batch.max(1) || st.1.is_some() {
                match rx.try_recv() {
                    Ok(m) => self.take(m, &mut st, metrics, models),
                    Err(_) => break,
                }
            }
            let (dec, stopping) = (&mut *st.0, &*st.1);
            // sequences whose clients left, or whose request failed already (another choice)
            let gone = dec.remove(|k| k.out.is_closed() || k.answer.borrow().failed);
            let left = gone.iter().filter(|k| k.out.is_closed()).count();
            metrics.cancelled.inc_by(left as u64);
            if left > 0 {
                tracing::info!(count = left, "completions cancelled: their clients left");
            }
            if stopping.is_some_and(|t| t.elapsed() >= grace) {
                for key in dec.remove(|_| true) {
                    let f = Failure(
                        503,
                        "server_error",
                        "the server stopped before this completion finished".into(),
                    );
                    self.fail(key, f);
                }
            }
            metrics.running.set(dec.len() as i64);
            let model = &*self.model;
            match dec.step(model, &mut |key, text, lps| self.stream(key, text, lps)) {
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
    fn stream(&self, key: &mut Key, text: &str, lps: &[TokenLogprob]) {
        if key.job.stream && !key.answer.borrow().failed {
            let _ = key
                .out
                .send(Out::Event(self.chunk(key, text, lps, None).to_string()));
        }
    }

    /// Checks a request and prefills its sequences (prompts times `n`) into the batch (a
    /// streamed one's response starts first); after a stop, refuses it.
    fn take(&mut self, m: ToEngine, st: &mut State, metrics: &Metrics, models: &Models) {
        let (dec, stopping, life) = (&mut *st.0, &mut *st.1, &mut *st.2);
        let (chat, body, out) = match m {
            ToEngine::Stop => {
                stopping.get_or_insert_with(Instant::now);
                return;
            }
            ToEngine::Adapter { load, body, out } => {
                let r = parse(&body).and_then(|v| self.lifecycle(load, &v, life, dec));
                *models.write().unwrap_or_else(|e| e.into_inner()) = self.models();
                return whole(&out, r);
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
        let loaded = self.adapters();
        let job = parse(&body).and_then(|v| {
            self.load_on_use(&v, life, dec)?;
            self.job(&v, chat)
        });
        if self.adapters() != loaded {
            *models.write().unwrap_or_else(|e| e.into_inner()) = self.models();
        }
        let job = match job {
            Ok(job) => Rc::new(job),
            Err(f) => return whole(&out, Err(f)),
        };
        life.used(&job.adapter);
        if job.stream && out.send(Out::Stream).is_err() {
            return; // the client left
        }
        let m = metrics;
        m.lora_requests
            .get_or_create(&crate::metrics::Adapter {
                adapter: job.adapter.clone(),
            })
            .inc();
        let prompt_tokens: usize = job.prompts.iter().map(|p| p.ids.len()).sum();
        m.prompt_tokens.inc_by(prompt_tokens as u64);
        let answer = Answer::new(job.choices(), job.prompts.len());
        let reused = dec.reused();
        let model = &*self.model;
        // an adapter acting on every row: each row through the model as it is
        let row = match every_row(model) {
            Some(_) => ACTIVE,
            None => job.adapter.as_str(),
        };
        // each prompt's n choices: the prompt read once, the others going on from its cache
        let n = job.asked.n;
        for (p, prompt) in job.prompts.iter().enumerate() {
            let mut choices = (p * n..(p + 1) * n).map(|index| {
                let key = Key {
                    out: out.clone(),
                    job: job.clone(),
                    index,
                    answer: answer.clone(),
                };
                let mut params = job.asked.params.clone();
                params.seed = params.seed.wrapping_add(index as u64); // choices differ
                (key, params)
            });
            let first = choices.next().expect("n >= 1");
            let added = dec.add_forked(
                model,
                first,
                choices.collect(),
                &prompt.ids,
                row,
                &mut |key, text, lps| self.stream(key, text, lps),
            );
            match added {
                Ok(done) => done.into_iter().for_each(|f| self.done(f, metrics)),
                Err((keys, e)) => {
                    for key in keys {
                        self.fail(key, Failure(500, "server_error", e.to_string()));
                    }
                }
            }
        }
        m.prefix_cache_hits.inc_by((dec.reused() - reused) as u64);
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

    /// A finished sequence: its metrics and log line, then its choice.
    fn done(&self, f: crate::Finished<Key>, metrics: &Metrics) {
        let (job, g) = (&f.key.job, &f.generated);
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
            choice = f.key.index,
            prompt_tokens = f.key.prompt().ids.len(),
            cached_tokens = f.cached,
            completion_tokens = g.ids.len(),
            finish_reason = reason,
            batch = f.batch,
            ttft_ms = (ttft * 1e3).round(),
            e2e_ms = (e2e * 1e3).round(),
            stream = job.stream,
            "completion"
        );
        self.finish(&f.key, g, (f.batch, f.cached))
    }

    /// A finished choice into its answer; the whole response (or a stream's end) after the
    /// last, a streamed choice's closing chunk at once.
    fn finish(&self, key: &Key, g: &Generated, (batch, cached): (usize, usize)) {
        let mut a = key.answer.borrow_mut();
        if a.failed {
            return;
        }
        a.left -= 1;
        // a prompt's choices share its cache: counted once
        a.cached[key.index / key.job.asked.n] = cached;
        a.completion_tokens += g.ids.len();
        a.batch = a.batch.max(batch);
        if !key.job.stream {
            a.choices[key.index] = self.choice(key, g);
            if a.left == 0 {
                whole(&key.out, Ok(self.completion(&key.job, &a)));
            }
            return;
        }
        let _ = key
            .out
            .send(Out::Event(self.closing(key, g.stop, &a).to_string()));
        if a.left == 0 {
            let _ = key.out.send(Out::Done);
        }
    }

    /// Sends a failure, once a request: an error response, or a stream's error event.
    fn fail(&self, key: Key, f: Failure) {
        let mut a = key.answer.borrow_mut();
        if a.failed {
            return;
        }
        a.failed = true;
        if !key.job.stream {
            return whole(&key.out, Err(f));
        }
        let Failure(status, kind, message) = f;
        let _ = key
            .out
            .send(Out::Event(error_body(status, kind, &message).to_string()));
        let _ = key.out.send(Out::Done);
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
