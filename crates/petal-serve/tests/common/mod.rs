//! The server tests' harness: a model served on a free local port while a test talks to it.
// each test binary uses part of it
#![allow(dead_code)]

use petal_io::LoadedModel;
use petal_serve::{Limits, Served, Stop};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

/// The golden fixtures (tests/fixtures/golden).
#[allow(dead_code)]
pub fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

/// A request for each prompt through the active adapters (input-side ones too), as `petal
/// eval --task` decodes.
#[allow(dead_code)]
pub fn active_requests<'a>(
    prompts: &'a [Vec<u32>],
    params: &'a petal_serve::SamplingParams,
) -> Vec<petal_serve::Request<'a>> {
    prompts
        .iter()
        .map(|prompt| petal_serve::Request {
            prompt,
            params,
            adapter: petal_core::mixed::ACTIVE,
        })
        .collect()
}

/// The tiny golden Llama (its forward equal to transformers', tests/golden), in f32.
#[allow(dead_code)]
pub fn tiny_llama() -> LoadedModel {
    petal_io::load_model(
        golden().join("llama").to_str().unwrap(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

/// Stops the server when dropped, so a failed assertion ends the test instead of leaving the
/// server running (and the scope waiting for it).
struct StopOnDrop<'a>(&'a Stop);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Serves `lm` (as `tiny-llama`, `max_tokens` up to 256) with `limits` and `max_batch` while
/// `f` runs, given the address and the stop switch; the server starts taking requests only
/// `after` this long (requests sent meanwhile queue up). Then stops it; it must end by itself.
pub fn serving(
    lm: &mut LoadedModel,
    after: Duration,
    limits: Limits,
    max_batch: usize,
    f: impl FnOnce(SocketAddr, &Stop),
) {
    serving_dir(lm, after, limits, max_batch, None, f)
}

/// `serving`, with adapters loaded and unloaded at run time from `adapter_dir`.
pub fn serving_dir(
    lm: &mut LoadedModel,
    after: Duration,
    limits: Limits,
    max_batch: usize,
    adapter_dir: Option<petal_serve::adapters::AdapterDir>,
    f: impl FnOnce(SocketAddr, &Stop),
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Served {
        model: &mut lm.model,
        tokenizer: &lm.tokenizer,
        model_id: "tiny-llama".into(),
        max_batch,
        max_tokens: 256,
        adapter_dir,
    };
    let stop = Stop::default();
    std::thread::scope(|s| {
        let st = stop.clone();
        let server = s.spawn(move || {
            std::thread::sleep(after);
            served.serve(listener, limits, st)
        });
        {
            let _stop = StopOnDrop(&stop);
            f(addr, &stop);
        }
        server.join().unwrap().unwrap();
    });
}

/// One HTTP/1.0 request; the status and the JSON body of the response.
#[allow(dead_code)]
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: petal\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let (_, json) = text.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(json).unwrap())
}

/// A streamed request over HTTP/1.1: the data of each server-sent event, in order.
#[allow(dead_code)]
pub fn stream_events(addr: SocketAddr, path: &str, body: &str) -> Vec<String> {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: petal\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.ends_with(b"0\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended without its last chunk");
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(raw).unwrap();
    let (head, mut rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream"),
        "{head}"
    );
    // undo the chunking: size line, data, CRLF
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size, 16).unwrap();
        if n == 0 {
            break;
        }
        body.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap().to_string())
        .collect()
}
