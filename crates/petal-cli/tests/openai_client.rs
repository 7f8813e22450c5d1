//! The official `openai` Python client (pinned in tools/serve/requirements.txt, installed into
//! target/venv-openai on first use) against `petal serve` on the real SmolLM2 over a real
//! socket: completions and chat, whole and streamed, `n`, `logprobs` and `echo`, and the error
//! cases as the client's own exceptions (tools/serve/openai_client.py). Skips, saying why,
//! where no venv can be made (no python3, PyPI unreachable).

mod common;
use candle_core::{DType, Device};
use common::root;
use std::path::Path;
use std::process::Command;

fn client(python: &Path, base: &str) -> std::process::Output {
    Command::new(python)
        .arg(root().join("tools/serve/openai_client.py"))
        .arg(base)
        .output()
        .unwrap()
}

#[test]
fn the_official_openai_client_runs_completions_chat_streams_logprobs_and_errors() {
    let Some(python) = common::venv("venv-openai", "tools/serve/requirements.txt") else {
        return;
    };
    let p = petal_cli::assets::ensure("smollm2").expect("fetch SmolLM2 (petal assets smollm2)");
    let mut lm = petal_io::load_model(p.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let served = petal_serve::Served {
        model: &mut lm.model,
        tokenizer: &lm.tokenizer,
        model_id: "smollm2".into(),
        max_batch: 8,
        max_tokens: 256,
        adapter_dir: None,
    };
    let stop = petal_serve::Stop::default();
    let out = std::thread::scope(|s| {
        let st = stop.clone();
        let server = s.spawn(move || served.serve(listener, petal_serve::Limits::default(), st));
        let out = client(&python, &base);
        stop.stop();
        server.join().unwrap().unwrap();
        out
    });
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    eprintln!("{}", text(&out.stdout));
}
