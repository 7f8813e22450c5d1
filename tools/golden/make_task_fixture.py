"""Golden multiple-choice scores for `petal eval --task` (tests/fixtures/golden/task_mc.*), made
by transformers (versions in requirements.txt) the way lm-evaluation-harness scores a choice:
its `_encode_pair` (trailing spaces of the context moved onto the continuation, no special
tokens, the continuation's tokens those of `context + continuation` after the context's), the
sum of the continuation tokens' log-softmax, `acc` the argmax, `acc_norm` the argmax of the sum
over the choice's length in characters (its leading space not counted). Also each example's
scores through PEFT adapters that act on the input (tests/fixtures/golden/adapters/llama_*:
prompt tuning's virtual tokens lead the sequence, prefix tuning's keys and values every layer):
task_mc_scores_<adapter>.json.

    .venv/bin/python tools/golden/make_task_fixture.py
"""
import json
import os
import random

import torch
from peft import PeftModel
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


def loglikelihoods(model, tok, ex):
    """Each choice's summed log-probability after the prompt; positions the model puts in front
    of the sequence (prompt tuning's virtual tokens) skipped."""
    lls = []
    for c in ex["choices"]:
        ctx, cont = encode_pair(tok, ex["prompt"], c)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        lead = logits.shape[0] - ids.shape[1]
        logp = torch.log_softmax(logits, -1)
        lls.append(sum(logp[lead + len(ctx) + k - 1, t].item() for k, t in enumerate(cont)))
    return lls


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
        examples.append(ex)
        scores.append(loglikelihoods(model, tok, ex))
    acc = [max(range(len(s)), key=lambda j: (s[j], -j)) == e["answer"] for e, s in zip(examples, scores)]
    # lm-evaluation-harness divides by the choice's length without its delimiter (the space)
    norm = [max(range(len(s)), key=lambda j: (s[j] / len(e["choices"][j].lstrip()), -j)) == e["answer"]
            for e, s in zip(examples, scores)]
    with open(os.path.join(ROOT, "task_mc.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in examples)
    with open(os.path.join(ROOT, "task_mc_scores.json"), "w") as f:
        json.dump({"scores": scores, "acc": sum(acc) / len(acc), "acc_norm": sum(norm) / len(norm)}, f, indent=1)
    print(f"acc {sum(acc) / len(acc):.4f} acc_norm {sum(norm) / len(norm):.4f}")
    for name in ["llama_prompt_tuning", "llama_prefix_tuning"]:
        base = LlamaForCausalLM.from_pretrained(os.path.join(ROOT, "llama")).eval()
        peft = PeftModel.from_pretrained(base, os.path.join(ROOT, "adapters", name)).eval()
        with open(os.path.join(ROOT, f"task_mc_scores_{name}.json"), "w") as f:
            json.dump({"scores": [loglikelihoods(peft, tok, e) for e in examples]}, f, indent=1)
        print(f"{name}: scores written")


if __name__ == "__main__":
    main()
