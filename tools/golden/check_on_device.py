"""petal on a CUDA GPU computes what it computes on the CPU and what PEFT computes.

1. A short `petal train --device DEVICE` of several methods on the tiny golden Llama: its loss
   curve against the same run on the CPU.
2. Every golden adapter (made by the real PEFT, tests/fixtures/golden) through `petal forward
   --device DEVICE`: its logits against PEFT's golden logits (relative error, f32).

Needs numpy and safetensors only. Run from the repo root:

    python3 tools/golden/check_on_device.py path/to/petal [cuda]

Exits non-zero when an error passes its tolerance or a command fails.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
PETAL = sys.argv[1] if len(sys.argv) > 1 else "target/release/petal"
DEVICE = sys.argv[2] if len(sys.argv) > 2 else "cuda"
TRAIN = [
    ["--r", "4", "--alpha", "8", "--target-modules", "all-linear"],
    ["--r", "4", "--alpha", "8", "--dora", "true", "--target-modules", "q_proj,v_proj,down_proj"],
    ["--method", "ia3"],
    ["--method", "loha", "--r", "4", "--alpha", "6", "--target-modules", "all-linear"],
    ["--method", "oft", "--oft-block-size", "8"],
    ["--method", "prefix_tuning", "--num-virtual-tokens", "3"],
    ["--method", "road", "--group-size", "8"],
    ["--method", "vera", "--r", "4", "--target-modules", "all-linear"],
]


def run(args):
    r = subprocess.run([PETAL, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"petal {' '.join(args)}: {r.stderr.strip()[-400:]}")


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def forwards(tmp):
    golden = load_file(os.path.join(ROOT, "logits.safetensors"))
    ids = ";".join(",".join(str(int(x)) for x in row) for row in golden["input_ids"])
    worst = 0.0
    for name in sorted(os.listdir(os.path.join(ROOT, "adapters"))):
        out = os.path.join(tmp, f"{name}.safetensors")
        try:
            run(["forward", "--device", DEVICE, "--model", os.path.join(ROOT, name.split("_")[0]), "--adapter",
                 os.path.join(ROOT, "adapters", name), "--input-ids", ids, "--out", out])
            e = rel(load_file(out)["logits"].astype(np.float32), golden[name].astype(np.float32))
        except RuntimeError as err:
            print(f"forward {name:34} FAILED: {err}")
            e = float("inf")
        else:
            print(f"forward {name:34} relative error against PEFT {e:.2e}")
        worst = max(worst, e)
    return worst


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return np.array([m["loss"] for m in map(json.loads, f) if "loss" in m], dtype=np.float64)


def trainings(tmp):
    data = os.path.join(tmp, "data.txt")
    with open(data, "w") as f:
        f.write(" ".join(f"w{(i * 7) % 96}" for i in range(2000)))
    worst = 0.0
    for i, flags in enumerate(TRAIN):
        curves = []
        try:
            for k, dev in enumerate(("cpu", DEVICE)):
                out = os.path.join(tmp, f"train{i}-{k}")
                run(["train", "--device", dev, "--model", os.path.join(ROOT, "llama"), "--data", data,
                     "--max-steps", "6", "--lr", "0.05", "--seq-len", "16", "--batch-size", "2",
                     "--val-fraction", "0", "--out", out, *flags])
                curves.append(losses(out))
            e = rel(curves[1], curves[0]) if len(curves[0]) == len(curves[1]) > 0 else float("inf")
        except RuntimeError as err:
            print(f"train {' '.join(flags):60} FAILED: {err}")
            e = float("inf")
        else:
            print(f"train {' '.join(flags):60} losses {np.round(curves[0], 4).tolist()} "
                  f"{DEVICE} against cpu: relative {e:.2e}")
        worst = max(worst, e)
    return worst


def main():
    with tempfile.TemporaryDirectory() as tmp:
        t = trainings(tmp)
        f = forwards(tmp)
    ok = f < 1e-4 and t < 1e-3
    print(f"worst forward error {f:.2e} (tolerance 1e-4), worst loss-curve error {t:.2e} (1e-3): "
          f"{'OK' if ok else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
