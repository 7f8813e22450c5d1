#!/usr/bin/env python3
"""petal's sequence-classification adapters in PEFT: petal trains LoRA and IA3 (`--task-type
seq-cls`) on the tiny random BERT saved as a plain BertModel (tests/fixtures/golden/
bert_minilm_names: no classifier, as all-MiniLM-L6-v2 ships), and PEFT loads each adapter onto
`AutoModelForSequenceClassification` of the same folder; the validation loss and accuracy that
PEFT's logits give must equal `petal eval --task-type seq-cls --json`'s.

    python tools/golden/check_petal_seqcls.py target/debug/petal

Versions: tools/golden/requirements.txt.
"""
import json
import os
import random
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
BASE = os.path.join(ROOT, "tests", "fixtures", "golden", "bert_minilm_names")


def data(d):
    vocab = json.load(open(os.path.join(BASE, "tokenizer.json")))["model"]["vocab"]
    words = [w for w in vocab if w.isalpha()]
    rng = random.Random(0)
    rows = []
    for i in range(96):
        lab = i % 3
        text = " ".join(rng.sample(words[lab * 15:(lab + 1) * 15], 4))
        row = {"text": text, "label": ["alpha", "beta", "gamma"][lab]}
        if i % 2:
            row["text_pair"] = " ".join(rng.sample(words, 3))
        rows.append(row)
    for name, part in [("train.jsonl", rows[:80]), ("val.jsonl", rows[80:])]:
        open(os.path.join(d, name), "w").write("".join(json.dumps(r) + "\n" for r in part))
    return rows[80:]


def peft_scores(adapter, rows):
    labels = json.load(open(os.path.join(adapter, "labels.json")))["names"]
    model = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=len(labels)).eval()
    model = PeftModel.from_pretrained(model, adapter).eval()
    tok = AutoTokenizer.from_pretrained(BASE)
    loss, right = 0.0, 0
    with torch.no_grad():
        for r in rows:
            enc = tok(r["text"], r.get("text_pair"), return_tensors="pt")
            logits = model(**enc).logits[0]
            y = labels.index(r["label"])
            loss += torch.nn.functional.cross_entropy(logits[None], torch.tensor([y])).item()
            right += int(logits.argmax().item() == y)
    return loss / len(rows), right / len(rows)


def main():
    petal = sys.argv[1]
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        rows = data(d)
        for method, extra in [("lora", ["--target-modules", "query,value"]),
                              ("ia3", [])]:
            out = os.path.join(d, method)
            subprocess.run([petal, "train", "--task-type", "seq-cls", "--model", BASE, "--data",
                            os.path.join(d, "train.jsonl"), "--val-data", os.path.join(d, "val.jsonl"),
                            "--method", method, "--max-steps", "20", "--lr", "0.02", "--out", out, *extra],
                           check=True, capture_output=True)
            ev = subprocess.run([petal, "eval", "--task-type", "seq-cls", "--model", BASE, "--adapter",
                                 os.path.join(out, "adapter"), "--data", os.path.join(d, "val.jsonl"),
                                 "--json"], check=True, capture_output=True, text=True)
            got = json.loads(ev.stdout)
            loss, acc = peft_scores(os.path.join(out, "adapter"), rows)
            rel = abs(loss - got["loss"]) / loss
            worst = max(worst, rel)
            print(f"{method}: PEFT loss {loss:.6f} accuracy {acc:.4f}; petal loss {got['loss']:.6f} "
                  f"accuracy {got['accuracy']:.4f}; relative difference {rel:.2e}")
            assert rel < 1e-5 and acc == got["accuracy"], method
    print(f"ok: worst relative loss difference {worst:.2e}")


if __name__ == "__main__":
    main()
