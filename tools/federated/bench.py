#!/usr/bin/env python3
"""The federated benchmark: Shakespeare split by work (one client per play or the sonnets, so
each client's text differs in kind: LEAF's non-IID Shakespeare setting, by work rather than by
speaking role), petal's clients and server on Flower's Deployment Engine (or `--engine simulation`; tools/federated/run.py),
each configuration trained the same number of rounds; the global adapter's held-out loss on
Hamlet (a work no client holds) after every round. Writes docs/federated/CONFIG.jsonl (the
rounds), docs/federated/curves.svg and the table in docs/federated/results.md. Resumable: a
configuration whose rounds file exists is not run again.

    python3 tools/federated/bench.py --flwr target/venv-flower/bin --petal target/release/petal \\
        --python target/venv-search/bin/python
"""
import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKS = ["comedy_of_errors", "julius_caesar", "macbeth", "midsummer_nights_dream", "othello",
         "sonnets", "tempest", "twelfth_night"]
# simulated heterogeneous devices (LEGEND's setting): client i's seconds times factor i
SLOWDOWNS = "1,1,1,2,2,3,4,4"
# name: (method, r, alpha, strategy, more run.py options)
CONFIGS = {
    "fedavg-lora-r8": ("lora", 8, 16, "fedavg", []),
    "fedpara-loha-r4": ("loha", 4, 8, "fedavg", []),
    "fedprox-lora-r8": ("lora", 8, 16, "fedprox", []),
    # LEGEND against its baseline under the same accounting: every client on every layer
    "legend-lora-r8": ("lora", 8, 16, "legend", ["--slowdowns", SLOWDOWNS]),
    "hetero-fedavg-lora-r8": ("lora", 8, 16, "legend", ["--slowdowns", SLOWDOWNS, "--legend-fixed"]),
}


def bench_args(doc, configs, local_steps, out, work):
    """The arguments every federated benchmark takes, with its own defaults."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--flwr", required=True)
    ap.add_argument("--engine", default="deployment", choices=["deployment", "simulation"],
                    help="Flower's engine (simulation: Ray, one client at a time; --flwr with flwr[simulation])")
    ap.add_argument("--petal", default=str(ROOT / "target/release/petal"))
    ap.add_argument("--python", default=sys.executable, help="a python with matplotlib, for the plot")
    ap.add_argument("--configs", default=",".join(configs))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0,
                    help="the training seed (init, batches); a seed other than 0 keeps its results as NAME-seedN")
    ap.add_argument("--local-steps", type=int, default=local_steps)
    ap.add_argument("--out", default=str(ROOT / out))
    ap.add_argument("--work", default=str(ROOT / work))
    return ap.parse_args()


def main():
    a = bench_args(__doc__, CONFIGS, local_steps=4, out="docs/federated", work="runs/federated")
    data = Path.home() / ".cache/petal/shakespeare"
    if not (data / "hamlet_gut.txt").exists():
        subprocess.run([a.petal, "assets", "shakespeare"], check=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for config in a.configs.split(","):
        method, r, alpha, strategy, more = CONFIGS[config]
        name = seeded(config, a.seed)
        dest = out / f"{name}.jsonl"
        if dest.exists():
            print(f"{name}: kept", flush=True)
            continue
        work = Path(a.work) / name
        cmd = [sys.executable, str(ROOT / "tools/federated/run.py"), "--flwr", a.flwr,
               "--petal", a.petal, "--model", "asset:smollm2",
               "--partitions", ",".join(str(data / f"{w}_gut.txt") for w in WORKS),
               "--val-data", str(data / "hamlet_gut.txt"), "--out", str(work),
               "--rounds", str(a.rounds), "--local-steps", str(a.local_steps),
               "--method", method, "--r", str(r), "--alpha", str(alpha), "--strategy", strategy,
               "--proximal-mu", "0.01", "--lr", "0.002", "--batch-size", "4", "--seq-len", "64",
               "--max-eval-examples", "32", "--seed", str(a.seed), "--engine", a.engine,
               # run.py stops a run after an hour by default: LoHa's ten rounds take about 65 min
               "--timeout", str(a.rounds * 1800), *more]
        run_config(name, cmd, work, dest, method=method, r=r, strategy=strategy, engine=a.engine,
                   seed=a.seed)
    report(a, out)


def seeded(config, seed):
    """The name a configuration's results are kept under for a training seed."""
    return config if seed == 0 else f"{config}-seed{seed}"


# the CPU of the runs kept before each run recorded its own
EARLIER_CPU = "AMD EPYC"


def cpus_of(runs):
    """The CPUs of the kept runs, in order of first appearance, and each one's letter ('' when
    every run used the same CPU)."""
    cpus = list(dict.fromkeys(rs[-1].get("cpu", EARLIER_CPU) for rs in runs.values()))
    return cpus, {c: "" if len(cpus) == 1 else chr(ord("a") + i) for i, c in enumerate(cpus)}


def wall(rs):
    """A run's wall time, with the engine when it was not the Deployment Engine (the simulation
    runs one client at a time, about 3x faster here: docs/federated/engines.md)."""
    engine = rs[-1].get("engine", "deployment")
    return f"{rs[-1]['seconds'] / 60:.1f} min" + ("" if engine == "deployment" else f" ({engine})")


def letter(mark, rs):
    """' (a)': the letter of a run's CPU where the kept runs used several."""
    m = mark[rs[-1].get("cpu", EARLIER_CPU)]
    return f" ({m})" if m else ""


def run_config(name, cmd, work, dest, **fields):
    """Run one configuration (`cmd`: tools/federated/run.py writing WORK/rounds.jsonl), then
    keep its rounds with `fields` added as DEST, written whole."""
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)
    rows = [json.loads(l) for l in (work / "rounds.jsonl").read_text().splitlines()]
    for row in rows:
        row.update(config=name, cpu=cpu_name(), **fields)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, dest)


def runs_in(out):
    """The kept configurations' rounds: name -> rows."""
    return {p.stem: [json.loads(l) for l in p.read_text().splitlines()] for p in sorted(out.glob("*.jsonl"))}


def report(a, out):
    runs = runs_in(out)
    if not runs:
        return
    start = min(rs[0]["eval_loss"] for rs in runs.values())
    best = max(min(r["eval_loss"] for r in rs) for rs in runs.values())
    target = start - 0.8 * (start - best)  # 80% of the smallest improvement any run made
    cpus, mark = cpus_of(runs)
    if len(cpus) == 1:
        cpu = cpus[0]
    else:  # each wall time carries its CPU's letter
        cpu = "; ".join(f"({mark[c]}) {c}" for c in cpus)
    lines = ["| configuration | rounds | held-out loss, round 0 -> last | rounds to "
             f"{target:.4f} | bytes per round (both ways, mean) | bytes to {target:.4f} | wall time | "
             "simulated time (to target) |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        hit = next((r for r in rs if r["eval_loss"] <= target), None)
        sent = lambda rows: sum(r["bytes_up"] + r["bytes_down"] for r in rows)  # both ways
        per_round = sent(rs[1:]) / max(1, len(rs) - 1)
        sim = "-"
        if "sim_seconds" in rs[-1]:
            to = f"{hit['sim_seconds']:.0f} s" if hit else "not reached"
            sim = f"{rs[-1]['sim_seconds']:.0f} s ({to})"
        # the bytes that bought the target quality: every round's, up to the one that reached it
        to_hit = f"{sent(rs[1:hit['round'] + 1]) / 1e6:.0f} MB" if hit else "not reached"
        lines.append(f"| {name} | {len(rs) - 1} | {rs[0]['eval_loss']:.4f} -> {rs[-1]['eval_loss']:.4f} | "
                     f"{hit['round'] if hit else 'not reached'} | {per_round / 1e6:.2f} MB | {to_hit} | "
                     f"{wall(rs)}{letter(mark, rs)} | {sim} |")
    text = (f"8 clients (one work each: {', '.join(WORKS)}), SmolLM2-135M, held-out: Hamlet "
            f"(32 x 64 tokens). CPU: {cpu}, {os.cpu_count()} threads; all processes on this machine. "
            f"Simulated time (LEGEND's runs): each round lasts as long as its slowest client's measured "
            f"seconds times its slowdown factor ({SLOWDOWNS}).\n\n"
            + "\n".join(lines) + "\n")
    (out / "results.md").write_text(text)
    print(text)
    plot(a.python, runs, "eval_loss", "held-out loss (Hamlet)", out / "curves.svg")


def cpu_name():
    """The CPU's model name, as /proc/cpuinfo gives it."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def plot(python, runs, key, ylabel, path):
    """Each run's `key` against the round, as an SVG, drawn by `python` (with matplotlib)."""
    code = ("import json,sys,matplotlib\nmatplotlib.use('svg')\nimport matplotlib.pyplot as plt\n"
            "runs=json.loads(sys.argv[1]);key=sys.argv[3];fig,ax=plt.subplots(figsize=(6,3.6))\n"
            "for n,rs in runs.items(): ax.plot([r['round'] for r in rs],[r[key] for r in rs],marker='o',label=n)\n"
            "ax.set_xlabel('round');ax.set_ylabel(sys.argv[4]);ax.legend();fig.tight_layout()\n"
            "fig.savefig(sys.argv[2])\n")
    r = subprocess.run([python, "-c", code, json.dumps(runs), str(path), key, ylabel],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"no plot: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")

if __name__ == "__main__":
    main()
