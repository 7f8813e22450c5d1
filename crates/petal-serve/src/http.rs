//! The HTTP side of `petal serve`: hyper (HTTP/1.1) on a tokio runtime of its own thread, in
//! front of the engine thread that owns the model (`server.rs`). No client can stall another:
//! every connection is a task of its own, headers must arrive within `header_timeout` and a
//! body within `body_timeout` (408), bodies over `max_body` get a 413 before they are read,
//! completions beyond the running batch and `max_queue` waiting ones get a 503 with
//! `Retry-After`, and `/health` and `/v1/models` are answered here without waiting for the
//! engine. A completion whose client has gone (its response dropped, streamed or not) leaves
//! the batch at the engine's next step. An HTTP/2 preface or a TLS handshake is answered with
//! an error and the connection closed. A stop (SIGTERM or SIGINT with `signals`, or
//! [`Stop::stop`]) closes the listener, lets running completions finish for `grace`, and
//! answers the waiting ones with a 503.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub(crate) use crate::metrics::Metrics;

/// The limits of the HTTP side.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest request body in bytes (larger: 413).
    pub max_body: usize,
    /// Time for a request's headers to arrive, from the connection's start or the previous
    /// response (then the connection is closed).
    pub header_timeout: Duration,
    /// Time for a request's body to arrive once its headers have (then a 408).
    pub body_timeout: Duration,
    /// Completions that may wait beyond the running batch (more: a 503 with `Retry-After`).
    pub max_queue: usize,
    /// After a stop, how long running completions may take before they are cancelled.
    pub grace: Duration,
    /// Whether SIGTERM and SIGINT stop the server (the command line: yes; tests: no).
    pub signals: bool,
    /// The most prompt tokens prefilled between two decoding steps: a longer prompt is read
    /// this many a step, so that it delays the running batch by one chunk a step.
    pub prefill_chunk: usize,
    /// Bytes of finished sequences' KV caches kept for prompts that begin as theirs did
    /// (prefix caching; 0: none).
    pub prefix_cache: usize,
}

/// Bytes of KV caches kept for prefix caching by default (1 GiB).
pub const PREFIX_CACHE: usize = 1 << 30;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 4 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_queue: 64,
            grace: Duration::from_secs(30),
            signals: false,
            prefill_chunk: crate::batch::PREFILL_CHUNK,
            prefix_cache: PREFIX_CACHE,
        }
    }
}

/// A switch that stops a running server as SIGTERM does (clone it before `serve`).
#[derive(Clone)]
pub struct Stop(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Stop {
    fn default() -> Self {
        Stop(Arc::new(tokio::sync::watch::channel(false).0))
    }
}

impl Stop {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// What the HTTP side hands the engine.
pub(crate) enum ToEngine {
    /// A completion request: its body, and where its answer goes.
    Job {
        chat: bool,
        body: Bytes,
        out: UnboundedSender<Out>,
    },
    /// `POST /v1/load_lora_adapter` (`load`) or `/v1/unload_lora_adapter`: its body, and where
    /// the answer goes.
    Adapter {
        load: bool,
        body: Bytes,
        out: UnboundedSender<Out>,
    },
    /// Stop: finish the running completions (within the grace), refuse the rest.
    Stop,
}

/// `/v1/models`' answer, kept current by the engine as adapters come and go.
pub(crate) type Models = Arc<std::sync::RwLock<Value>>;

/// What the engine answers a completion with: one JSON response, or `Stream` then events
/// (each a JSON text) and `Done`.
pub(crate) enum Out {
    Whole(u16, Value),
    Stream,
    Event(String),
    Done,
}

/// What every connection's task shares.
struct Shared {
    engine: mpsc::Sender<ToEngine>,
    /// completions being read, waiting or running
    inflight: AtomicUsize,
    capacity: usize,
    models: Models,
    /// adapters load and unload at run time (`petal serve --adapter-dir`)
    lifecycle: bool,
    limits: Limits,
    stopping: AtomicBool,
    metrics: Arc<Metrics>,
}

/// OpenAI's error object.
pub(crate) fn error_body(status: u16, kind: &str, message: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "code": status}})
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: u16, kind: &str, message: String) -> Response<Body> {
    json_response(status, &error_body(status, kind, &message))
}

/// A 503 the client may retry after a second.
fn unavailable(message: String) -> Response<Body> {
    let mut r = error(503, "server_error", message);
    r.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from_static("1"),
    );
    r
}

/// One completion in flight: counted from its arrival until its response is dropped.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, SeqCst);
    }
}

/// A streamed completion's body: server-sent events as the engine sends them.
struct Events {
    rx: UnboundedReceiver<Out>,
    done: bool,
    _inflight: InFlight,
}

impl hyper::body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            let text = match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Out::Event(e))) => format!("data: {e}\n\n"),
                Poll::Ready(Some(Out::Done)) => {
                    self.done = true;
                    "data: [DONE]\n\n".to_string()
                }
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) => return Poll::Ready(None),
            };
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(text)))));
        }
    }
}

async fn route(req: Request<Incoming>, sh: Arc<Shared>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    Ok(match (&method, path.as_str()) {
        (&Method::GET, "/health") => json_response(200, &health(&sh)),
        (&Method::GET, "/v1/models") => {
            let models = sh.models.read().unwrap_or_else(|e| e.into_inner()).clone();
            json_response(200, &models)
        }
        (&Method::POST, "/v1/load_lora_adapter" | "/v1/unload_lora_adapter") if sh.lifecycle => {
            adapter(req, sh, path == "/v1/load_lora_adapter").await
        }
        (&Method::GET, "/metrics") => metrics(&sh),
        (&Method::POST, "/v1/completions" | "/v1/chat/completions") => {
            let chat = path == "/v1/chat/completions";
            let m = sh.clone();
            let r = completion(req, sh, chat).await;
            let code = r.status().as_u16();
            m.metrics
                .requests
                .get_or_create(&crate::metrics::Code { code })
                .inc();
            r
        }
        (_, "/health" | "/v1/models" | "/metrics" | "/v1/completions" | "/v1/chat/completions") => {
            error(
                405,
                "invalid_request_error",
                format!("{method} {path}: method not allowed"),
            )
        }
        _ => error(404, "not_found_error", format!("no endpoint {path}")),
    })
}

fn health(sh: &Shared) -> Value {
    let running = sh.metrics.running.get().max(0) as usize;
    json!({
        "status": if sh.stopping.load(SeqCst) { "stopping" } else { "ok" },
        "running": running,
        "waiting": sh.inflight.load(SeqCst).saturating_sub(running),
        "cancelled": sh.metrics.cancelled.get(),
    })
}

fn metrics(sh: &Shared) -> Response<Body> {
    let m = &sh.metrics;
    let running = m.running.get().max(0) as usize;
    m.waiting
        .set(sh.inflight.load(SeqCst).saturating_sub(running) as i64);
    let mut r = Response::new(Full::new(Bytes::from(m.render())).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

async fn completion(req: Request<Incoming>, sh: Arc<Shared>, chat: bool) -> Response<Body> {
    if sh.stopping.load(SeqCst) {
        return unavailable("the server is shutting down".into());
    }
    let waiting = sh.inflight.fetch_add(1, SeqCst);
    let inflight = InFlight(sh.clone());
    if waiting >= sh.capacity {
        return unavailable(format!(
            "the server is at capacity ({} completions running or waiting; petal serve \
             --max-batch and --max-queue): retry later",
            sh.capacity
        ));
    }
    let body = match read_body(req, &sh).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (out, mut rx) = unbounded_channel();
    if sh.engine.send(ToEngine::Job { chat, body, out }).is_err() {
        return unavailable("the server is shutting down".into());
    }
    match rx.recv().await {
        Some(Out::Whole(status, v)) => json_response(status, &v),
        Some(Out::Stream) => {
            let events = Events {
                rx,
                done: false,
                _inflight: inflight,
            };
            let mut r = Response::new(events.boxed());
            let h = r.headers_mut();
            h.insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/event-stream"),
            );
            h.insert(
                hyper::header::CACHE_CONTROL,
                hyper::header::HeaderValue::from_static("no-cache"),
            );
            r
        }
        _ => unavailable("the completion was cancelled: the server is shutting down".into()),
    }
}

/// A load or unload of an adapter, done by the engine between steps.
async fn adapter(req: Request<Incoming>, sh: Arc<Shared>, load: bool) -> Response<Body> {
    if sh.stopping.load(SeqCst) {
        return unavailable("the server is shutting down".into());
    }
    let body = match read_body(req, &sh).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (out, mut rx) = unbounded_channel();
    if sh
        .engine
        .send(ToEngine::Adapter { load, body, out })
        .is_err()
    {
        return unavailable("the server is shutting down".into());
    }
    match rx.recv().await {
        Some(Out::Whole(status, v)) => json_response(status, &v),
        _ => unavailable("the server is shutting down".into()),
    }
}

/// A request's body within the size limit and the body timeout; an error response otherwise.
async fn read_body(req: Request<Incoming>, sh: &Shared) -> Result<Bytes, Response<Body>> {
    let max = sh.limits.max_body;
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let too_large = || {
        error(
            413,
            "invalid_request_error",
            format!("the request body is over this server's limit of {max} bytes (petal serve --max-body)"),
        )
    };
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let secs = sh.limits.body_timeout.as_secs_f64();
    let read = Limited::new(req.into_body(), max).collect();
    match tokio::time::timeout(sh.limits.body_timeout, read).await {
        Err(_) => Err(error(
            408,
            "invalid_request_error",
            format!("the request body did not arrive within {secs} s"),
        )),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(error(
            400,
            "invalid_request_error",
            format!("reading the request body: {e}"),
        )),
        Ok(Ok(b)) => Ok(b.to_bytes()),
    }
}

/// The first bytes of an HTTP/2 connection without upgrade.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Serves one connection; an HTTP/2 preface or a TLS handshake gets an error and is closed.
async fn connection(tcp: tokio::net::TcpStream, sh: Arc<Shared>) {
    let mut first = [0u8; 16];
    let n = match tokio::time::timeout(sh.limits.header_timeout, tcp.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return, // nothing in time, or closed
    };
    let h2 = n >= 3 && H2_PREFACE.starts_with(&first[..n.min(H2_PREFACE.len())]);
    if h2 || first[0] == 0x16 {
        let what = if h2 {
            "HTTP/2 without upgrade is not served: use HTTP/1.1"
        } else {
            "TLS is not served here: plain HTTP/1.1 (put a TLS proxy in front)"
        };
        let body = error_body(505, "invalid_request_error", what).to_string();
        let head = format!(
            "HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        use tokio::io::AsyncWriteExt;
        let mut tcp = tcp;
        let _ = tcp.write_all(head.as_bytes()).await;
        let _ = tcp.shutdown().await;
        return;
    }
    let timeout = sh.limits.header_timeout;
    let service = hyper::service::service_fn(move |req| route(req, sh.clone()));
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(true);
    let _ = b.serve_connection(TokioIo::new(tcp), service).await;
}

/// The HTTP side: accepts connections on `listener` until a stop, then tells the engine and
/// waits for the completions in flight (at most the grace and five seconds more).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    listener: std::net::TcpListener,
    engine: mpsc::Sender<ToEngine>,
    capacity: usize,
    models: Models,
    lifecycle: bool,
    limits: Limits,
    metrics: Arc<Metrics>,
    stop: Stop,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sh = Arc::new(Shared {
        engine,
        inflight: AtomicUsize::new(0),
        capacity,
        models,
        lifecycle,
        limits,
        stopping: AtomicBool::new(false),
        metrics,
    });
    rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut stopped = stop.0.subscribe();
        let mut signals = if sh.limits.signals {
            use tokio::signal::unix::{signal, SignalKind};
            Some((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        } else {
            None
        };
        let signalled = async {
            match &mut signals {
                Some((term, int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(signalled);
        loop {
            tokio::select! {
                r = listener.accept() => {
                    if let Ok((tcp, _)) = r {
                        tokio::spawn(connection(tcp, sh.clone()));
                    }
                }
                _ = stopped.wait_for(|s| *s) => break,
                _ = &mut signalled => break,
            }
        }
        drop(listener);
        sh.stopping.store(true, SeqCst);
        let _ = sh.engine.send(ToEngine::Stop);
        let deadline = Instant::now() + sh.limits.grace + Duration::from_secs(5);
        while sh.inflight.load(SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // the last responses' final bytes
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, std::io::Error>(())
    })
}
