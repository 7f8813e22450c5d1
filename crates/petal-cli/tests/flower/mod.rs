//! Helpers of the Flower tests (`federated.rs`): running `tools/federated/run.py` on the golden
//! models, reading the rounds and the kept client adapters, and LEGEND's layer-wise mean.

use crate::common::{self, golden};
use candle_core::Tensor;
use serde_json::Value;
use std::collections::HashMap;

pub fn adapter_tensors(
    dir: &std::path::Path,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

/// `tools/federated/run.py` with the venv's Flower (`--flwr`), this build's petal and `args`;
/// asserts it succeeded, with what it said.
pub fn run_py(python: &std::path::Path, args: &[&str]) {
    let o = std::process::Command::new("python3")
        .arg(common::root().join("tools/federated/run.py"))
        .args(["--flwr", python.parent().unwrap().to_str().unwrap()])
        .args(["--petal", env!("CARGO_BIN_EXE_petal"), "--timeout", "300"])
        .args(args)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{said}");
}

/// A federation on Flower's Deployment Engine (tools/federated/run.py): two clients on the tiny
/// golden Llama (client 0 with twice client 1's data), 2 local steps a round, the clients'
/// adapters kept; `extra` run options. Returns the run folder and the held-out data, or None
/// (having said why) without a venv with flwr.
pub fn federate(tmp: &std::path::Path, extra: &[&str]) -> Option<(std::path::PathBuf, String)> {
    let python = common::venv("venv-flower", "python/flower/requirements.txt")?;
    Some(federate_with(&python, tmp, extra))
}

/// [`federate`] with the venv of `python` (the Simulation Engine's has Ray).
pub fn federate_with(
    python: &std::path::Path,
    tmp: &std::path::Path,
    extra: &[&str],
) -> (std::path::PathBuf, String) {
    let write = |name: &str, words: usize, step: usize| {
        let p = tmp.join(name);
        let text: Vec<String> = (0..words)
            .map(|i| format!("w{}", (i * step + 1) % 96))
            .collect();
        std::fs::write(&p, text.join(" ")).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (c0, c1, val) = (
        write("c0.txt", 600, 7),
        write("c1.txt", 300, 11),
        write("v.txt", 200, 5),
    );
    let out = tmp.join("fed");
    let (model, parts) = (golden().join("llama"), format!("{c0},{c1}"));
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--partitions",
        &parts,
        "--val-data",
        &val,
        "--out",
        out.to_str().unwrap(),
        "--local-steps",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--keep-client-adapters",
    ];
    args.extend(extra);
    run_py(python, &args);
    (out, val)
}

pub fn rounds(out: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("rounds.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Client `i`'s adapter of round `r` and its number of training examples.
pub fn client(out: &std::path::Path, r: usize, i: usize) -> (HashMap<String, Tensor>, f64) {
    let dir = out.join(format!("clients/round-{r}/client-{i}"));
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    (adapter_tensors(&dir), s["train_examples"].as_f64().unwrap())
}

/// Client 0's and client 1's adapters weighted by their examples (FedAvg's mean), for `key`.
pub fn weighted_mean(
    (a, n0): &(HashMap<String, Tensor>, f64),
    (b, n1): &(HashMap<String, Tensor>, f64),
    key: &str,
) -> Tensor {
    let (w0, w1) = (n0 / (n0 + n1), n1 / (n0 + n1));
    ((&a[key] * w0).unwrap() + (&b[key] * w1).unwrap()).unwrap()
}

/// The layer index in a tensor's name.
pub fn layer(name: &str) -> usize {
    let rest = &name[name.find("layers.").unwrap() + 7..];
    rest[..rest.find('.').unwrap()].parse().unwrap()
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// [`assert_layerwise_mean`] for rounds 1..=`last` of a two-client run in `out`, from the kept
/// client adapters and the global adapter of each round.
pub fn assert_rounds_layerwise(out: &std::path::Path, last: usize) {
    let global = |r: usize| adapter_tensors(&out.join(format!("round-{r}/adapter")));
    for r in 1..=last {
        let (c0, c1) = (client(out, r, 0), client(out, r, 1));
        let clients = [(&c0.0, c0.1), (&c1.0, c1.1)];
        assert_layerwise_mean(r, &global(r - 1), &global(r), &clients);
    }
}

/// LEGEND's aggregation, element by element: each element of round `r`'s global adapter `g` is
/// the example-weighted mean of the clients (adapter, examples) whose tensor holds it (a client's
/// tensor is the leading corner of the global one), else its value in `prev`.
pub fn assert_layerwise_mean(
    r: usize,
    prev: &HashMap<String, Tensor>,
    g: &HashMap<String, Tensor>,
    clients: &[(&HashMap<String, Tensor>, f64)],
) {
    for (k, t) in g {
        let dims = t.dims().to_vec();
        let (p, t) = (flat(&prev[k]), flat(t));
        let parts: Vec<(Vec<f32>, Vec<usize>, f64)> = clients
            .iter()
            .filter_map(|(c, n)| Some((flat(c.get(k)?), c[k].dims().to_vec(), *n)))
            .collect();
        for (i, (&got, &before)) in t.iter().zip(&p).enumerate() {
            // the element's index along each axis
            let mut at = vec![0; dims.len()];
            let mut rest = i;
            for (ax, &d) in dims.iter().enumerate().rev() {
                at[ax] = rest % d;
                rest /= d;
            }
            let (mut sum, mut weight) = (0f64, 0f64);
            for (v, shape, n) in &parts {
                if at.iter().zip(shape).all(|(a, s)| a < s) {
                    let j = at.iter().zip(shape).fold(0, |j, (a, s)| j * s + a);
                    sum += n * v[j] as f64;
                    weight += n;
                }
            }
            let want = if weight > 0.0 {
                (sum / weight) as f32
            } else {
                before
            };
            assert!(
                (got - want).abs() <= 1e-6 + 1e-5 * want.abs(),
                "round {r} {k}{at:?}: {got} vs {want}"
            );
        }
    }
}

/// Two BERT classifier clients for one round, each holding one class (label skew at its
/// extreme: client 0 only "neg", client 1 only "pos"), their adapters kept; `extra` run.py
/// arguments. None when Flower's venv cannot be made (said by the helper).
pub fn classifier_run(tmp: &std::path::Path, extra: &[&str]) -> Option<std::path::PathBuf> {
    let python = common::venv("venv-flower", "python/flower/requirements.txt")?;
    let (train, val) = common::cls_data(tmp);
    let text = std::fs::read_to_string(&train).unwrap();
    let part = |label: &str| {
        let p = tmp.join(format!("{label}.jsonl"));
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("\"{label}\"")))
            .collect();
        std::fs::write(&p, rows.join("\n")).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (neg, pos) = (part("neg"), part("pos"));
    let out = tmp.join("fed");
    let (model, parts) = (golden().join("bert_minilm_names"), format!("{neg},{pos}"));
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--task-type",
        "seq-cls",
        "--partitions",
        &parts,
        "--val-data",
        &val,
        "--out",
        out.to_str().unwrap(),
        "--rounds",
        "1",
        "--local-steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--keep-client-adapters",
    ];
    args.extend_from_slice(extra);
    run_py(&python, &args);
    Some(out)
}

/// `flower-supernode` (the venv of `python`) pointed at a port where nothing listens, allowed 2
/// retries: its exit status (None: still running after 60 s, then killed) and what it said.
pub fn supernode_without_superlink(
    python: &std::path::Path,
) -> (Option<std::process::ExitStatus>, String) {
    use std::os::unix::process::CommandExt;
    let bin = python.parent().unwrap();
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (link, own) = (free(), free()); // nothing listens on `link`
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // its output to a file, not a pipe: the SuperExec it starts would hold a pipe open; in a
    // process group of its own, ended at the end whatever happened
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("supernode.log");
    let file = std::fs::File::create(&log).unwrap();
    let t0 = std::time::Instant::now();
    let mut child = std::process::Command::new(bin.join("flower-supernode"))
        .env("PATH", path)
        .args(["--insecure", "--superlink", &format!("127.0.0.1:{link}")])
        .args(["--port", &own.to_string(), "--max-retries", "2"])
        .args(["--node-config", "partition-id=0 num-partitions=2"])
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .process_group(0)
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed().as_secs() > 60 {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let group = format!("-{}", child.id());
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &group])
        .output();
    let said = std::fs::read_to_string(&log).unwrap();
    (status, said)
}
