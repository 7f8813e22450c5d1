#!/usr/bin/env python3
"""An intra-client-heterogeneous split of BIG-bench multiemo's English sentences (FedIns's
setting: every client holds instances of several domains, in its own proportions): the four
domains (hotels, medicine, products, school reviews) differ in wording and in their label
mix; each client's domain proportions are one draw of Dirichlet(alpha) over the domains, and
its sentences are drawn from each domain in those proportions. The held-out set takes the
same number of sentences from every domain.

    python3 tools/federated/domain_mix.py SRC OUT_DIR [--clients 8] [--per-client 300] \\
        [--alpha 1.0] [--val 400] [--max-words 48] [--seed 0]

SRC: the folder `petal assets multiemo` prints. Writes OUT_DIR/client-I.jsonl and
OUT_DIR/val.jsonl ({"text", "label"} lines, `petal train --task-type seq-cls` data) and
OUT_DIR/split.json (alpha, seed, each client's count per domain and per label). No sentence is
in two places. Standard library only.
"""
import argparse
import json
import os
import random
import sys
from collections import Counter

from label_skew import dirichlet  # tools/federated/label_skew.py

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
from multiemo_sentiment import sentences  # noqa: E402  tools/data/multiemo_sentiment.py

DOMAINS = ["hotels", "medicine", "products", "reviews"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=300)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--val", type=int, default=400)
    ap.add_argument("--max-words", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.clients < 1 or a.per_client < 1 or a.val < len(DOMAINS) or not a.alpha > 0:
        raise SystemExit("--clients and --per-client at least 1, --val at least 4, --alpha above 0")
    rng = random.Random(a.seed)
    pools = {}
    for d in DOMAINS:
        rows = sentences(a.src, f"{d}_sentence_en", a.max_words)
        rng.shuffle(rows)
        pools[d] = rows
    val = []
    for d in DOMAINS:
        take = a.val // len(DOMAINS)
        val += pools[d][:take]
        pools[d] = pools[d][take:]
    rng.shuffle(val)
    clients, counts = [], []
    for _ in range(a.clients):
        p = dirichlet(rng, a.alpha, len(DOMAINS))
        n = [round(x * a.per_client) for x in p]
        n[max(range(len(n)), key=lambda i: p[i])] += a.per_client - sum(n)  # exactly per_client
        rows = []
        for d, k in zip(DOMAINS, n):
            if k > len(pools[d]):
                raise SystemExit(f"{d}: {len(pools[d])} sentences left, {k} asked (lower --per-client)")
            rows += pools[d][:k]
            pools[d] = pools[d][k:]
        rng.shuffle(rows)
        clients.append(rows)
        counts.append({"domains": dict(zip(DOMAINS, n)), "labels": dict(Counter(r["label"] for r in rows))})
    os.makedirs(a.out, exist_ok=True)

    def write(name, rows):
        with open(os.path.join(a.out, name + ".tmp"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(os.path.join(a.out, name + ".tmp"), os.path.join(a.out, name))

    for i, rows in enumerate(clients):
        write(f"client-{i}.jsonl", rows)
    write("val.jsonl", val)
    with open(os.path.join(a.out, "split.json"), "w") as f:
        json.dump({"alpha": a.alpha, "seed": a.seed, "domains": DOMAINS, "counts": counts}, f, indent=1)
    for i, c in enumerate(counts):
        print(f"client {i}: " + ", ".join(f"{d} {k}" for d, k in c["domains"].items()))


if __name__ == "__main__":
    main()
