#!/usr/bin/env python3
"""English-to-French translation pairs from BIG-bench's multiemo (the same sentences in each
language, aligned row by row), for KS-Lottery's paper claim: one JSONL line per pair,
{"prompt": "Translate English to French.\\nEnglish: <en>\\nFrench:", "completion": " <fr>"}.

    tools/data/multiemo_translation.py SRC OUT_DIR [--train N] [--eval E] [--max-chars C] [--seed S]

SRC: the folder `petal assets multiemo` prints (all_sentence_en.json, all_sentence_fr.json, ...).
Writes OUT_DIR/train.jsonl (N pairs) and OUT_DIR/val.jsonl (E other pairs). Pairs whose prompt
and completion exceed C characters are skipped. Standard library only.
"""
import argparse
import json
import os
import random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--max-chars", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    load = lambda lang: json.load(open(os.path.join(a.src, f"all_sentence_{lang}.json")))["examples"]
    en, fr = load("en"), load("fr")
    if len(en) != len(fr):
        raise SystemExit(f"{a.src}: {len(en)} English and {len(fr)} French sentences: not aligned")
    pairs = []
    for e, f in zip(en, fr):
        p = f"Translate English to French.\nEnglish: {e['input'].strip()}\nFrench:"
        c = f" {f['input'].strip()}"
        if len(p) + len(c) <= a.max_chars:
            pairs.append({"prompt": p, "completion": c})
    random.Random(a.seed).shuffle(pairs)
    if len(pairs) < a.train + a.eval:
        raise SystemExit(f"only {len(pairs)} pairs of at most {a.max_chars} characters")
    os.makedirs(a.out, exist_ok=True)
    for name, rows in [("train.jsonl", pairs[:a.train]), ("val.jsonl", pairs[a.train:a.train + a.eval])]:
        with open(os.path.join(a.out, name), "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{a.train} training and {a.eval} validation pairs; wrote {a.out}")


if __name__ == "__main__":
    main()
