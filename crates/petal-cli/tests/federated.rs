//! What federated rounds stand on: `petal train --max-steps 0` writes the initialised adapter,
//! `petal train --init-adapter` starts a client's local training
//! from the global adapter (its weights, a fresh optimizer), and refuses an adapter of another
//! shape naming the tensor.

mod common;

use common::{golden, petal, stderr, train, words};
use serde_json::Value;

fn summary(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}", stderr(o));
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn training_from_an_adapter_starts_where_it_ended_and_other_shapes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = words(tmp.path());
    let model = golden().join("llama");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let out = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let (a0, a1, a2, a3) = (out("a0"), out("a1"), out("a2"), out("a3"));
    // --max-steps 0: the initialised adapter, untrained (a federation's starting point)
    let mut args = train(m, d, &a0);
    args.extend(["--max-steps", "0", "--json"]);
    let zero = summary(&petal(&args));
    assert_eq!(zero["steps"], 0);
    assert_eq!(zero["eval_after"]["loss"], zero["eval_before"]["loss"]);
    assert!(std::path::Path::new(&a0)
        .join("adapter/adapter_model.safetensors")
        .exists());
    let mut args = train(m, d, &a1);
    args.extend(["--max-steps", "3", "--json"]);
    let first = summary(&petal(&args));
    let init = format!("{a1}/adapter");
    let mut args = train(m, d, &a2);
    args.extend(["--max-steps", "1", "--init-adapter", &init, "--json"]);
    let second = summary(&petal(&args));
    // the same held-out examples (same data and seed): the second run starts at the first's end
    assert_eq!(second["eval_before"]["loss"], first["eval_after"]["loss"]);
    assert_ne!(second["eval_before"]["loss"], first["eval_before"]["loss"]);
    let mut args = train(m, d, &a3);
    args.extend(["--max-steps", "1", "--r", "4", "--init-adapter", &init]);
    let o = petal(&args);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("q_proj.lora_A.weight") && e.contains("[8, 32]"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let mut args = train(m, d, &a3);
    args.extend([
        "--max-steps",
        "1",
        "--method",
        "ia3",
        "--init-adapter",
        &init,
    ]);
    let e = stderr(&petal(&args));
    assert!(e.contains("a LORA adapter, but --method makes IA3"), "{e}");
}

/// The largest change of any adapter tensor between two run folders' adapters.
fn moved(a: &str, b: &str) -> f32 {
    let tensors = |d: &str| adapter_tensors(&std::path::Path::new(d).join("adapter"));
    let (a, b) = (tensors(a), tensors(b));
    a.iter()
        .map(|(k, t)| petal_ops::testing::max_abs(t, &b[k]))
        .fold(0f32, f32::max)
}

#[test]
fn fedprox_pulls_local_training_back_to_the_adapter_it_started_from() {
    let tmp = tempfile::tempdir().unwrap();
    let data = words(tmp.path());
    let model = golden().join("llama");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let out = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let start = out("start");
    let mut args = train(m, d, &start);
    args.extend(["--max-steps", "5", "--lr", "0.01"]);
    assert!(petal(&args).status.success());
    let init = format!("{start}/adapter");
    let local = |name: &str, mu: &str| {
        let o = out(name);
        let mut args = train(m, d, &o);
        let steps = ["--max-steps", "12", "--lr", "0.01", "--seed", "3"];
        args.extend(steps);
        args.extend(["--init-adapter", &init, "--prox-mu", mu]);
        let r = petal(&args);
        assert!(r.status.success(), "{}", stderr(&r));
        o
    };
    let free = moved(&local("free", "0"), &start);
    let held = moved(&local("held", "1000"), &start);
    eprintln!("largest change: free {free}, with the pull {held}");
    // Adam moves each weight about lr a step: 12 steps drift ~0.1 freely; a strong pull keeps
    // every weight within a few steps of where it started
    assert!(free > 0.05, "free drift {free}");
    assert!(held < 0.35 * free, "held {held} vs free {free}");
    // the anchor is the starting adapter: resuming would move it, so the two are refused
    let mut args = train(m, d, &start);
    args.extend(["--prox-mu", "1", "--resume", &start]);
    let e = stderr(&petal(&args));
    assert!(e.contains("prox_mu"), "{e}");
}

fn adapter_tensors(
    dir: &std::path::Path,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

#[test]
fn fedavg_on_flowers_deployment_engine_averages_the_clients_adapters_by_their_examples() {
    let Some(python) = common::venv("venv-flower", "python/flower/requirements.txt") else {
        return;
    };
    let bin = python.parent().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, words: usize, step: usize| {
        let p = tmp.path().join(name);
        let text: Vec<String> = (0..words)
            .map(|i| format!("w{}", (i * step + 1) % 96))
            .collect();
        std::fs::write(&p, text.join(" ")).unwrap();
        p.to_str().unwrap().to_string()
    };
    // two clients with different amounts of data: FedAvg weighs them by their examples
    let (c0, c1, val) = (
        write("c0.txt", 600, 7),
        write("c1.txt", 300, 11),
        write("v.txt", 200, 5),
    );
    let out = tmp.path().join("fed");
    let o = std::process::Command::new("python3")
        .arg(common::root().join("tools/federated/run.py"))
        .args([
            "--flwr",
            bin.to_str().unwrap(),
            "--petal",
            env!("CARGO_BIN_EXE_petal"),
        ])
        .args(["--model", golden().join("llama").to_str().unwrap()])
        .args(["--partitions", &format!("{c0},{c1}"), "--val-data", &val])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--rounds",
            "2",
            "--local-steps",
            "2",
        ])
        .args([
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--keep-client-adapters",
        ])
        .args(["--timeout", "300"])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{said}");
    let rounds: Vec<Value> = std::fs::read_to_string(out.join("rounds.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rounds.len(), 3, "rounds 0, 1, 2: {rounds:?}");
    let global = |r: usize| adapter_tensors(&out.join(format!("round-{r}/adapter")));
    let bytes: usize = global(0).values().map(|t| t.elem_count() * 4).sum();
    assert_eq!(rounds[1]["bytes_up"], 2 * bytes, "only the adapter travels");
    for r in 1..=2 {
        let client = |i: usize| out.join(format!("clients/round-{r}/client-{i}"));
        let n = |i: usize| -> f64 {
            let s: Value = serde_json::from_str(
                &std::fs::read_to_string(client(i).join("summary.json")).unwrap(),
            )
            .unwrap();
            s["train_examples"].as_f64().unwrap()
        };
        let (n0, n1) = (n(0), n(1));
        assert!(n0 > n1, "{n0} {n1}");
        let (a, b, g) = (
            adapter_tensors(&client(0)),
            adapter_tensors(&client(1)),
            global(r),
        );
        for (k, t) in &g {
            let mean = ((&a[k] * (n0 / (n0 + n1))).unwrap() + (&b[k] * (n1 / (n0 + n1))).unwrap())
                .unwrap();
            let d = petal_ops::testing::max_rel(t, &mean);
            assert!(d < 1e-5, "round {r} {k}: {d}");
        }
    }
    // the final global adapter is round 2's, and petal loads it
    let fin = adapter_tensors(&out.join("adapter"));
    let last = global(2);
    assert!(fin
        .iter()
        .all(|(k, t)| petal_ops::testing::max_rel(t, &last[k]) == 0.0));
    let e = petal(&[
        "eval",
        "--model",
        golden().join("llama").to_str().unwrap(),
        "--adapter",
        out.join("adapter").to_str().unwrap(),
        "--data",
        &val,
        "--seq-len",
        "16",
        "--json",
    ]);
    assert!(e.status.success(), "{}", stderr(&e));
}
