#!/usr/bin/env python3
"""PASTA (Yang et al., EACL 2023, arXiv 2210.04382), written apart from petal's Rust: the official
mechanism transcribed from luka-group/PASTA, PASTA_modeling.py (commit 7f07d55), onto the real
transformers classes of petal's tiny fixtures through forward pre-hooks.

The official mechanism (PASTA_modeling.py):
  * BertPastaEmbeddings.forward (l. 22-34) only finds the special tokens: is_cls = ids == 101,
    is_sep = ids == 102 (bert-*-cased ids, hard-coded; nothing else counts), num_specials = the
    number of them in row 0, token_indices = nonzero() in row-major order, and the i-th of these
    (over the whole batch) gets slot i % num_specials. The embedding output itself is unchanged.
  * BertPastaLayer.forward (l. 61-78), in every encoder layer, before BertLayer.forward (so before
    the self-attention, on the hidden states entering the layer, which are also the residual of
    BertSelfOutput): assert num_specials <= num_special_tokens, then for each slot i
    hidden_states += dropout(special_token_embedding(i) * one_hot_i), one nn.Embedding(num_special,
    hidden) per layer, nn.Dropout(hidden_dropout_prob) applied to the added vector.
  * The vectors are nn.Embedding weights created inside from_pretrained, so they get BERT's
    _init_weights: N(0, initializer_range^2) = N(0, 0.02^2).
  * main_glue.py l. 416-427 (and main_ner.py l. 525-534): the optimizer holds only the parameters
    whose name contains 'special_token_embedding' or 'classifier' (the pooler is not trained).
    num_special_tokens is 2 for single-sentence GLUE tasks (cola, sst2), 3 for pairs (l. 81-91),
    2 for CoNLL-03 NER (main_ner.py l. 81).

petal's modes, checked here (eval mode, so the dropout is off):
  occurrence  the k-th special token ([CLS] or [SEP]) of each row, counted left to right per row,
              gets slot min(k, slots - 1); padding untouched. This equals the official slot
              assignment whenever every row of the batch has as many special tokens as row 0
              (GLUE batches: all single or all pairs) and no row has more than `slots` of them;
              on a mixed batch the official global `i % num_specials` wraps across rows (recorded
              in pasta.json), and beyond num_special the official code asserts instead of
              clipping. Each row run alone through a literal transcription of l. 24-32 and
              l. 64-68 must give the same logits as the batched hooks (checked below).
  token       one slot per special id (slot j for the j-th id of the list); every occurrence of
              that id gets it. Used for a decoder (Llama) and for BERT with [CLS] -> 0, [SEP] -> 1.

Hooks (transformers 5.24): register_forward_pre_hook(with_kwargs=True) on
model.bert.encoder.layer[l] (BertLayer.forward(hidden_states, attention_mask, encoder_hidden_states,
...), called by BertEncoder with hidden_states positional) and on model.model.layers[l]
(LlamaDecoderLayer.forward(hidden_states, attention_mask=..., position_embeddings=..., ...), called
with hidden_states positional); the hook adds to `hidden_states` whether it comes positionally or
as a keyword. For BERT (post-LN) that is the input of the self-attention and the residual of its
output LayerNorm; for Llama (pre-norm) it is the residual stream before input_layernorm.

Writes tests/fixtures/golden/pasta.safetensors (float32, the ids and slot maps int64; slot -1 =
no vector):
  bert.E (2,3,32) bert.slots (3,10) bert.logits (3,3) bert.hidden (3,10,32) bert.pooled (3,32)
  bert_token.E (2,2,32) bert_token.slots (3,10) bert_token.logits (3,3)
  llama.ids (2,8) llama.E (2,2,32) llama.slots (2,8) llama.logits (2,8,96)
and tests/fixtures/golden/pasta.json (versions, settings, the official semantics). Inputs of the
BERT cases: input_ids / attention_mask / token_type_ids of bert_seqcls.safetensors.

    /root/pyref/bin/python tools/golden/pasta_oracle.py     (or a venv from requirements.txt)
"""
import json
import os

import peft
import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
CLS, SEP = 2, 3  # the tiny vocab's [CLS], [SEP] (101, 102 in bert-*-cased)
STD = 0.5        # large so the effect is visible; the official init is N(0, 0.02^2)
LLAMA_IDS = [[1, 5, 9, 2, 20, 33, 2, 71], [7, 1, 3, 90, 2, 12, 60, 8]]
LLAMA_SPECIAL = [1, 2]
BERT_TOKEN_SPECIAL = [CLS, SEP]


def occurrence_slots(ids, special_ids, slots):
    """petal's occurrence mode: k-th special token of each row -> slot min(k, slots-1); -1 elsewhere."""
    out = torch.full_like(ids, -1)
    is_special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        is_special |= ids == s
    k = torch.cumsum(is_special.long(), dim=1) - 1
    out[is_special] = k.clamp(max=slots - 1)[is_special]
    return out


def token_slots(ids, special_ids):
    """Token mode: every occurrence of special_ids[j] -> slot j; -1 elsewhere."""
    out = torch.full_like(ids, -1)
    for j, s in enumerate(special_ids):
        out[ids == s] = j
    return out


def add_vectors(hidden, e_layer, slots):
    """hidden (B,S,H) + e_layer[slot] at every position with slot >= 0."""
    gathered = e_layer[slots.clamp(min=0)]  # (B,S,H)
    return hidden + gathered * (slots >= 0).unsqueeze(-1).to(hidden.dtype)


def hook_layers(layers, e, slots):
    """A forward pre-hook per layer adding e[l, slot] to the hidden_states argument."""
    handles = []
    for l, layer in enumerate(layers):
        def pre(module, args, kwargs, l=l):
            if "hidden_states" in kwargs:
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = add_vectors(kwargs["hidden_states"], e[l], slots)
            else:
                args = (add_vectors(args[0], e[l], slots),) + tuple(args[1:])
            return args, kwargs
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


# ---- literal transcription of the official code, for the cross-check ----------------------------

def official_special_token_tensors(input_ids, cls_id=CLS, sep_id=SEP):
    """BertPastaEmbeddings.forward, PASTA_modeling.py l. 24-34 (ids 101/102 replaced by cls/sep)."""
    is_cls_token = (input_ids == cls_id).long()
    is_sep_token = (input_ids == sep_id).long()
    special_token_positions = is_cls_token + is_sep_token
    num_specials = torch.sum(special_token_positions[0]).item()
    token_indices = special_token_positions.nonzero()
    t = torch.zeros_like(special_token_positions).unsqueeze(dim=0).expand(num_specials, -1, -1).long().clone()
    for i in range(len(token_indices)):
        current_token = i % num_specials
        t[current_token][token_indices[i][0], token_indices[i][1]] = 1
    return num_specials, t


def official_hooks(layers, e, special_token_indices, num_special):
    """BertPastaLayer.forward, PASTA_modeling.py l. 62-68 (eval: dropout is the identity)."""
    handles = []
    for l, layer in enumerate(layers):
        def pre(module, args, kwargs, l=l):
            assert special_token_indices.shape[0] <= num_special
            h = args[0]
            for i in range(special_token_indices.shape[0]):
                special_token = e[l, i]
                idx = special_token_indices[i].unsqueeze(-1).expand(-1, -1, h.shape[-1])
                h = h + special_token * idx
            return (h,) + tuple(args[1:]), kwargs
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


def official_slots_map(input_ids):
    """The slot each position gets from the official code on this batch (-1: none)."""
    n, t = official_special_token_tensors(input_ids)
    out = torch.full_like(input_ids, -1)
    for i in range(n):
        out[t[i] == 1] = i
    return out


# ---- the cases ---------------------------------------------------------------------------------

def bert_run(model, batch, e=None, slots=None):
    handles = hook_layers(model.bert.encoder.layer, e, slots) if e is not None else []
    try:
        with torch.no_grad():
            out = model.bert(**batch)
            logits = model.classifier(model.dropout(out.pooler_output))
            logits2 = model(**batch).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(logits, logits2)
    return out.last_hidden_state, out.pooler_output, logits


def main():
    torch.set_grad_enabled(False)
    tensors, report = {}, {}
    seqcls = load_file(os.path.join(ROOT, "bert_seqcls.safetensors"))
    batch = {k: seqcls[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    ids = batch["input_ids"]

    bert = BertForSequenceClassification.from_pretrained(os.path.join(ROOT, "bert")).eval()
    nl = bert.config.num_hidden_layers
    h = bert.config.hidden_size
    base_hidden, base_pooled, base_logits = bert_run(bert, batch)
    assert torch.allclose(base_logits, seqcls["base.logits"], atol=1e-5), "bert fixture drifted"

    # a. occurrence mode
    torch.manual_seed(1)
    e = torch.randn(nl, 3, h) * STD
    slots = occurrence_slots(ids, [CLS, SEP], 3)
    hidden, pooled, logits = bert_run(bert, batch, e, slots)
    tensors.update({"bert.E": e, "bert.slots": slots, "bert.logits": logits, "bert.hidden": hidden,
                    "bert.pooled": pooled})
    report["bert"] = (logits - base_logits).abs().max().item()
    # cross-check: each row alone through the literal official mechanism
    for r in range(ids.shape[0]):
        row = {k: v[r:r + 1] for k, v in batch.items()}
        n, t = official_special_token_tensors(row["input_ids"])
        assert torch.equal(official_slots_map(row["input_ids"]), slots[r:r + 1])
        handles = official_hooks(bert.bert.encoder.layer, e, t, 3)
        try:
            lr = bert(**row).logits
        finally:
            for hd in handles:
                hd.remove()
        assert torch.allclose(lr, logits[r:r + 1], atol=1e-5), (r, lr, logits[r])
    official_batch = official_slots_map(ids)

    # c. BERT token mode
    torch.manual_seed(3)
    e = torch.randn(nl, 2, h) * STD
    slots = token_slots(ids, BERT_TOKEN_SPECIAL)
    _, _, logits = bert_run(bert, batch, e, slots)
    tensors.update({"bert_token.E": e, "bert_token.slots": slots, "bert_token.logits": logits})
    report["bert_token"] = (logits - base_logits).abs().max().item()

    # b. Llama token mode
    llama = LlamaForCausalLM.from_pretrained(os.path.join(ROOT, "llama")).eval()
    lids = torch.tensor(LLAMA_IDS, dtype=torch.int64)
    torch.manual_seed(2)
    e = torch.randn(llama.config.num_hidden_layers, 2, llama.config.hidden_size) * STD
    slots = token_slots(lids, LLAMA_SPECIAL)
    base = llama(input_ids=lids).logits
    handles = hook_layers(llama.model.layers, e, slots)
    try:
        logits = llama(input_ids=lids).logits
        # the keyword form of the hook, on a direct layer call
        x = torch.randn(2, 8, llama.config.hidden_size)
        seen = {}
        probe = llama.model.layers[0].register_forward_pre_hook(
            lambda m, a, k: seen.update(h=k.get("hidden_states", a[0] if a else None)), with_kwargs=True)
        pos = torch.arange(8).unsqueeze(0).expand(2, -1)
        pe = llama.model.rotary_emb(x, pos)
        llama.model.layers[0](hidden_states=x, position_embeddings=pe, position_ids=pos)
        probe.remove()
        assert torch.allclose(seen["h"], add_vectors(x, e[0], slots)), "keyword hidden_states not hooked"
    finally:
        for hd in handles:
            hd.remove()
    tensors.update({"llama.ids": lids, "llama.E": e, "llama.slots": slots, "llama.logits": logits})
    report["llama"] = (logits - base).abs().max().item()

    for k in tensors:
        tensors[k] = tensors[k].contiguous()
        if tensors[k].is_floating_point():
            tensors[k] = tensors[k].float()
    save_file(tensors, os.path.join(ROOT, "pasta.safetensors"))

    meta = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "safetensors": safetensors.__version__},
        "official": {
            "source": "luka-group/PASTA @ 7f07d55, PASTA_modeling.py, main_glue.py, main_ner.py",
            "where": "start of every BertPastaLayer (every encoder layer), before BertLayer.forward, i.e. before "
                     "self-attention; added to the hidden states entering the layer (also the residual of "
                     "BertSelfOutput); the embedding output is not modified apart from being layer 0's input "
                     "(PASTA_modeling.py l. 61-78)",
            "special_ids": "101 ([CLS]) and 102 ([SEP]) hard-coded, nothing else (l. 24-26)",
            "slot": "nonzero() of the special mask in row-major order over the whole batch; the i-th gets slot "
                    "i % num_specials, num_specials = number of specials in row 0 (l. 27-32). Per row k-th "
                    "occurrence only when all rows have row 0's count",
            "beyond_num_special": "assert num_specials(row 0) <= num_special_tokens (l. 63); other rows wrap "
                                  "around (modulo); no clipping",
            "padding": "[PAD] is not 101/102: untouched",
            "init": "nn.Embedding(num_special, hidden) per layer (l. 47), initialised by BertPreTrainedModel."
                    "_init_weights in from_pretrained: N(0, initializer_range^2) = N(0, 0.02^2)",
            "dropout": "nn.Dropout(hidden_dropout_prob) on the added vector (l. 48, 67)",
            "trained": "special_token_embedding and classifier (main_glue.py l. 416-427); pooler and the rest "
                       "are not in the optimizer",
            "num_special_tokens": "GLUE: 2 single-sentence (cola, sst2), 3 pairs (main_glue.py l. 81-91); "
                                  "CoNLL-03: 2 (main_ner.py l. 81)",
        },
        "official_slots_on_this_mixed_batch": official_batch.tolist(),
        "cases": {
            "bert": {"mode": "occurrence", "special_ids": [CLS, SEP], "slots": 3, "seed": 1, "std": STD},
            "bert_token": {"mode": "token", "special_ids": BERT_TOKEN_SPECIAL, "seed": 3, "std": STD},
            "llama": {"mode": "token", "special_ids": LLAMA_SPECIAL, "seed": 2, "std": STD},
        },
        "init": "torch.manual_seed(seed); E = torch.randn(layers, slots, hidden) * std",
        "hook": "register_forward_pre_hook(with_kwargs=True) on model.bert.encoder.layer[l] / "
                "model.model.layers[l], adding E[l, slot] to hidden_states (positional args[0] or keyword)",
        "max_abs_logit_change": report,
    }
    with open(os.path.join(ROOT, "pasta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    for k, v in tensors.items():
        print(f"{k:20s} {tuple(v.shape)} {v.dtype}")
    print("slots bert (occurrence):", tensors["bert.slots"].tolist())
    print("official slots on the mixed batch:", official_batch.tolist())
    for k, v in report.items():
        print(f"max |logits - no vectors| {k}: {v:.6f}")
        assert v > 1e-3, k


if __name__ == "__main__":
    main()
