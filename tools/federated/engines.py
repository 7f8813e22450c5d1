#!/usr/bin/env python3
"""Flower's two engines on the same federation: the federated benchmark's FedAvg-LoRA
configuration (8 Shakespeare clients, SmolLM2-135M; tools/federated/bench.py) run once on the
Deployment Engine (a SuperNode process per client, all clients' petal at once) and once on the
Simulation Engine (Ray actors, one client at a time with all the CPUs), with the same seeds.
Prints and writes docs/federated/engines.md: held-out loss and seconds per round for each, and
the largest difference between the two engines' losses (the clients' work is the same; only
where and when it runs differs).

    python3 tools/federated/engines.py --flwr target/venv-flower-sim/bin --petal target/release/petal

--flwr must be a venv with flwr[simulation] (python/flower/requirements-simulation.txt).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import WORKS, cpu_name  # tools/federated/bench.py

ROOT = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flwr", required=True)
    ap.add_argument("--petal", default=str(ROOT / "target/release/petal"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "docs/federated/engines.md"))
    ap.add_argument("--work", default=str(ROOT / "runs/federated-engines"))
    a = ap.parse_args()
    data = Path.home() / ".cache/petal/shakespeare"
    if not (data / "hamlet_gut.txt").exists():
        subprocess.run([a.petal, "assets", "shakespeare"], check=True)
    runs = {}
    for engine in ("deployment", "simulation"):
        work = Path(a.work) / engine
        cmd = [sys.executable, str(ROOT / "tools/federated/run.py"), "--flwr", a.flwr, "--engine", engine,
               "--petal", a.petal, "--model", "asset:smollm2",
               "--partitions", ",".join(str(data / f"{w}_gut.txt") for w in WORKS),
               "--val-data", str(data / "hamlet_gut.txt"), "--out", str(work),
               "--rounds", str(a.rounds), "--local-steps", str(a.local_steps), "--method", "lora",
               "--r", "8", "--alpha", "16", "--lr", "0.002", "--batch-size", "4", "--seq-len", "64",
               "--max-eval-examples", "32", "--seed", "0"]
        print(f"{engine}: {' '.join(cmd[1:])}", flush=True)
        (work / "rounds.jsonl").unlink(missing_ok=True)
        subprocess.run(cmd, check=True)
        runs[engine] = [json.loads(l) for l in (work / "rounds.jsonl").read_text().splitlines()]
    dep, sim = runs["deployment"], runs["simulation"]
    lines = ["| round | held-out loss, Deployment | held-out loss, Simulation | seconds, Deployment "
             "| seconds, Simulation |", "|---|---|---|---|---|"]
    prev = {"deployment": 0.0, "simulation": 0.0}
    for d, s in zip(dep, sim):
        lines.append(f"| {d['round']} | {d['eval_loss']:.5f} | {s['eval_loss']:.5f} | "
                     f"{d['seconds'] - prev['deployment']:.0f} | {s['seconds'] - prev['simulation']:.0f} |")
        prev = {"deployment": d["seconds"], "simulation": s["seconds"]}
    diff = max(abs(d["eval_loss"] - s["eval_loss"]) for d, s in zip(dep, sim))
    text = (f"Flower's Deployment and Simulation Engines on one federation: FedAvg of LoRA r 8, "
            f"8 clients (one work each: {', '.join(WORKS)}), SmolLM2-135M, {a.local_steps} local steps "
            f"of 4 x 64 tokens a round, seed 0; held-out: Hamlet (32 x 64 tokens). CPU: {cpu_name()}, "
            f"{os.cpu_count()} threads. Seconds: each round's wall time (round 0: the base model's "
            f"evaluation). Largest difference between the engines' held-out losses: {diff:.2e}.\n\n"
            "Command: `python3 tools/federated/engines.py --flwr target/venv-flower-sim/bin "
            f"--petal target/release/petal --rounds {a.rounds}`\n\n" + "\n".join(lines) + "\n")
    out = Path(a.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(text)


if __name__ == "__main__":
    main()
