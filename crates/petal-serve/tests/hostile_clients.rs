//! `petal serve` against clients that stall, send too much, speak another protocol or arrive
//! faster than it serves, over real TCP sockets on the tiny golden Llama: none of them holds
//! up the others, each gets its error, and a stop lets the running completions finish.

use petal_io::LoadedModel;
use petal_serve::{Limits, Stop};

mod common;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn model() -> LoadedModel {
    common::tiny_llama()
}

fn limits() -> Limits {
    Limits {
        max_body: 4096,
        header_timeout: Duration::from_secs(2),
        body_timeout: Duration::from_secs(3),
        max_queue: 4,
        grace: Duration::from_secs(5),
        ..Limits::default()
    }
}

/// Serves the tiny model with `limits` and `max_batch` while `f` runs.
fn serving(limits: Limits, max_batch: usize, f: impl FnOnce(SocketAddr, &Stop)) {
    common::serving(&mut model(), Duration::ZERO, limits, max_batch, f)
}

/// Sends `bytes`, then reads until the server closes (or 10 s pass): everything it sent.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A whole request over HTTP/1.1 (closed after the response): status, headers, JSON body.
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, Value) {
    let text = exchange(
        addr,
        format!(
            "{method} {path} HTTP/1.1\r\nHost: petal\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        head.to_string(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// A client that sends a completion's headers and part of its body, then stalls.
fn stall(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: petal\r\nContent-Length: 3000\r\n\r\n{{\"prompt\": \"w5"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

const COMPLETION: &str = r#"{"prompt": "w5 w9 w14", "max_tokens": 4, "temperature": 0}"#;

#[test]
fn a_stalled_body_holds_up_no_one_and_gets_a_408_after_the_body_timeout() {
    serving(limits(), 8, |addr, _| {
        let t0 = Instant::now();
        let mut stalled = stall(addr);
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let (status, _, health) = request(addr, "GET", "/health", "");
        assert_eq!(status, 200, "{health}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(health["waiting"], 1, "{health}"); // the stalled one, still reading
        let (status, _, r) = request(addr, "POST", "/v1/completions", COMPLETION);
        assert_eq!(status, 200, "{r}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let mut answer = String::new();
        let _ = stalled.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("did not arrive within 3 s"), "{answer}");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(6),
            "{took:?}"
        );
    });
}

#[test]
fn a_body_over_the_limit_gets_a_413_declared_or_not() {
    serving(limits(), 8, |addr, _| {
        // declared: refused before a byte of it is sent
        let t = Instant::now();
        let text = exchange(
            addr,
            b"POST /v1/completions HTTP/1.1\r\nHost: petal\r\nContent-Length: 1000000000\r\n\r\n",
        );
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(text.contains("limit of 4096 bytes"), "{text}");
        assert!(t.elapsed() < Duration::from_secs(2));
        // chunked, no length given: cut off at the limit
        let chunk = "x".repeat(3000);
        let text = exchange(
            addr,
            format!("POST /v1/completions HTTP/1.1\r\nHost: petal\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len(), chunk.len()).as_bytes(),
        );
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        let (status, _, r) = request(addr, "POST", "/v1/completions", COMPLETION);
        assert_eq!(status, 200, "{r}");
    });
}

#[test]
fn an_http2_preface_or_tls_gets_an_error_and_the_connection_closes_at_once() {
    serving(limits(), 8, |addr, _| {
        let t = Instant::now();
        let text = exchange(addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 505"), "{text}");
        assert!(text.contains("HTTP/2"), "{text}");
        let text = exchange(addr, &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]);
        assert!(
            text.starts_with("HTTP/1.1 505") && text.contains("TLS"),
            "{text}"
        );
        let text = exchange(addr, b"HELLO there\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // a client that connects and says nothing is let go after the header timeout
        let t = Instant::now();
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = Vec::new();
        let _ = idle.read_to_end(&mut buf);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(6),
            "{took:?}"
        );
    });
}

#[test]
fn completions_beyond_the_batch_and_queue_get_a_503_with_retry_after() {
    let l = Limits {
        max_queue: 1,
        ..limits()
    };
    serving(l, 1, |addr, _| {
        // two stalled completions fill the batch of one and the queue of one
        let (mut a, mut b) = (stall(addr), stall(addr));
        std::thread::sleep(Duration::from_millis(100));
        let (status, head, r) = request(addr, "POST", "/v1/completions", COMPLETION);
        assert_eq!(status, 503, "{r}");
        assert!(head.to_lowercase().contains("retry-after: 1"), "{head}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--max-queue"),
            "{r}"
        );
        // /health still answers, and once the stalled ones are gone the server takes more
        assert_eq!(request(addr, "GET", "/health", "").0, 200);
        let (mut x, mut y) = (String::new(), String::new());
        let _ = (a.read_to_string(&mut x), b.read_to_string(&mut y));
        assert!(
            x.starts_with("HTTP/1.1 408") && y.starts_with("HTTP/1.1 408"),
            "{x} {y}"
        );
        let (status, _, r) = request(addr, "POST", "/v1/completions", COMPLETION);
        assert_eq!(status, 200, "{r}");
    });
}

#[test]
fn a_stop_lets_the_running_stream_finish_then_closes_the_listener() {
    serving(limits(), 8, |addr, stop| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = json!({"prompt": "w5 w9", "max_tokens": 40, "temperature": 0, "stream": true})
            .to_string();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: petal\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut first = [0u8; 64];
        let n = s.read(&mut first).unwrap(); // the stream has begun
        assert!(first[..n].starts_with(b"HTTP/1.1 200"));
        stop.stop();
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        assert!(rest.contains("data: [DONE]"), "{rest}");
        assert!(!rest.contains("\"error\""), "{rest}");
        std::thread::sleep(Duration::from_millis(300));
        let refused = TcpStream::connect(addr).map(|mut c| {
            let _ = c.write_all(b"GET /health HTTP/1.1\r\nHost: p\r\n\r\n");
            let mut b = Vec::new();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = c.read_to_end(&mut b);
            b.is_empty()
        });
        assert!(
            refused.unwrap_or(true),
            "the listener still answers after a stop"
        );
    });
}
