"""Golden multiple-choice scores for `petal eval --task` (tests/fixtures/golden/task_mc.*), made
by transformers (versions in requirements.txt) the way lm-evaluation-harness scores a choice:
its `_encode_pair` (trailing spaces of the context moved onto the continuation, no special
tokens, the continuation's tokens those of `context + continuation` after the context's), the
sum of the continuation tokens' log-softmax, `acc` the argmax, `acc_norm` the argmax of the sum
over the choice's length in characters (its leading space not counted).

    .venv/bin/python tools/golden/make_task_fixture.py
"""
import json
import os
import random

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")


def encode_pair(tok, context, continuation):
    n = len(context) - len(context.rstrip())
    if n > 0:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def main():
    model = LlamaForCausalLM.from_pretrained(os.path.join(ROOT, "llama")).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "llama"))
    rng = random.Random(0)
    # no word that begins with "w1" or "w2": transformers splits those at its special tokens
    # w1 (bos) and w2 (eos) ("w21" -> "w2", "1"), which the tokenizer.json alone does not
    words = [f"w{i}" for i in range(3, 96) if not str(i).startswith(("1", "2"))]
    word = lambda: rng.choice(words)
    examples, scores = [], []
    for i in range(12):
        prompt = " ".join(word() for _ in range(rng.randrange(3, 9))) + (" " if i % 3 == 0 else "")
        choices = [" " + " ".join(word() for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(2, 5))]
        if i % 3 == 0:
            choices = [c.lstrip() for c in choices]  # the context's trailing space joins them
        ex = {"prompt": prompt, "choices": choices, "answer": rng.randrange(len(choices))}
        if i % 2:
            ex["task"] = "odd"
        lls = []
        for c in choices:
            ctx, cont = encode_pair(tok, prompt, c)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            lls.append(sum(logp[len(ctx) + k - 1, t].item() for k, t in enumerate(cont)))
        examples.append(ex)
        scores.append(lls)
    acc = [max(range(len(s)), key=lambda j: (s[j], -j)) == e["answer"] for e, s in zip(examples, scores)]
    # lm-evaluation-harness divides by the choice's length without its delimiter (the space)
    norm = [max(range(len(s)), key=lambda j: (s[j] / len(e["choices"][j].lstrip()), -j)) == e["answer"]
            for e, s in zip(examples, scores)]
    with open(os.path.join(ROOT, "task_mc.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in examples)
    with open(os.path.join(ROOT, "task_mc_scores.json"), "w") as f:
        json.dump({"scores": scores, "acc": sum(acc) / len(acc), "acc_norm": sum(norm) / len(norm)}, f, indent=1)
    print(f"acc {sum(acc) / len(acc):.4f} acc_norm {sum(norm) / len(norm):.4f}")


if __name__ == "__main__":
    main()
