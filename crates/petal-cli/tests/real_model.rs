//! The real SmolLM2-135M-Instruct GGUF (fetched by `petal assets`): it loads, answers a
//! factual chat question, and its perplexity on plain English is in the reference range.

use candle_core::{DType, Device};
use petal_data::template::Message;
use petal_serve::{generate, SamplingParams};

fn smollm2() -> petal_io::LoadedModel {
    let p = petal_cli::assets::ensure("smollm2").expect("fetch SmolLM2 (petal assets smollm2)");
    petal_io::load_model(p.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn smollm2_answers_that_the_capital_of_france_is_paris() {
    let m = smollm2();
    let msgs = [Message {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let text = m
        .tokenizer
        .chat_template
        .as_ref()
        .unwrap()
        .render(&msgs, true)
        .unwrap();
    let ids = m.tokenizer.encode(&text, true).unwrap();
    let p = SamplingParams {
        max_new_tokens: 16,
        ..Default::default()
    };
    let g = generate(&m.model, &m.tokenizer, &ids, &p, &mut |_| {}).unwrap();
    assert!(g.text.contains("Paris"), "answer: {:?}", g.text);
}

#[test]
fn smollm2_perplexity_on_plain_english_is_near_the_reference_25() {
    let m = smollm2();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/english.txt");
    let ex = petal_data::load_examples(
        &path,
        &m.tokenizer,
        &petal_data::DataOptions {
            max_seq_len: 512,
            pack: false,
        },
    )
    .unwrap();
    let r = petal_train::evaluate(&m.model, &ex, 1, 0).unwrap();
    // llama.cpp / transformers give about 25 on plain English for this checkpoint (Q4_1).
    assert!(
        r.perplexity > 8.0 && r.perplexity < 40.0,
        "perplexity {}",
        r.perplexity
    );
}

#[test]
fn kv_cached_decoding_gives_the_same_logits_as_a_full_forward() {
    let m = smollm2();
    let ids = m
        .tokenizer
        .encode("To be, or not to be, that is the question", false)
        .unwrap();
    let dev = Device::Cpu;
    let full = m
        .model
        .forward(
            &candle_core::Tensor::new(ids.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            None,
            &petal_core::Ctx::eval(),
        )
        .unwrap();
    let mut cache = m.model.new_cache();
    let n = ids.len();
    let head = candle_core::Tensor::new(&ids[..n - 2], &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.model
        .forward(&head, Some(&mut cache), &petal_core::Ctx::eval())
        .unwrap();
    let mut last = None;
    for &t in &ids[n - 2..] {
        last = Some(
            m.model
                .forward(
                    &candle_core::Tensor::new(&[t], &dev)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                    Some(&mut cache),
                    &petal_core::Ctx::eval(),
                )
                .unwrap(),
        );
    }
    let step = last.unwrap().squeeze(0).unwrap().squeeze(0).unwrap();
    let want = full.squeeze(0).unwrap().get(n - 1).unwrap();
    let e = petal_ops::testing::max_rel(&step, &want);
    assert!(e < 1e-4, "relative difference {e}");
}

#[test]
fn smollm2_kept_quantized_scores_as_its_dequantized_weights() {
    // --dtype quantized: the Q4_1 linears and the Q8_0 embedding/head stay in their blocks;
    // the loss equals the dequantized f32 model's up to bf16 rounding of the products (on
    // CPUs with AVX512-BF16), f32 rounding, or, where the products take x in 8-bit codes (CPUs
    // with VNNI but no AVX512-BF16, or AVX2 alone: docs/quantized.md), that rounding: on this
    // 17-token sentence it moves the loss by up to 1% (its logits by 5-7% of the largest)
    let p = petal_cli::assets::ensure("smollm2").expect("fetch SmolLM2 (petal assets smollm2)");
    let quantized = petal_models::Precision {
        quantized: true,
        ..DType::F32.into()
    };
    let q = petal_io::load_model(p.to_str().unwrap(), quantized, &Device::Cpu).unwrap();
    let f = smollm2();
    let ids: Vec<u32> = f
        .tokenizer
        .encode(
            "The quick brown fox jumps over the lazy dog. It was a sunny day, and",
            true,
        )
        .unwrap();
    let ex = [petal_data::Example {
        labels: ids.iter().map(|&x| x as i64).collect(),
        ids,
        task: None,
    }];
    let (lq, lf) = (
        petal_train::evaluate(&q.model, &ex, 1, 0).unwrap().loss,
        petal_train::evaluate(&f.model, &ex, 1, 0).unwrap().loss,
    );
    let arithmetic = petal_ops::quant::arithmetic(petal_ops::Kernels::FUSED);
    let tol = if arithmetic == "f32" || arithmetic.starts_with("bf16") {
        5e-3
    } else {
        2e-2
    };
    assert!(
        (lq - lf).abs() < tol * lf,
        "quantized {lq} vs f32 {lf} ({arithmetic})"
    );
    // --quantize is for f32/bf16/f16 weights: this file's are Q4_1 already
    let again = petal_models::Precision {
        quantize: Some(petal_ops::quant::ggml(petal_ops::quant::GgmlDType::Q8_0).unwrap()),
        ..DType::F32.into()
    };
    let e = petal_io::load_model(p.to_str().unwrap(), again, &Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("already quantized") && e.contains("q4_1"), "{e}");
}

/// One HTTP/1.1 request on a fresh connection: the JSON body of the answer.
fn get_json(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap()
}

#[test]
fn served_smollm2_drops_the_completions_whose_clients_leave() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let mut m = smollm2();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = petal_serve::Served {
        model: &mut m.model,
        tokenizer: &m.tokenizer,
        model_id: "smollm2".into(),
        adapter_dir: None,
        max_batch: 4,
        max_tokens: 2000,
    };
    let stop = petal_serve::Stop::default();
    /// Stops the server when dropped: a failed assertion ends the test, not the scope's wait.
    struct StopOnDrop(petal_serve::Stop);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.stop();
        }
    }
    std::thread::scope(|sc| {
        let st = stop.clone();
        let server = sc.spawn(move || served.serve(listener, petal_serve::Limits::default(), st));
        let _stop = StopOnDrop(stop.clone());
        let send = |stream: bool| {
            let body = serde_json::json!({"prompt": "Once upon a time", "max_tokens": 2000, "stream": stream}).to_string();
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(
                s,
                "POST /v1/completions HTTP/1.1\r\nHost: p\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            s
        };
        // a streamed completion whose client leaves once it has begun, and a whole one
        // whose client leaves while it runs: neither may run on to its 2000 tokens
        let mut a = send(true);
        let mut head = [0u8; 12];
        a.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        let b = send(false);
        std::thread::sleep(Duration::from_millis(1500));
        drop((a, b));
        let t = Instant::now();
        let mut h = get_json(addr, "/health");
        while h["cancelled"] != 2 && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
            h = get_json(addr, "/health");
        }
        assert_eq!(h["cancelled"], 2, "{h}");
        assert_eq!(h["running"], 0, "{h}");
        stop.stop();
        server.join().unwrap().unwrap();
        drop(_stop);
    });
}

/// The tokenizer petal builds from the GGUF's metadata gives transformers' ids (its own GGUF
/// loader, tools/golden/make_gguf_tokens.py) on digits, spaces, newlines, accents, CJK, emoji,
/// code, contractions, a URL and the chat template's special tokens, and decodes them back.
#[test]
fn smollm2_gguf_tokenizer_gives_transformers_ids() {
    let p = petal_cli::assets::ensure("smollm2").expect("fetch SmolLM2 (petal assets smollm2)");
    let mut f = std::fs::File::open(&p).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tok = petal_io::gguf_tokenizer(&content.metadata).unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden/smollm2_gguf_tokens.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(cases.len(), 10);
    for c in &cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got, false).unwrap(), text, "decoded back");
    }
}
