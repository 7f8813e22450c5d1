#!/usr/bin/env python3
"""The label-skewed federated benchmark: BIG-bench multiemo's English sentences (4 sentiment
classes, tools/data/multiemo_sentiment.py), dealt to 8 clients by label with Dirichlet(alpha)
proportions (tools/federated/label_skew.py: alpha 0.5 skewed, alpha 1000 about IID), a LoRA
classifier on all-MiniLM-L6-v2 trained by petal's clients and server on Flower's Deployment
Engine (or `--engine simulation`; tools/federated/run.py, `--task-type seq-cls`); the global adapter's held-out accuracy
after every round. Writes docs/federated/cls/CONFIG.jsonl (the rounds), curves.svg and
results.md. The `domains*` configurations split by domain instead (FedIns's intra-client
heterogeneity, tools/federated/domain_mix.py) and write docs/federated/cls-domains/. Resumable: a
configuration whose rounds file exists is not run again.

    python3 tools/federated/cls_bench.py --flwr target/venv-flower/bin --petal target/release/petal \\
        --python target/venv-plot/bin/python
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import SLOWDOWNS, bench_args, cpu_name, plot, run_config, runs_in, seeded, wall  # tools/federated/bench.py

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 8
LORA = ["--method", "lora", "--r", "8", "--alpha", "16", "--lr", "0.002"]
# FedIns's pool with one entry chosen by all: FedAvg of one SSF (the paper's "Federated SSF");
# scale-and-shift methods take a high learning rate (docs/methods/ssf.md)
SSF = ["--method", "fedins", "--r", "0", "--alpha", "0", "--method-options", "pool_size=1;top_k=1"]
# the official code's pool (25 entries, 3 per instance), with a head per entry
FEDINS = ["--method", "fedins", "--r", "0", "--alpha", "0", "--method-options", "pool_size=25;top_k=3"]
FEDINS_BATCH = FEDINS[:-1] + ["pool_size=25;top_k=3;mix=batch"]
FEDINS_ONE_HEAD = FEDINS[:-1] + ["pool_size=25;top_k=3;pool_heads=false"]
# LEGEND's simulated heterogeneous devices (client i's seconds times factor i), as bench.py's
DEVICES = ["--slowdowns", SLOWDOWNS]
# name: (Dirichlet alpha of the split, strategy, the method's arguments, more run.py arguments)
CONFIGS = {
    "iid-fedavg": (1000.0, "fedavg", LORA, []),
    "skew0.5-fedavg": (0.5, "fedavg", LORA, []),
    "skew0.5-fedprox": (0.5, "fedprox", LORA, []),
    "skew0.5-ssf-lr0.002": (0.5, "fedavg", SSF + ["--lr", "0.002"], []),
    "skew0.5-ssf": (0.5, "fedavg", SSF + ["--lr", "0.01"], []),
    "skew0.5-fedins": (0.5, "fedavg", FEDINS + ["--lr", "0.01"], []),
    # the official code's averaging: every row of a batch the mean of the batch's choices
    "skew0.5-fedins-batch": (0.5, "fedavg", FEDINS_BATCH + ["--lr", "0.01"], []),
    # one head for the whole pool (petal's FedIns before the head pool)
    "skew0.5-fedins-one-head": (0.5, "fedavg", FEDINS_ONE_HEAD + ["--lr", "0.01"], []),
    # LEGEND on the encoder's layers against its baseline under the same accounting
    "skew0.5-legend": (0.5, "legend", LORA, DEVICES),
    # LEGEND with the whole global adapter sent down, each client on the global model
    "skew0.5-legend-all": (0.5, "legend", LORA, DEVICES + ["--legend-send", "all"]),
    "skew0.5-hetero-fedavg": (0.5, "legend", LORA, DEVICES + ["--legend-fixed"]),
}
# FedIns's own setting, intra-client heterogeneity (tools/federated/domain_mix.py): every client
# holds sentences of the four multiemo domains in its own Dirichlet(alpha) proportions; held out:
# as many of each domain. Results in OUT/../cls-domains (another held-out set).
DOMAIN_CONFIGS = {
    "domains1-fedavg": (1.0, "fedavg", LORA, []),
    "domains1-ssf": (1.0, "fedavg", SSF + ["--lr", "0.01"], []),
    "domains1-fedins": (1.0, "fedavg", FEDINS + ["--lr", "0.01"], []),
}


def main():
    a = bench_args(__doc__, {**CONFIGS, **DOMAIN_CONFIGS}, local_steps=10, out="docs/federated/cls",
                   work="runs/federated-cls")
    work = Path(a.work)
    for asset in ("multiemo", "minilm"):
        subprocess.run([a.petal, "assets", asset], check=True, capture_output=True)
    data = work / "data"
    if not (data / "val.jsonl").exists():
        subprocess.run([sys.executable, str(ROOT / "tools/data/multiemo_sentiment.py"),
                        str(Path.home() / ".cache/petal/multiemo"), str(data), "--train", "2400",
                        "--val", "400", "--seed", "0"], check=True)
    out = Path(a.out)
    domains_out = out.parent / "cls-domains"
    for config in a.configs.split(","):
        domains = config in DOMAIN_CONFIGS
        alpha, strategy, method, more = (DOMAIN_CONFIGS if domains else CONFIGS)[config]
        name = seeded(config, a.seed)
        dest = (domains_out if domains else out) / f"{name}.jsonl"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            print(f"{name}: kept", flush=True)
            continue
        if domains:
            split = work / f"domains-{alpha:g}"
            subprocess.run([sys.executable, str(ROOT / "tools/federated/domain_mix.py"),
                            str(Path.home() / ".cache/petal/multiemo"), str(split), "--clients", str(CLIENTS),
                            "--per-client", "300", "--val", "400", "--alpha", str(alpha), "--seed", "0"],
                           check=True, capture_output=True)
            val = split / "val.jsonl"
        else:
            split = work / f"split-{alpha:g}"
            subprocess.run([sys.executable, str(ROOT / "tools/federated/label_skew.py"), str(data / "train.jsonl"),
                            str(split), "--clients", str(CLIENTS), "--alpha", str(alpha), "--seed", "0"], check=True)
            val = data / "val.jsonl"
        run = work / name
        cmd = [sys.executable, str(ROOT / "tools/federated/run.py"), "--flwr", a.flwr,
               "--petal", a.petal, "--model", "asset:minilm", "--task-type", "seq-cls",
               "--partitions", ",".join(str(split / f"client-{i}.jsonl") for i in range(CLIENTS)),
               "--val-data", str(val), "--out", str(run),
               "--rounds", str(a.rounds), "--local-steps", str(a.local_steps), "--strategy", strategy,
               "--proximal-mu", "0.01", *method, *more,
               "--batch-size", "16", "--seq-len", "64", "--max-eval-examples", "400", "--seed", str(a.seed),
               "--engine", a.engine]
        counts = json.loads((split / "split.json").read_text())["counts"]
        run_config(name, cmd, run, dest, dirichlet_alpha=alpha, strategy=strategy,
                   method=" ".join(method), client_label_counts=counts, devices=" ".join(more), engine=a.engine,
                   seed=a.seed, split="domains" if domains else "labels")
    report(a, out, LABEL_SPLIT)
    report(a, domains_out, DOMAIN_SPLIT)


def label(args):
    """A method's arguments as a short label: `lora r=8`, `fedins pool_size=25;top_k=3`."""
    opts = dict(zip(args[::2], args[1::2]))
    extra = [f"r={opts['--r']}"] if opts.get("--r", "0") != "0" else []
    extra += [opts["--method-options"]] if "--method-options" in opts else []
    extra += [f"lr {opts.get('--lr', '0.002')}"]
    return " ".join([opts["--method"], *extra])


LABEL_SPLIT = ("2400 training sentences dealt by label with Dirichlet(alpha) proportions, 400 held out; the "
               "alpha column is the label split's")
DOMAIN_SPLIT = ("each client 300 sentences of the four domains (hotels, medicine, products, school reviews) in "
                "its own Dirichlet(alpha) proportions over the domains (intra-client heterogeneity, "
                "tools/federated/domain_mix.py), 400 held out, 100 of each domain; the alpha column is the "
                "domain split's")


def report(a, out, split):
    if not out.is_dir():
        return
    runs = runs_in(out)
    if not runs:
        return
    cpu = cpu_name()
    target = 0.9 * max(max(r["eval_accuracy"] for r in rs) for rs in runs.values())
    lines = ["| configuration | method | Dirichlet alpha | rounds | accuracy, round 0 -> last (best) | macro-F1 last | "
             f"rounds to accuracy {target:.3f} | bytes per round (both ways) | wall time | simulated time (to target) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        hit = next((r for r in rs if r["eval_accuracy"] >= target), None)
        per_round = sum(r["bytes_up"] + r["bytes_down"] for r in rs[1:]) / max(1, len(rs) - 1)
        best = max(r["eval_accuracy"] for r in rs)
        method = label(rs[0].get("method", " ".join(LORA)).split())
        sim = "-"
        if "sim_seconds" in rs[-1]:
            to = f"{hit.get('sim_seconds', 0):.0f} s" if hit else "not reached"
            sim = f"{rs[-1]['sim_seconds']:.0f} s ({to})"
        lines.append(f"| {name} | {method} | {rs[0]['dirichlet_alpha']:g} | {len(rs) - 1} | {rs[0]['eval_accuracy']:.3f} -> "
                     f"{rs[-1]['eval_accuracy']:.3f} ({best:.3f}) | {rs[-1].get('eval_macro_f1', 0):.3f} | "
                     f"{hit['round'] if hit else 'not reached'} | {per_round / 1e6:.2f} MB | "
                     f"{wall(rs)} | {sim} |")
    text = (f"{CLIENTS} clients, multiemo English sentiment (4 classes; {split}), an adapter (the method column) on all-MiniLM-L6-v2 "
            "with a trained head; 10 local steps of 16 sentences a round. The target is 90% of the best accuracy "
            f"any run reached. CPU: {cpu}, {os.cpu_count()} threads; all processes on this machine. Simulated time "
            f"(LEGEND's rounds): each round lasts as long as its slowest client's measured seconds times its "
            f"slowdown factor ({SLOWDOWNS}).\n\n"
            + "\n".join(lines) + "\n")
    (out / "results.md").write_text(text)
    print(text)
    plot(a.python, runs, "eval_accuracy", "held-out accuracy (400 sentences)", out / "curves.svg")

if __name__ == "__main__":
    main()
