#!/usr/bin/env python3
"""FedIns, transcribed from the official code (chunmeifeng/FedIns: models/vision_transformer.py,
utils/public_utils.py), written apart from petal's Rust, onto transformers' tiny BERT
classifier (tests/fixtures/golden/bert) through forward hooks:

- the query of each row is the frozen model's feature of it: a separate pass with no SSF,
  the first token's last hidden state (the official `queryModel.forward_features(x)[:, 0]`);
- cosine similarity of query and keys (both normalised), hard top-k;
- the row's SSF is the uniform mean of its k entries' scales and shifts, applied after every
  linear of the encoder and the pooler (`y * scale + shift`), the classifier left as it is;
- the key surrogate `reduced_sim = sum over the batch and the k chosen of cos / B`, loss
  `CE + w * (1 - reduced_sim)` (petal's weighting: the official code weighs CE by 1 - w).

Writes tests/fixtures/golden/fedins.safetensors: the pool (`<module>.fedins_scale`,
`<module>.fedins_shift`, (P, out)), `fedins_keys` (P, hidden), `query`, `chosen` (B, k),
`logits`, `ce`, `surrogate`, and the gradients of the total loss (`grad.<name>`).

And tests/fixtures/golden/fedins_heads.safetensors: the official code's own averaging and head
pool (its `get_top_ssf` and `forward_head`): the chosen entries averaged over the k of each row
and then over the batch, so every row of the batch shares one SSF and one head, the classifier
replaced by the mean of the chosen heads (`classifier.fedins_head_weight` (P, classes, hidden),
`classifier.fedins_head_bias` (P, classes)).

    python -m venv .venv && .venv/bin/pip install -r tools/golden/requirements.txt
    .venv/bin/python tools/golden/fedins_oracle.py
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
P, K, W = 4, 2, 0.1
LABELS = [0, 2, 1]


def main():
    write(heads=False, name="fedins.safetensors", seed=20230801)
    write(heads=True, name="fedins_heads.safetensors", seed=20231002)


def write(heads, name, seed):
    """One fixture: per-row mixing and the model's head (`heads` False), or the official
    code's batch mixing and head pool (`heads` True)."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(os.path.join(ROOT, "bert")).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batch = load_file(os.path.join(ROOT, "bert_seqcls.safetensors"))
    inputs = {k: batch[k].long() for k in ("input_ids", "attention_mask", "token_type_ids")}
    hidden = model.config.hidden_size

    # the frozen pass: no hooks yet
    with torch.no_grad():
        query = model.bert(**inputs).last_hidden_state[:, 0]

    targets = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.startswith("classifier")}
    pool = {}
    for n, m in targets.items():
        pool[f"{n}.fedins_scale"] = (1 + 0.3 * torch.randn(P, m.out_features)).requires_grad_()
        pool[f"{n}.fedins_shift"] = (0.3 * torch.randn(P, m.out_features)).requires_grad_()
    # keys near each row's own direction (off the rows' common part), so rows choose
    # differently; the last key random
    centred = query - query.mean(0)
    keys = torch.randn(P, hidden)
    keys[:3] = centred / centred.norm(dim=1, keepdim=True) * 4 + 0.5 * keys[:3]
    keys.requires_grad_()

    sim = F.normalize(query, dim=-1) @ F.normalize(keys.detach(), dim=-1).T
    chosen = sim.topk(K, dim=1).indices  # (B, K)

    def mixed(t):
        """The chosen entries of pool tensor t (P, ...) averaged over each row's k: (B, ...);
        with `heads`, then over the batch too (the official get_top_ssf), kept per row."""
        m = t[chosen].mean(1)
        return m.mean(0, keepdim=True).expand_as(m) if heads else m

    def hook(name):
        def f(_module, _inp, out):
            scale = mixed(pool[f"{name}.fedins_scale"])  # (B, out)
            shift = mixed(pool[f"{name}.fedins_shift"])
            if out.dim() == 3:
                scale, shift = scale[:, None, :], shift[:, None, :]
            return out * scale + shift
        return f

    for n, m in targets.items():
        m.register_forward_hook(hook(n))
    if heads:  # the official forward_head: the mean of the chosen heads replaces the classifier
        head = model.classifier
        classes = head.out_features
        pool["classifier.fedins_head_weight"] = (head.weight.detach()[None]
                                                 + 0.3 * torch.randn(P, classes, hidden)).requires_grad_()
        pool["classifier.fedins_head_bias"] = (head.bias.detach()[None]
                                               + 0.3 * torch.randn(P, classes)).requires_grad_()

        def replace(_module, inp, _out):
            w = mixed(pool["classifier.fedins_head_weight"])  # (B, classes, hidden)
            b = mixed(pool["classifier.fedins_head_bias"])
            return torch.einsum("bh,bch->bc", inp[0], w) + b
        head.register_forward_hook(replace)
    logits = model(**inputs).logits
    ce = F.cross_entropy(logits, torch.tensor(LABELS))
    cos = F.normalize(query, dim=-1)[:, None, :] * F.normalize(keys, dim=-1)[chosen]
    reduced = cos.sum() / query.shape[0]
    surrogate = W * (1 - reduced)
    (ce + surrogate).backward()

    out = {**{k: v.detach() for k, v in pool.items()}, "fedins_keys": keys.detach(),
           "query": query, "chosen": chosen.float(), "logits": logits.detach(),
           "labels": torch.tensor(LABELS, dtype=torch.float32), "ce": ce.detach().reshape(1),
           "surrogate": surrogate.detach().reshape(1), "grad.fedins_keys": keys.grad}
    for k, v in pool.items():
        out[f"grad.{k}"] = v.grad
    save_file({k: v.contiguous().float() for k, v in out.items()}, os.path.join(ROOT, name))
    print(f"{len(targets)} linears, chosen {chosen.tolist()}, ce {ce.item():.5f}, "
          f"surrogate {surrogate.item():.5f}")


if __name__ == "__main__":
    main()
