#!/usr/bin/env python3
"""Golden token ids of the real SmolLM2 GGUF's tokenizer, made by transformers' own GGUF loader.

transformers builds the tokenizer from the GGUF's metadata (`tokenizer.ggml.*`: the vocabulary,
merges, pre-tokenizer type, special tokens), as petal does apart from it (`from_bpe_parts`).
The strings test what a wrong merge rank, pre-tokenizer split or special-token rule would
change: digits, runs of spaces and newlines, accents, CJK, an emoji, code, contractions, a URL,
and the chat template's special tokens.

    target/release/petal assets smollm2
    target/venv-ref/bin/python tools/golden/make_gguf_tokens.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes tests/fixtures/golden/smollm2_gguf_tokens.json: [{text, ids}] (no BOS added).
Versions: tools/golden/requirements.txt (transformers 5.24.0, gguf 0.19.0).
"""
import json
import pathlib
import sys

from transformers import AutoTokenizer

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/golden/smollm2_gguf_tokens.json"
DEFAULT = pathlib.Path.home() / ".cache/petal/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world",
    "  two leading spaces,   a run of three, and a tab\tthen text",
    "digits 1234567 and 3.14159, year 2026, -42",
    "line one\n\nline three\r\nwindows line",
    "accents: café, naïve, Zürich; CJK: 日本語の文章; emoji: 🙂👍",
    "def f(x):\n    return x**2  # square\n",
    "don't won't I'm they're we'll",
    "see https://example.com/a?b=c&d=e#frag",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "ALL CAPS and MiXeD cAsE words",
]


def main():
    path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TEXTS]
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    for o in out:
        print(len(o["ids"]), repr(o["text"][:40]))


if __name__ == "__main__":
    main()
