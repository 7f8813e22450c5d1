#!/usr/bin/env python3
"""Golden greedy generations by transformers + PEFT: whole forwards over the growing sequence,
and transformers' own `generate` (KV cache on) beside them.

The tiny golden models (tests/fixtures/golden/{llama,qwen2,mistral}, from make_fixtures.py),
alone and with PEFT adapters of tests/fixtures/golden/adapters/, continue fixed prompts
(token ids) greedily (`do_sample=False`) for up to 24 new tokens, stopping at the model's
end-of-sequence id (the last case keeps two Mistral prompts that end there; `eos` per case). The
llama's context passes its llama3 RoPE scaling's original 16 positions while decoding. Each
step's margin between the two largest logits (of the whole forwards) is recorded: the logits
of these random models are close together, so each case keeps the first two seeded prompts
whose every step's margin is at least 1e-3 (petal's logits match transformers' within 1e-4
relative, far inside that); the others would hang on rounding.

    target/venv-ref/bin/python tools/golden/make_generate.py

Writes tests/fixtures/golden/generate.json: a list of {model, adapter (null: none), prompt
(ids), ids (the new tokens by whole forwards, the end-of-sequence id left out), eos (whether
it ended there), min_margin, generate_ids (`generate`'s tokens), base_generate_ids (with an
adapter: `generate`'s tokens with the adapter disabled)}. The whole forwards are the
reference: `generate` agrees with them on every case but the prompt-learning ones, where the
file shows what it does instead (last run: with prefix tuning its tokens are the base
model's; with prompt tuning they leave the forward's after 8 to 10).
Versions: tools/golden/requirements.txt (torch 2.15.0, transformers 5.24.0, peft 0.21.2).
"""
import json
import pathlib

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/golden"
CASES = [
    ("llama", None),
    ("llama", "llama_lora_qv"),
    ("llama", "llama_dora"),
    ("llama", "llama_prefix_tuning"),
    ("llama", "llama_prompt_tuning"),
    ("qwen2", None),
    ("qwen2", "qwen2_lora_all_linear"),
    ("mistral", None),
    ("mistral", None, "eos"),  # two prompts whose greedy decode ends at the end-of-sequence id
]
MAX_NEW = 24
KEEP = 2  # prompts per case


def candidates():
    """Seeded prompts of 3 to 12 ids (the first the BOS id 1), tried in order."""
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        n = int(torch.randint(3, 13, (1,), generator=g))
        yield [1] + torch.randint(3, 96, (n - 1,), generator=g).tolist()


def main():
    out = []
    for model_name, adapter, *want in CASES:
        want_eos = want == ["eos"]
        model = AutoModelForCausalLM.from_pretrained(GOLDEN / model_name, dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, GOLDEN / "adapters" / adapter)
        model.eval()
        eos = model.config.eos_token_id if adapter is None else model.base_model.config.eos_token_id
        kept = 0
        for prompt in candidates():
            if kept == KEEP:
                break
            ids = torch.tensor([prompt])
            with torch.no_grad():
                g = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=MAX_NEW,
                    eos_token_id=eos,
                    pad_token_id=0,
                    return_dict_in_generate=True,
                )
            def strip(seq):
                new = seq[0, len(prompt):].tolist()
                return new[:-1] if eos is not None and new and new[-1] == eos else new

            cached = strip(g.sequences)
            base = None
            if adapter is not None:
                with torch.no_grad(), model.disable_adapter():
                    base = strip(model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0))
            # the same greedy decode by whole forwards over the growing sequence (no cache)
            new, margins, ended = [], [], False
            with torch.no_grad():
                for _ in range(MAX_NEW):
                    seq = torch.tensor([prompt + new])
                    mask = torch.ones_like(seq)
                    top = model(input_ids=seq, attention_mask=mask).logits[0, -1].topk(2)
                    margins.append(float(top.values[0] - top.values[1]))
                    nxt = int(top.indices[0])
                    if nxt == eos:
                        ended = True
                        break
                    new.append(nxt)
            m = min(margins)
            if m < 1e-3 or (want_eos and not ended):
                continue
            kept += 1
            out.append({
                "model": model_name,
                "adapter": adapter,
                "prompt": prompt,
                "ids": new,
                "eos": ended,
                "min_margin": m,
                "generate_ids": cached,
                "base_generate_ids": base,
            })
            print(model_name, adapter, prompt, len(new), "eos" if ended else "", f"{m:.3g}",
                  "" if cached == new else f"generate differs: {cached}")
        assert kept == KEEP, f"{model_name} {adapter}: only {kept} prompts without near ties"
    (GOLDEN / "generate.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
