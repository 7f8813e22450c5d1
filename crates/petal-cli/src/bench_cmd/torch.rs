//! The PyTorch + PEFT baseline (tools/bench/pytorch_baseline.py) as a child process serving
//! rounds of measured steps over stdin/stdout.

use super::BenchArgs;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub(super) struct Torch {
    pub child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

pub(super) fn start_torch(a: &BenchArgs, wl: &Value) -> Result<Option<Torch>> {
    let py = a
        .python
        .clone()
        .or_else(|| std::env::var("PETAL_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import torch, transformers, peft"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("--vs-pytorch: skipped: `{py}` cannot import torch, transformers and peft (pip install -r tools/golden/requirements.txt, then --python)");
        return Ok(None);
    }
    // the source tree this binary was built from, else the current folder (a binary copied
    // to another machine with the repository beside it)
    let rel = "tools/bench/pytorch_baseline.py";
    let script = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel),
        rel.into(),
    ]
    .into_iter()
    .find(|p| p.exists())
    .with_context(|| format!("--vs-pytorch: {rel} not found: run from petal's source folder"))?;
    let mut child = Command::new(&py)
        .arg(script)
        .arg(wl.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if !line.contains("ready") {
        bail!("PyTorch baseline failed to start: {line}");
    }
    Ok(Some(Torch { child, out }))
}

impl Torch {
    pub fn round(&mut self, n: usize) -> Result<Vec<Value>> {
        let stdin = self.child.stdin.as_mut().context("stdin")?;
        writeln!(stdin, "{n}")?;
        stdin.flush()?;
        (0..n)
            .map(|_| {
                let mut l = String::new();
                self.out.read_line(&mut l)?;
                serde_json::from_str(&l).with_context(|| format!("baseline said: {l}"))
            })
            .collect()
    }
}
