#!/usr/bin/env python3
"""Sentence-level sentiment classification JSONL from BIG-bench's multiemo (English): one line
per sentence, {"text": "<sentence>", "label": "<ambivalent|negative|neutral|positive>"}, the
label being the sentence's target score of 1. For `petal train --task-type seq-cls` and the
PASTA claim.

    tools/data/multiemo_sentiment.py SRC OUT_DIR [--train N] [--val M] [--max-words W] [--seed S]

SRC: the folder `petal assets multiemo` prints (all_sentence_en.json inside). Writes
OUT_DIR/train.jsonl (N sentences), OUT_DIR/val.jsonl (M others), drawn by a seeded shuffle of
the sentences of at most W words. Standard library only.
"""
import argparse
import json
import os
import random


def sentences(src, name, max_words):
    """The labelled sentences of SRC/NAME.json (`all_sentence_en`, `hotels_sentence_en`, ...) of at
    most `max_words` words, each with its one label of target score 1."""
    path = os.path.join(src, f"{name}.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: not found (run `petal assets multiemo`)")
    rows = []
    for e in json.load(open(path))["examples"]:
        label = [k for k, v in e["target_scores"].items() if v == 1]
        text = e["input"].strip()
        if len(label) == 1 and 0 < len(text.split()) <= max_words:
            rows.append({"text": text, "label": label[0]})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--max-words", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rows = sentences(a.src, "all_sentence_en", a.max_words)
    random.Random(a.seed).shuffle(rows)
    if len(rows) < a.train + a.val:
        raise SystemExit(f"only {len(rows)} sentences of at most {a.max_words} words")
    os.makedirs(a.out, exist_ok=True)
    for name, part in [("train.jsonl", rows[:a.train]), ("val.jsonl", rows[a.train:a.train + a.val])]:
        open(os.path.join(a.out, name), "w").write("".join(json.dumps(r) + "\n" for r in part))
    print(f"{a.train} training and {a.val} validation sentences; wrote {a.out}")


if __name__ == "__main__":
    main()
