"""What the client and server apps share: running petal, and an adapter folder as arrays."""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
LABELS = "labels.json"  # a classifier's classes (`--task-type seq-cls`), the same on every client


def petal(rc, args):
    """Run `petal ARGS` (the binary from the run config) and return its last stdout line as JSON.

    A failure raises with petal's own one-line error, which Flower reports for the node."""
    cmd = [rc["petal"], *[str(a) for a in args]]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        err = r.stderr.strip().splitlines()
        raise RuntimeError(f"{' '.join(cmd[:2])}: {err[-1] if err else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def task_args(rc):
    """`--task-type` for a classification run (the run config's `task-type`), else nothing."""
    t = str(rc.get("task-type", "") or "")
    return ["--task-type", t] if t else []


def train_args(rc, data, out, steps, seed):
    """`petal train` with the run config's method and budget."""
    sizes = [a for k in ("r", "alpha") if float(rc[k]) > 0 for a in (f"--{k}", rc[k])]
    sets = [a for o in str(rc.get("method-options", "")).split(";") if o.strip()
            for a in ("--set", o.strip())]
    return ["train", "--model", rc["model"], "--data", data, "--out", out, "--json",
            "--method", rc["method"], *sizes, *sets, "--lr", rc["lr"],
            "--max-steps", steps, "--batch-size", rc["batch-size"], "--seq-len", rc["seq-len"],
            "--seed", seed, "--eval-every", 1_000_000, "--max-eval-examples", 1,
            "--overwrite", "true", *task_args(rc)]


def read_adapter(folder):
    """An adapter folder's tensors (PEFT names -> arrays) and its config text."""
    folder = Path(folder)
    return load_file(str(folder / WEIGHTS)), (folder / CONFIG).read_text()


def read_labels(folder):
    """A classifier adapter's labels' mapping as text ("" when the folder has none)."""
    p = Path(folder) / LABELS
    return p.read_text() if p.exists() else ""


def write_adapter(folder, arrays, config_text, labels_text=""):
    """An adapter folder from arrays and config text (and a classifier's labels' mapping),
    written whole (a temp folder renamed)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / WEIGHTS),
              metadata={"format": "pt"})
    (tmp / CONFIG).write_text(config_text)
    if labels_text:
        (tmp / LABELS).write_text(labels_text)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def nbytes(arrays):
    return int(sum(a.nbytes for a in arrays.values()))


def shape_problem(expected, arrays):
    """Why a client's tensors are not the ones expected (name -> shape), naming the tensor; None
    when they are."""
    for k, a in arrays.items():
        if k not in expected:
            return f"tensor {k} is not in the global adapter"
        if list(a.shape) != list(expected[k]):
            return f"tensor {k} has shape {list(a.shape)}, the global adapter's has {list(expected[k])}"
    missing = sorted(set(expected) - set(arrays))
    return f"tensor {missing[0]} is missing" if missing else None


def injected(rc, key, pid, rnd):
    """A fault the run config asks this client to make at this round (tests): `key` holds
    "PID:ROUND" pairs, comma-separated."""
    pairs = [p.split(":") for p in str(rc.get(key, "")).split(",") if ":" in p]
    return any(int(p) == pid and int(r) == rnd for p, r in pairs)
