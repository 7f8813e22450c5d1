#!/usr/bin/env python3
"""Golden truncated pair encodings by transformers' own tokenizer of the tiny golden BERT.

The texts of tests/fixtures/golden/bert_seqcls.json (from make_bert_fixtures.py) and pairs made
here (the first text longer, the second longer, both as long, one text), encoded as a
sequence-classification model reads them, `truncation="longest_first"` at several lengths:
which text loses tokens, in which order, and where the special tokens stay. transformers'
BERT tokenizer runs Hugging Face's Rust `tokenizers` library, whose truncation petal calls
too: this pins petal to transformers' behaviour, not to an implementation written apart.

    target/venv-ref/bin/python tools/golden/make_bert_truncation.py

Writes tests/fixtures/golden/bert_truncation.json: [{text, text_pair, max_length, ids,
token_type_ids}]. Versions: tools/golden/requirements.txt (transformers 5.24.0).
"""
import json
import pathlib

from transformers import AutoTokenizer

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/golden"


def main():
    tok = AutoTokenizer.from_pretrained(GOLDEN / "bert")
    texts = json.loads((GOLDEN / "bert_seqcls.json").read_text())["texts"]
    texts += [
        {"text": "the cat sat on the mat today", "text_pair": "a dog ran"},
        {"text": "a dog ran", "text_pair": "the cat sat on the mat today"},
        {"text": "the cat sat down", "text_pair": "a dog ran off"},
        {"text": "the cat sat on the mat today and then it ran", "text_pair": None},
    ]
    out = []
    for t in texts:
        for n in (5, 6, 7, 8, 9, 12):
            e = tok(t["text"], t["text_pair"], truncation="longest_first", max_length=n)
            out.append({"text": t["text"], "text_pair": t["text_pair"], "max_length": n,
                        "ids": e["input_ids"], "token_type_ids": e["token_type_ids"]})
    (GOLDEN / "bert_truncation.json").write_text(json.dumps(out, indent=1) + "\n")
    print(len(out), "cases")


if __name__ == "__main__":
    main()
