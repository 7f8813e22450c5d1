#!/usr/bin/env python3
"""petal's reading of a qwen2-architecture GGUF file against transformers' own GGUF loader (which
dequantizes every tensor to f32 with the `gguf` package): the token ids of a text (petal's
tokenizer is rebuilt from the file's metadata; transformers converts it its own way) and the
perplexity of the text in non-overlapping windows of 128 tokens, as `petal eval` scores a .txt
file. Also prints petal's greedy completion of a code prompt.

    python tools/golden/check_qwen_gguf.py PETAL_BIN QWEN_GGUF

QWEN_GGUF: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (`petal assets qwen2.5-coder-0.5b`). Versions:
tools/golden/requirements.txt (transformers 5.24, gguf 0.19.0).
"""
import json
import math
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = '''def quicksort(items):
    """Sort a list with the quicksort algorithm and return a new list."""
    if len(items) <= 1:
        return items
    pivot = items[len(items) // 2]
    left = [x for x in items if x < pivot]
    middle = [x for x in items if x == pivot]
    right = [x for x in items if x > pivot]
    return quicksort(left) + middle + quicksort(right)


class Stack:
    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from an empty stack")
        return self._items.pop()

The quick brown fox jumps over the lazy dog. In 2024, 3 out of 4 developers said they used
version control every day; the remaining 25% relied on copies named final_v2_really_final.py.
'''
WINDOW = 128


def main():
    petal, path = sys.argv[1:3]
    d, f = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), WINDOW):
            w = ids[s:s + WINDOW]
            if len(w) < 2:
                continue
            logits = model(torch.tensor([w])).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum").item()
            n += len(w) - 1
    ref = total / n
    with tempfile.TemporaryDirectory() as tmp:
        txt = os.path.join(tmp, "text.txt")
        open(txt, "w").write(TEXT)
        out = subprocess.run([petal, "eval", "--model", path, "--data", txt, "--seq-len", str(WINDOW),
                              "--json"], check=True, capture_output=True, text=True)
        got = json.loads(out.stdout)
    print(f"scored tokens: transformers {n}, petal {got['tokens']}")
    print(f"loss: transformers {ref:.5f} (perplexity {math.exp(ref):.4f}); petal {got['loss']:.5f} "
          f"(perplexity {got['perplexity']:.4f}); perplexity ratio {got['perplexity'] / math.exp(ref):.5f}")
    gen = subprocess.run([petal, "generate", "--model", path, "--prompt", "def fibonacci(n):",
                          "--max-new-tokens", "40"], check=True, capture_output=True, text=True)
    print("petal's greedy completion of `def fibonacci(n):`:\n" + gen.stdout)


if __name__ == "__main__":
    main()
