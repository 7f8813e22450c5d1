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

/// The largest change of any adapter tensor between two adapter folders.
fn moved(a: &str, b: &str) -> f32 {
    let load = |d: &str| {
        candle_core::safetensors::load(
            std::path::Path::new(d).join("adapter/adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (load(a), load(b));
    a.iter()
        .map(|(k, t)| {
            (t - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
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
