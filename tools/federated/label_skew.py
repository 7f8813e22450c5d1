#!/usr/bin/env python3
"""A label-skewed split of a classification set for federated runs: each class's examples are
dealt to the clients in proportions drawn from Dirichlet(alpha) (Hsu et al. 2019's non-IID
setting; small alpha: each client holds mostly a few classes, large alpha: close to IID).

    python3 tools/federated/label_skew.py DATA.jsonl OUT_DIR --clients 8 --alpha 0.5 [--seed 0]

DATA.jsonl: one {"text": ..., "label": ...} a line (`petal train --task-type seq-cls` data, e.g.
tools/data/multiemo_sentiment.py's train.jsonl). Writes OUT_DIR/client-I.jsonl for each client
and OUT_DIR/split.json (alpha, seed, each client's count per label). A client dealt no example
gets one of the largest client's, so that every client can train. Standard library only.
"""
import argparse
import json
import os
import random
from collections import Counter


def dirichlet(rng, alpha, n):
    """One draw of Dirichlet(alpha, ..., alpha) over n parts (normalised gamma variates)."""
    g = [rng.gammavariate(alpha, 1.0) for _ in range(n)]
    s = sum(g)
    return [x / s for x in g] if s > 0 else [1.0 / n] * n


def split(rows, clients, alpha, seed):
    """Client index -> its rows: each label's rows shuffled, then cut at the cumulative
    Dirichlet proportions."""
    rng = random.Random(seed)
    by_label = {}
    for r in rows:
        by_label.setdefault(str(r["label"]), []).append(r)
    parts = [[] for _ in range(clients)]
    for label in sorted(by_label):
        rs = by_label[label]
        rng.shuffle(rs)
        p = dirichlet(rng, alpha, clients)
        cuts, acc = [], 0.0
        for x in p[:-1]:
            acc += x
            cuts.append(round(acc * len(rs)))
        bounds = [0, *cuts, len(rs)]
        for i in range(clients):
            parts[i].extend(rs[bounds[i]:bounds[i + 1]])
    for i, part in enumerate(parts):
        if not part:  # every client trains: one example from the largest
            big = max(range(clients), key=lambda j: len(parts[j]))
            part.append(parts[big].pop())
        rng.shuffle(part)
    return parts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.clients < 2:
        raise SystemExit(f"--clients {a.clients}: at least 2")
    if not a.alpha > 0:
        raise SystemExit(f"--alpha {a.alpha}: a positive number")
    rows = []
    with open(a.data) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                r["text"], r["label"]
            except (ValueError, KeyError, TypeError):
                raise SystemExit(f"{a.data}:{n}: not a JSON object with `text` and `label`")
            rows.append(r)
    if len(rows) < a.clients:
        raise SystemExit(f"{a.data}: {len(rows)} examples for {a.clients} clients")
    parts = split(rows, a.clients, a.alpha, a.seed)
    os.makedirs(a.out, exist_ok=True)
    counts = []
    for i, part in enumerate(parts):
        path = os.path.join(a.out, f"client-{i}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        os.replace(path + ".tmp", path)
        counts.append(dict(sorted(Counter(str(r["label"]) for r in part).items())))
    summary = {"data": a.data, "clients": a.clients, "alpha": a.alpha, "seed": a.seed, "counts": counts}
    with open(os.path.join(a.out, "split.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for i, c in enumerate(counts):
        print(f"client {i}: {sum(c.values())} examples, {c}")


if __name__ == "__main__":
    main()
