//! What federated rounds stand on: `petal train --max-steps 0` writes the initialised adapter,
//! `petal train --init-adapter` starts a client's local training
//! from the global adapter (its weights, a fresh optimizer), and refuses an adapter of another
//! shape naming the tensor.

mod common;
mod flower;

use candle_core::Tensor;
use common::{golden, petal, stderr, train, words};
use flower::*;
use serde_json::Value;
use std::collections::HashMap;

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

#[test]
fn training_over_a_merged_adapter_starts_from_the_model_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = words(tmp.path());
    let model = golden().join("llama");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let out = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let trained = out("trained");
    let mut args = train(m, d, &trained);
    args.extend(["--max-steps", "4", "--lr", "0.01"]);
    assert!(petal(&args).status.success());
    let a = std::path::PathBuf::from(format!("{trained}/adapter"));
    // the held-out loss before any step, from a start
    let before = |name: &str, start: &[&str]| -> f64 {
        let o = out(name);
        let mut args = train(m, d, &o);
        args.extend(["--max-steps", "0", "--json"]);
        args.extend(start);
        summary(&petal(&args))["eval_before"]["loss"]
            .as_f64()
            .unwrap()
    };
    let a_str = a.to_str().unwrap();
    let unmerged = before("unmerged", &["--init-adapter", a_str]);
    let base = before("base", &[]);
    // merged into the weights, with a fresh adapter (B = 0) on top: the same model
    let merged = before("merged", &["--merge-adapter", a_str]);
    assert!((merged - unmerged).abs() < 1e-5, "{merged} vs {unmerged}");
    assert!((base - unmerged).abs() > 1e-3, "{base} vs {unmerged}");
    // LEGEND's client: layer 0's update and layer 1's components beyond rank 2 merged, layer 1's
    // first 2 components trained from the adapter's own
    let tensors = adapter_tensors(&a);
    let config = std::fs::read_to_string(a.join("adapter_config.json")).unwrap();
    let folder = |name: &str, t: &HashMap<String, Tensor>| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        candle_core::safetensors::save(t, dir.join("adapter_model.safetensors")).unwrap();
        std::fs::write(dir.join("adapter_config.json"), &config).unwrap();
        dir.to_str().unwrap().to_string()
    };
    let (mut rest, mut own) = (HashMap::new(), HashMap::new());
    for (k, t) in &tensors {
        let mut t = t.clone();
        if layer(k) == 1 {
            let r = 2;
            if k.ends_with("lora_A.weight") {
                own.insert(k.clone(), t.narrow(0, 0, r).unwrap());
            } else {
                own.insert(k.clone(), t.narrow(1, 0, r).unwrap());
                let cols = t.dim(1).unwrap();
                let zero = t.narrow(1, 0, r).unwrap().zeros_like().unwrap();
                t = Tensor::cat(&[&zero, &t.narrow(1, r, cols - r).unwrap()], 1).unwrap();
            }
        }
        rest.insert(k.clone(), t);
    }
    let (rest, own) = (folder("rest", &rest), folder("own", &own));
    // rank 2 at the same scale alpha / r as the adapter's
    let cfg: Value = serde_json::from_str(&config).unwrap();
    let alpha = cfg["lora_alpha"].as_f64().unwrap() * 2.0 / cfg["r"].as_f64().unwrap();
    let alpha = alpha.to_string();
    let legend = before(
        "legend",
        &[
            "--merge-adapter",
            &rest,
            "--init-adapter",
            &own,
            "--layers-to-transform",
            "1",
            "--r",
            "2",
            "--alpha",
            &alpha,
        ],
    );
    assert!((legend - unmerged).abs() < 1e-5, "{legend} vs {unmerged}");
    // a folder that is no adapter is named
    let e = stderr(&petal(
        &[&train(m, d, &out("bad"))[..], &["--merge-adapter", d]].concat(),
    ));
    assert!(e.contains("--merge-adapter") && e.contains(d), "{e}");
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

#[test]
fn fedavg_on_flowers_deployment_engine_averages_the_clients_adapters_by_their_examples() {
    // over TLS (`--tls`: the run's own CA; the other tests' runs are plain)
    let tls = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !tls {
        eprintln!("no `openssl` on PATH: this run is plain, not TLS (apt install openssl)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let extra: &[&str] = if tls {
        &["--rounds", "2", "--tls"]
    } else {
        &["--rounds", "2"]
    };
    let Some((out, val)) = federate(tmp.path(), extra) else {
        return;
    };
    assert_fedavg(&out, &val, false);
    // Flower warns of every plain channel it opens: none with TLS
    for log in ["superlink", "supernode-0", "supernode-1"] {
        let said = std::fs::read_to_string(out.join(format!("logs/{log}.log"))).unwrap();
        assert_eq!(said.contains("`--insecure` was set"), !tls, "{log}: {said}");
    }
}

#[test]
fn a_client_whose_server_is_unreachable_retries_then_stops_saying_so() {
    let Some(python) = common::venv("venv-flower", "python/flower/requirements.txt") else {
        return;
    };
    let (status, said) = supernode_without_superlink(&python);
    let status = status.unwrap_or_else(|| panic!("still running after 60 s: {said}"));
    assert!(!status.success(), "{said}");
    for what in [
        "Connection attempt failed, retrying",
        "Failed to initialize the connection to the SuperLink",
        "Connection refused",
    ] {
        assert!(said.contains(what), "{what}: {said}");
    }
}

#[test]
fn fedavg_on_flowers_simulation_engine_runs_the_clients_in_ray_and_averages_them_alike() {
    let Some(python) = common::venv(
        "venv-flower-sim",
        "python/flower/requirements-simulation.txt",
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (out, val) = federate_with(
        &python,
        tmp.path(),
        &["--rounds", "2", "--engine", "simulation"],
    );
    assert_fedavg(&out, &val, true);
}

/// Rounds 0-2 of a two-client FedAvg run in `out` (by [`federate`]): only the adapter travels,
/// each round's global adapter is the clients' example-weighted mean, the last one is the
/// run's and petal evaluates it on `val`; each client ran in a Ray worker iff `in_ray`.
fn assert_fedavg(out: &std::path::Path, val: &str, in_ray: bool) {
    let rounds = rounds(&out);
    assert_eq!(rounds.len(), 3, "rounds 0, 1, 2: {rounds:?}");
    let global = |r: usize| adapter_tensors(&out.join(format!("round-{r}/adapter")));
    let bytes: usize = global(0).values().map(|t| t.elem_count() * 4).sum();
    assert_eq!(rounds[1]["bytes_up"], 2 * bytes, "only the adapter travels");
    for r in 1..=2 {
        let (c0, c1) = (client(out, r, 0), client(out, r, 1));
        assert!(c0.1 > c1.1, "{} {}", c0.1, c1.1);
        for i in 0..2 {
            let s = std::fs::read_to_string(
                out.join(format!("clients/round-{r}/client-{i}/summary.json")),
            );
            let s: Value = serde_json::from_str(&s.unwrap()).unwrap();
            assert_eq!(s["ray_worker"], in_ray, "round {r} client {i}");
        }
        for (k, t) in &global(r) {
            let d = petal_ops::testing::max_rel(t, &weighted_mean(&c0, &c1, k));
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
        val,
        "--seq-len",
        "16",
        "--json",
    ]);
    assert!(e.status.success(), "{}", stderr(&e));
}

#[test]
fn legend_gives_a_slow_client_fewer_layers_and_averages_each_element_over_its_trainers() {
    let tmp = tempfile::tempdir().unwrap();
    // client 1 is a device 4 times slower (every step counted as 10 ms, as above)
    let args = [
        "--rounds",
        "3",
        "--strategy",
        "legend",
        "--slowdowns",
        "1,4",
        "--step-seconds",
        "0.01",
    ];
    let Some((out, _)) = federate(tmp.path(), &args) else {
        return;
    };
    let rounds = rounds(&out);
    assert_eq!(rounds.len(), 4, "{rounds:?}");
    let global = |r: usize| adapter_tensors(&out.join(format!("round-{r}/adapter")));
    let depth = |r: usize, i: usize| rounds[r]["clients"][i]["depth"].as_u64().unwrap();
    // round 1 measures every client on both layers; from round 2 the slow one trains the
    // output-side layer alone, and sends less
    assert_eq!((depth(1, 0), depth(1, 1)), (2, 2));
    for r in 2..=3 {
        assert_eq!((depth(r, 0), depth(r, 1)), (2, 1), "round {r}");
        let up = |i: usize| rounds[r]["clients"][i]["bytes_up"].as_u64().unwrap();
        assert!(up(1) < up(0), "round {r}: {} vs {}", up(1), up(0));
        let ((a, n0), (b, n1)) = (client(&out, r, 0), client(&out, r, 1));
        assert!(
            b.keys().all(|k| layer(k) == 1),
            "the slow client trains layer 1 only"
        );
        assert_layerwise_mean(r, &global(r - 1), &global(r), &[(&a, n0), (&b, n1)]);
    }
    // what the clients trained moved the global adapter on both layers
    let (first, last) = (global(0), global(3));
    assert!(last
        .iter()
        .all(|(k, t)| petal_ops::testing::max_abs(t, &first[k]) > 0.0));
}

#[test]
fn a_client_that_fails_or_sends_another_shape_is_left_out_and_the_round_completes() {
    let tmp = tempfile::tempdir().unwrap();
    // client 1 crashes in round 1; client 0 sends a tensor cut short in round 2
    let faults = ["--inject", "fail-at=1:1", "--inject", "misshape-at=0:2"];
    let Some((out, _)) = federate(tmp.path(), &[&["--rounds", "3"][..], &faults].concat()) else {
        return;
    };
    let rounds = rounds(&out);
    assert_eq!(rounds.len(), 4, "{rounds:?}");
    let errors = |r: usize, key: &str| -> Vec<String> {
        rounds[r][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["error"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(errors(1, "failed").len(), 1, "{:?}", rounds[1]);
    assert!(errors(1, "failed")[0].contains("failure injected at round 1"));
    assert!(errors(1, "refused").is_empty() && errors(2, "failed").is_empty());
    let refused = errors(2, "refused");
    assert_eq!(refused.len(), 1, "{:?}", rounds[2]);
    assert!(
        refused[0].contains("tensor base_model.model.") && refused[0].contains("has shape"),
        "{refused:?}"
    );
    assert!(errors(3, "failed").is_empty() && errors(3, "refused").is_empty());
    // each faulty round's global adapter is the one good client's, and nothing else is lost
    let global = |r: usize| adapter_tensors(&out.join(format!("round-{r}/adapter")));
    let same = |a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>| {
        a.iter()
            .map(|(k, t)| petal_ops::testing::max_rel(t, &b[k]))
            .fold(0f32, f32::max)
    };
    assert!(same(&global(1), &client(&out, 1, 0).0) < 1e-6);
    assert!(same(&global(2), &client(&out, 2, 1).0) < 1e-6);
    let (c0, c1) = (client(&out, 3, 0), client(&out, 3, 1));
    for (k, t) in &global(3) {
        assert!(
            petal_ops::testing::max_rel(t, &weighted_mean(&c0, &c1, k)) < 1e-5,
            "{k}"
        );
    }
}

#[test]
fn a_classifier_federates_when_each_client_holds_one_class() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(out) = classifier_run(tmp.path(), &[]) else {
        return;
    };
    let rounds = rounds(&out);
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    for r in &rounds {
        let acc = r["eval_accuracy"].as_f64().expect("accuracy recorded");
        assert!((0.0..=1.0).contains(&acc), "{r}");
    }
    for dir in [
        out.join("adapter"),
        out.join("clients/round-1/client-0"),
        out.join("clients/round-1/client-1"),
    ] {
        let head = adapter_tensors(&dir)
            .into_iter()
            .find(|(k, _)| k.contains("classifier") && k.ends_with("weight"))
            .expect("the head travels");
        assert_eq!(head.1.dims()[0], 2, "{}: two classes", dir.display());
    }
    let labels = common::json_file(&out.join("adapter/labels.json"));
    assert_eq!(labels["names"], serde_json::json!(["neg", "pos"]));
}

#[test]
fn legend_on_a_classifier_gives_the_slow_client_fewer_encoder_layers_and_every_client_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    // client 1 is a device 4 times slower; two encoder layers. Every step counts as 10 ms: a
    // step here takes about 5 ms, and two clients' processes sharing two cores measured
    // medians up to 16 times apart, the slow client sometimes the faster one.
    let extra = [
        "--rounds",
        "2",
        "--strategy",
        "legend",
        "--slowdowns",
        "1,4",
        "--step-seconds",
        "0.01",
    ];
    let Some(out) = classifier_run(tmp.path(), &extra) else {
        return;
    };
    let rounds = rounds(&out);
    assert_eq!(rounds.len(), 3, "{rounds:?}");
    let depth = |r: usize, i: usize| rounds[r]["clients"][i]["depth"].as_u64().unwrap();
    assert_eq!((depth(1, 0), depth(1, 1)), (2, 2));
    assert_eq!((depth(2, 0), depth(2, 1)), (2, 1));
    let ((a, n0), (b, n1)) = (client(&out, 2, 0), client(&out, 2, 1));
    let head = |c: &HashMap<String, Tensor>| c.keys().filter(|k| k.contains("classifier")).count();
    assert!(
        head(&a) > 0 && head(&a) == head(&b),
        "both clients train the head"
    );
    let in_layer = |k: &String| k.contains("encoder.layer.");
    assert!(
        b.keys()
            .filter(|k| in_layer(k))
            .all(|k| k.contains("encoder.layer.1.")),
        "the slow client trains the output-side layer alone: {:?}",
        b.keys()
    );
    assert!(a.keys().any(|k| k.contains("encoder.layer.0.")));
    assert_rounds_layerwise(&out, 2);
    assert!(n0 > 0.0 && n1 > 0.0);
}

#[test]
fn legend_sending_the_whole_adapter_trains_each_client_on_the_global_model() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = [
        "--rounds",
        "2",
        "--strategy",
        "legend",
        "--slowdowns",
        "1,4",
        "--step-seconds",
        "0.01",
        "--legend-send",
        "all",
    ];
    let Some(out) = classifier_run(tmp.path(), &extra) else {
        return;
    };
    let rounds = rounds(&out);
    let depth = |i: usize| rounds[2]["clients"][i]["depth"].as_u64().unwrap();
    assert_eq!((depth(0), depth(1)), (2, 1));
    let global = |r: usize| adapter_tensors(&out.join(format!("round-{r}/adapter")));
    // it started from the global model, layer 0's update merged into its weights: its held-out
    // loss before training is round 1's adapter's on the same sentence (its run redone whole)
    let dir = out.join("clients/round-2/client-1");
    let kept = common::json_file(&dir.join("summary.json"));
    let (model, data) = (
        golden().join("bert_minilm_names"),
        tmp.path().join("pos.jsonl"),
    );
    let (seed, start) = (kept["seed"].to_string(), out.join("round-1/adapter"));
    let again = tmp.path().join("again");
    let o = petal(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--task-type",
        "seq-cls",
        "--data",
        data.to_str().unwrap(),
        "--init-adapter",
        start.to_str().unwrap(),
        "--max-steps",
        "0",
        "--seed",
        &seed,
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--max-eval-examples",
        "1",
        "--out",
        again.to_str().unwrap(),
        "--json",
    ]);
    let want = summary(&o)["eval_before"]["loss"].as_f64().unwrap();
    let got = kept["eval_before"]["loss"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // the slow client gets the whole global adapter, sends back its layer and the head
    let all: usize = global(1).values().map(|t| t.elem_count() * 4).sum();
    assert_eq!(rounds[2]["clients"][1]["bytes_down"], all);
    let (b, _) = client(&out, 2, 1);
    assert!(b
        .keys()
        .filter(|k| k.contains("encoder.layer."))
        .all(|k| k.contains("encoder.layer.1.")));
    assert_rounds_layerwise(&out, 2);
}

#[test]
fn fedins_pools_and_keys_travel_and_average_by_examples() {
    // FedIns: every pool tensor and the shared keys are the clients' example-weighted mean
    let tmp = tempfile::tempdir().unwrap();
    let extra = [
        "--method",
        "fedins",
        "--r",
        "0",
        "--alpha",
        "0",
        "--method-options",
        "pool_size=3;top_k=2",
    ];
    let Some(out) = classifier_run(tmp.path(), &extra) else {
        return;
    };
    let (c0, c1) = (client(&out, 1, 0), client(&out, 1, 1));
    let g = adapter_tensors(&out.join("round-1/adapter"));
    assert!(
        g.keys().any(|k| k.ends_with("fedins_keys")),
        "the keys travel"
    );
    let pools = g.keys().filter(|k| k.ends_with("fedins_scale")).count();
    assert!(pools > 0, "{:?}", g.keys());
    assert!(
        g.keys()
            .any(|k| k.ends_with("classifier.fedins_head_weight")),
        "the pool of heads travels: {:?}",
        g.keys()
    );
    for (k, t) in &g {
        assert!(
            !k.contains("fedins") || t.dims()[0] == 3,
            "{k}: a pool of 3"
        );
        let d = petal_ops::testing::max_rel(t, &weighted_mean(&c0, &c1, k));
        assert!(d < 1e-5, "{k}: {d}");
    }
    assert!(
        petal_ops::testing::max_rel(
            &c0.0["base_model.fedins_keys"],
            &c1.0["base_model.fedins_keys"]
        ) > 0.0,
        "each client trains the keys"
    );
}
