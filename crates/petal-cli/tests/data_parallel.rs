//! Data-parallel training under Open MPI's `mpirun` (`petal` built with the `mpi` feature as
//! `petal-mpi` next to the test's `petal`, by `tools/mpi/build.sh`): N ranks of b rows train
//! as one process of N·b rows, a killed rank stops the job and its last checkpoint resumes,
//! ranks with other settings are refused. Skips, saying what is missing, without Open MPI or
//! the binary.

mod common;

use common::{golden, petal, stderr, words};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `mpirun` and the `mpi`-feature petal, or None having said which is missing.
fn mpi() -> Option<(PathBuf, PathBuf)> {
    let bin = std::env::var_os("PETAL_MPI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_BIN_EXE_petal")).with_file_name("petal-mpi"));
    let mpirun = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("mpirun"))
            .find(|f| f.is_file())
    });
    match (mpirun, bin.is_file()) {
        (None, _) => petal_ops::testing::skip_missing_tool(
            "no `mpirun` on PATH (Open MPI: apt-get install openmpi-bin \
             libopenmpi-dev libclang-dev, then tools/mpi/build.sh)",
        ),
        (Some(_), false) => petal_ops::testing::skip_missing_tool(&format!(
            "{} is missing (tools/mpi/build.sh builds petal with the `mpi` feature)",
            bin.display()
        )),
        (Some(m), true) => return Some((m, bin)),
    }
    None
}

/// `mpirun -np N petal-mpi ARGS` (as root, as on CI; more ranks than cores).
fn mpirun(m: &(PathBuf, PathBuf), np: usize, args: &[String]) -> Output {
    Command::new(&m.0)
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &np.to_string(),
        ])
        .arg(&m.1)
        .args(args)
        .output()
        .unwrap()
}

/// `petal train` of LoRA on the tiny golden Llama with `rows` per batch into `out`.
fn train(data: &Path, out: &Path, rows: usize, extra: &[&str]) -> Vec<String> {
    let model = golden().join("llama");
    let mut a: Vec<String> = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "16",
        "--val-fraction",
        "0.1",
        "--lr",
        "5e-3",
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        &rows.to_string(),
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The metric lines of a run folder.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The largest difference of `key` between the steps of two runs (which must have the same
/// steps, and the key at the same ones).
fn max_diff(a: &[serde_json::Value], b: &[serde_json::Value], key: &str) -> f64 {
    assert_eq!(a.len(), b.len(), "steps");
    a.iter()
        .zip(b)
        .map(|(x, y)| match (x[key].as_f64(), y[key].as_f64()) {
            (Some(p), Some(q)) => (p - q).abs(),
            (None, None) => 0.0,
            _ => panic!("{key} at step {} in one run only", x["step"]),
        })
        .fold(0.0, f64::max)
}

fn adapter(out: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    let f = out.join("adapter/adapter_model.safetensors");
    candle_core::safetensors::load(f, &candle_core::Device::Cpu).unwrap()
}

#[test]
fn n_ranks_of_b_rows_train_as_one_process_of_n_times_b_rows() {
    let Some(m) = mpi() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = words(dir.path());
    // 34 training sequences: the last batch of an epoch is short, and leaves some ranks no
    // rows (2 ranks of 2 with accumulation: 34 = 8·4 + 2; 3 ranks of 1: 34 = 11·3 + 1)
    for (np, b, accum, steps) in [(2, 2, 2, "6"), (3, 1, 1, "14")] {
        let accum_flag = accum.to_string();
        let flags = [
            "--grad-accum",
            &accum_flag,
            "--max-steps",
            steps,
            "--max-grad-norm",
            "0.1",
            "--eval-every",
            "3",
            "--schedule",
            "linear",
            "--warmup-steps",
            "1",
        ];
        let one = dir.path().join(format!("one-{np}"));
        let o = petal(
            &train(&data, &one, np * b, &flags)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let many = dir.path().join(format!("ranks-{np}"));
        let o = mpirun(&m, np, &train(&data, &many, b, &flags));
        assert!(o.status.success(), "{}", stderr(&o));
        let (a, r) = (metrics(&one), metrics(&many));
        for key in ["loss", "grad_norm", "eval_loss", "lr", "tokens"] {
            let d = max_diff(&a, &r, key);
            assert!(d < 1e-5, "{np} ranks: {key} differs by {d}");
        }
        // clipping was on, and the epoch's short batch was read
        assert!(a.iter().any(|s| s["grad_norm"].as_f64().unwrap() > 0.1));
        assert!(a
            .iter()
            .any(|s| s["tokens"].as_u64().unwrap() < (np * b * accum * 16) as u64));
        let (wa, wr) = (adapter(&one), adapter(&many));
        assert_eq!(wa.len(), wr.len());
        for (name, t) in &wa {
            let d = petal_ops::testing::max_abs(t, &wr[name]);
            assert!(d < 1e-5, "{np} ranks: {name} differs by {d}");
        }
        // rank 0 alone wrote the run folder: one metrics line per step
        assert_eq!(r.len(), steps.parse::<usize>().unwrap());
    }
}

/// Options of runs that resume exactly: a constant learning rate (a resumed run's schedule is
/// the same whatever --max-steps), no evaluation, a checkpoint every `every` steps.
fn checkpointed(every: &str) -> [&str; 6] {
    [
        "--schedule",
        "constant",
        "--eval-every",
        "0",
        "--save-every",
        every,
    ]
}

#[test]
fn a_killed_rank_stops_the_job_and_the_last_checkpoint_resumes() {
    let Some(m) = mpi() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = words(dir.path());
    let flags = checkpointed("4");
    let out = dir.path().join("killed");
    let mut long = train(&data, &out, 2, &flags);
    long.extend(["--max-steps".into(), "100000".into()]);
    let job = Command::new(&m.0)
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(&m.1)
        .args(&long)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let first = out.join("checkpoints/step-000008");
    let t0 = std::time::Instant::now();
    while !first.exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(first.exists(), "no checkpoint within 2 minutes");
    // SIGKILL the job's second rank (a child of mpirun)
    let kids = Command::new("pgrep")
        .args(["-P", &job.id().to_string()])
        .output()
        .unwrap();
    let kids: Vec<String> = String::from_utf8_lossy(&kids.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(kids.len(), 2, "ranks: {kids:?}");
    Command::new("kill")
        .args(["-9", &kids[1]])
        .status()
        .unwrap();
    let o = job.wait_with_output().unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("exited on signal 9"), "{err}");
    // resume from the last checkpoint to 4 steps past it: the same steps as a run never
    // stopped
    let step: usize = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap()[5..]
        .parse()
        .unwrap();
    let to = (step + 4).to_string();
    let mut resume = train(&data, &out, 2, &flags);
    resume.extend(["--max-steps".into(), to.clone(), "--resume".into()]);
    resume.push(out.to_str().unwrap().into());
    let o = mpirun(&m, 2, &resume);
    assert!(o.status.success(), "{}", stderr(&o));
    let straight = dir.path().join("straight");
    let mut whole = train(&data, &straight, 2, &flags);
    whole.extend(["--max-steps".into(), to]);
    let o = mpirun(&m, 2, &whole);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (metrics(&out), metrics(&straight));
    assert_eq!(max_diff(&a, &b, "loss"), 0.0);
    assert_eq!(a.len(), step + 4);
}

#[test]
fn ranks_with_other_settings_are_refused_naming_the_setting() {
    let Some(m) = mpi() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = words(dir.path());
    let out = dir.path().join("odd");
    let args = |clip: &str| {
        train(
            &data,
            &out,
            2,
            &["--max-steps", "3", "--max-grad-norm", clip],
        )
    };
    let o = Command::new(&m.0)
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "1"])
        .arg(&m.1)
        .args(args("1"))
        .args([":", "-np", "1"])
        .arg(&m.1)
        .args(args("0.5"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(
            "of 2: ranks run with other settings than rank 0 (rank 1: max_grad_norm: 1.0 -> 0.5)"
        ),
        "{err}"
    );
    assert!(!out.join("adapter").exists() && !out.join("metrics.jsonl").exists());
    // a method whose mask comes from each process's own squared gradients
    let o = mpirun(
        &m,
        2,
        &train(
            &data,
            &out,
            2,
            &[
                "--max-steps",
                "3",
                "--method",
                "rosa",
                "--set",
                "schedule=wl0",
            ],
        ),
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(
            "ROSA does not train data-parallel: its mask is chosen from squared gradients"
        ),
        "{err}"
    );
}

#[test]
fn a_run_of_two_ranks_resumes_in_one_process_of_the_same_batch_and_not_another() {
    let Some(m) = mpi() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = words(dir.path());
    let flags = checkpointed("3");
    let with = |out: &Path, rows: usize, steps: &str, resume: bool| {
        let mut a = train(&data, out, rows, &flags);
        a.extend(["--max-steps".into(), steps.into()]);
        if resume {
            a.extend(["--resume".into(), out.to_str().unwrap().into()]);
        }
        a
    };
    let run = |a: Vec<String>| petal(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (split, whole) = (dir.path().join("split"), dir.path().join("whole"));
    let o = mpirun(&m, 2, &with(&split, 2, "3", false));
    assert!(o.status.success(), "{}", stderr(&o));
    // one process of 4 rows takes the same batches
    let o = run(with(&split, 4, "6", true));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(with(&whole, 4, "6", false));
    assert!(o.status.success(), "{}", stderr(&o));
    let d = max_diff(&metrics(&split), &metrics(&whole), "loss");
    assert!(d < 1e-5, "loss differs by {d}");
    // one process of 2 rows takes others: refused naming the batch
    let o = run(with(&split, 2, "9", true));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("batch_size: 4 -> 2"), "{}", stderr(&o));
}

#[test]
fn a_petal_without_the_mpi_feature_refuses_to_train_as_one_of_several_ranks() {
    if cfg!(feature = "mpi") {
        return; // (this test binary's petal has the feature)
    }
    let dir = tempfile::tempdir().unwrap();
    let data = words(dir.path());
    let out = dir.path().join("alone");
    let args = train(&data, &out, 2, &["--max-steps", "2"]);
    // what Open MPI's mpirun tells each rank it starts
    let o = Command::new(env!("CARGO_BIN_EXE_petal"))
        .args(&args)
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("built without the `mpi` feature"),
        "{}",
        stderr(&o)
    );
    assert!(!out.join("metrics.jsonl").exists());
}

#[test]
fn gradient_sums_on_nccl_without_a_gpu_are_refused_saying_what_is_missing() {
    let Some(m) = mpi() else { return };
    if Path::new("/dev/nvidiactl").exists() {
        eprintln!(
            "skipped: this machine has an NVIDIA driver (the test checks the refusal without)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = words(dir.path());
    let out = dir.path().join("nccl");
    let run = |collective: &str| {
        Command::new(&m.0)
            .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", "-x"])
            .arg(format!("PETAL_COLLECTIVE={collective}"))
            .arg(&m.1)
            .args(train(&data, &out, 2, &["--max-steps", "2"]))
            .output()
            .unwrap()
    };
    let o = run("nccl");
    assert!(!o.status.success());
    let err = stderr(&o);
    // CUDA's driver library is loaded first, at run time (the build needs no CUDA toolkit);
    // where a CUDA toolkit put one on the machine, it loads and finds no device
    assert!(
        err.contains("NCCL: rank")
            && err.contains(": CUDA device ")
            && (err.contains("Unable to dynamically load the \"cuda\" shared library")
                || err.contains("CUDA_ERROR_NO_DEVICE"))
            && err.contains("PETAL_COLLECTIVE=mpi sums on MPI instead"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.join("metrics.jsonl").exists() && !out.join("adapter").exists());
    let o = run("gloo");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("PETAL_COLLECTIVE=`gloo`: the gradient sums run on `mpi` or `nccl`"),
        "{}",
        stderr(&o)
    );
}
