#!/usr/bin/env python3
"""E2VPT (Han et al., ICCV 2023, arXiv 2307.13770) key-value prompts and input prompts, written apart
from petal's Rust: petal's "kv_prompt" transcription for decoders, computed on the REAL transformers
LlamaForCausalLM of tests/fixtures/golden/llama (tiny random Llama: hidden 32, 2 layers, 4 query
heads, 2 key/value heads, head_dim 8, vocab 96), eval mode, float32.

The official mechanism (ChengHan111/E2VPT @ 7a66e75; file:line):
  * src/models/vit_backbones/vit_changeVK.py, Attention: per layer one nn.Parameter
    deep_QKV_embeddings of shape (num_heads, NUM_TOKENS, head_dim) when SHARE_PARAM_KV (default True,
    src/configs/config.py l. 187; l. 157-173), or deep_QKV_embeddings_K / _V (l. 131-155). In
    forward (QUERY_PROMPT_MODE 0, the default, config.py l. 216): after the query/key/value
    projections and the head split (l. 237-243), the prompt goes through QKV_proj = nn.Identity
    (l. 225) and QKV_dropout (P_VK.DROPOUT, default 0.0; l. 227), is expanded over the batch and
    concatenated along the sequence axis to the keys and to the values (l. 294-309): in FRONT of them
    with LAYER_BEHIND True (the default, config.py l. 186: "prompt + layer"; l. 301-302, 308-309),
    behind them otherwise (l. 298-299, 305-306). The SAME tensor goes to keys and values when shared
    (l. 305-309). Queries are not extended, so the output length is unchanged; scores / softmax /
    context as usual (l. 382-392). DEEP (default True): every layer its own tensor (Encoder,
    l. 761-774; shallow: layer 0 only). Init ORIGIN_INIT (default 2: kaiming_uniform_, l. 172-173).
  * src/models/vit_prompt/vit_prompt_VK.py, PromptedTransformer_Prompt_VK: NUM_TOKENS_P visual prompts
    (1, N_p, hidden), xavier-uniform (l. 85-93), inserted after [CLS] and before the patches, after the
    position embeddings (incorporate_prompt, l. 127-155); with DEEP_P (default True) layers 1.. replace
    the prompt slots by their own deep_prompt_embeddings[i-1] (l. 170-209).
  * Pruning masks (MASK_CLS_TOKEN, l. 44-51): a token mask m (N_p,) of ones and a piece mask
    (N_p, CLS_TOKEN_P_PIECES_NUM=16) of ones, both nn.Parameter with requires_grad=True (and, named
    "...prompt...", trainable in stage 1: src/models/vit_models.py l. 147-154). Applied as
    prompt * piece_mask.repeat((1, hidden/16)) (l. 139: feature d is in piece d % 16, an INTERLEAVED
    layout, not contiguous chunks) and prompt * m[:, None] (l. 143), to the input prompts and to every
    deep prompt (l. 187-193).
  * Importance (src/engine/trainer.py calculate_importance l. 359-434): load the trained
    last_model.pth, eval(), and for every training batch forward_one_batch(..., is_train=True)
    (zero_grad, backward AND optimizer.step(), l. 130-133), then score += m.grad and
    piece_score += piece_mask.grad: the SIGNED gradient of the batch-mean loss (no abs), averaged over
    the batches (l. 422-423); optional L2 normalisation per token (NORMALIZE_SCORES_BY_TOKEN, default
    False, l. 427-432). Selection: ascending sort of the signed score (reverse = MASK_RESERVE = False),
    lowest first (what_tokens_to_mask l. 535-555, what_tokens_pieces_to_mask l. 500-532: for EVERY
    token the same number of its lowest-score pieces); cumulative counts int(n * p / 100) for
    p = 10..90 %, capped at n - MIN_NUMBER_* (determine_mask_sequence l. 436-475).
  * Rewinding (tune_vtab_PruningRewind_CVK.py rewind_train l. 432-484, main l. 555-625): for every
    (token count, piece count) pair a NEW model is built (build_model: pretrained backbone reloaded,
    prompts and key-value prompts freshly randomly initialised; no seed set there), the chosen mask
    entries are set to 0 and both masks frozen (vit_prompt_VK.py l. 53-67, 223-236), and the whole
    schedule is trained again; the best pair on val is kept (find_best_MtMtp l. 84-125) and rerun with
    5 seeds. Masked prompt tokens stay in the sequence as zero vectors. Key-value prompts are never
    pruned (MASK_CLS_TOKEN_ON_VK: "unfinished", config.py l. 214).

petal's LM transcription, computed here:
  * inputs_embeds = cat(P_in broadcast to every row, embed_tokens(ids)) : n_p input prompts in front.
  * key-value slots: per layer l the n_kv slots KV[l] (n_kv, kv_heads, head_dim), the same tensor for
    keys and values (SHARE_PARAM_KV), in front of the layer's keys and values exactly as n_kv positions
    already in the KV cache (PEFT prefix tuning's mechanism): the slot keys are NOT rotated, the real
    positions (prompts, then tokens) are n_kv + arange(n_p + T), every position attends to all n_kv
    slots and causally to the prompts and tokens up to itself. Built with
    transformers.DynamicCache(ddp_cache_data=[(K_l, V_l) for l], config=model.config), K_l = V_l =
    KV[l].transpose(0, 1) expanded to (batch, kv_heads, n_kv, head_dim) (slot j of kv head h is
    KV[l, j, h]; query head q uses kv head q // (heads / kv_heads)), passed as `cache=`, with
    position_ids = n_kv + arange(n_p + T) and attention_mask = ones(batch, n_kv + n_p + T).
    A fresh cache per forward (the forward appends to it).
  * loss (also what the gradients are of): mean over the batch and the T token positions of the
    cross-entropy of predicting ids[b, t] from the logits at sequence position n_p - 1 + t
    (t = 0 .. T-1): the first token is predicted from the last prompt, token t from token t-1; the
    logits at the prompt positions 0 .. n_p-2 and at the last token carry no loss. Equivalently the
    HF loss with labels = cat(full(-100, n_p), ids) (PEFT's prompt-learning labels), checked below.
  * gate_grad[i] = dL/dm_i for P_in * m[:, None], m = ones(n_p) (= (P_in[i] * grad_P_in[i]).sum());
    seg_grad[i, s] = dL/dg_is for P_in * g.repeat_interleave(8, 1), g = ones(n_p, 4): 4 CONTIGUOUS
    segments of 8 features (s = d // 8); seg_grad_official[i, s] the same for the official layout
    g.repeat((1, 8)) (s = d % 4). Signed; petal's |.| or the official signed order is left to petal.

Writes tests/fixtures/golden/kv_prompt.safetensors (float32; ids int64):
  ids (2,6)  P_in (3,32)  KV (2,4,2,8)  logits (2,9,96)  K (2,4,2,8)  V (2,4,2,8)  sep.logits (2,9,96)
  loss (1,)  grad_P_in (3,32)  grad_KV (2,4,2,8)  gate_grad (3,)  seg_grad (3,4)
  seg_grad_official (3,4)  base.logits (2,6,96) (the model alone on ids, no prompts, no slots)
and tests/fixtures/golden/kv_prompt.json (versions, conventions, official semantics, check results).
Checks: a literal prefix-attention forward written here from the model's weights (explicit
concatenation and mask) against the cache forward, logits and gradients; n_kv = 0 against no cache;
shared K = V against the separate path with two equal copies; PEFT PrefixTuning (the same KV in
PEFT's (n_kv, layers*2*kv_heads*head_dim) layout) against the cache forward; eager against sdpa; the
HF labels loss against the explicit loss; gate and segment gradients against P_in * grad_P_in. To show
the checks can see the conventions, kv_prompt.json also records how far the logits move with the real
positions from 0 instead of n_kv, and with the slot keys rotated at positions 0 .. n_kv-1.

    /root/pyref/bin/python tools/golden/kv_prompt_oracle.py     (or a venv from requirements.txt)
"""
import json
import os

import peft
import safetensors
import torch
import torch.nn.functional as F
import transformers
from peft import PrefixTuningConfig, get_peft_model
from safetensors.torch import save_file
from transformers import DynamicCache, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
IDS = [[1, 5, 9, 14, 20, 33], [7, 7, 3, 90, 45, 12]]
N_P, N_KV, STD, SEGMENTS = 3, 4, 0.5, 4


def load(attn="eager"):
    m = LlamaForCausalLM.from_pretrained(os.path.join(ROOT, "llama"), attn_implementation=attn,
                                         dtype=torch.float32).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def inputs_embeds(model, p_in, ids):
    emb = model.model.embed_tokens(ids)
    return torch.cat([p_in.unsqueeze(0).expand(ids.shape[0], -1, -1), emb], dim=1)


def slot_states(t, batch):
    """KV[l] (n_kv, kv_heads, head_dim) -> (batch, kv_heads, n_kv, head_dim)."""
    return t.transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)


def forward_cache(model, p_in, k, v, ids, labels=None):
    """The cache construction: k, v (layers, n_kv, kv_heads, head_dim); v is k for the shared case."""
    b = ids.shape[0]
    x = inputs_embeds(model, p_in, ids)
    n_kv, s = k.shape[1], x.shape[1]
    cache = DynamicCache(ddp_cache_data=[(slot_states(k[l], b), slot_states(v[l], b)) for l in range(k.shape[0])],
                         config=model.config)
    assert cache.get_seq_length() == n_kv
    pos = (n_kv + torch.arange(s)).unsqueeze(0).expand(b, -1)
    mask = torch.ones(b, n_kv + s, dtype=torch.long)
    out = model(inputs_embeds=x, cache=cache, position_ids=pos, attention_mask=mask, use_cache=True, labels=labels)
    assert out.cache.get_seq_length() == n_kv + s
    return out


def forward_literal(model, p_in, k, v, ids):
    """Prefix attention written out: RMSNorm, projections, RoPE at n_kv + i on the real positions only,
    unrotated slots concatenated in front of keys and values, explicit mask, GQA by head groups."""
    cfg = model.config
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = inputs_embeds(model, p_in, ids)
    b, s, _ = x.shape
    n_kv = k.shape[1]
    pos = (n_kv + torch.arange(s)).unsqueeze(0).expand(b, -1)
    cos, sin = model.model.rotary_emb(x, pos)
    i = torch.arange(s).unsqueeze(1)
    j = torch.arange(n_kv + s).unsqueeze(0)
    allowed = (j < n_kv) | (j - n_kv <= i)  # (s, n_kv + s)
    for l, layer in enumerate(model.model.layers):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(b, s, nh, hd).transpose(1, 2)
        kk = a.k_proj(h).view(b, s, nkv, hd).transpose(1, 2)
        vv = a.v_proj(h).view(b, s, nkv, hd).transpose(1, 2)
        q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
        kk = torch.cat([slot_states(k[l], b), kk], dim=2)
        vv = torch.cat([slot_states(v[l], b), vv], dim=2)
        kk = kk.repeat_interleave(nh // nkv, dim=1)
        vv = vv.repeat_interleave(nh // nkv, dim=1)
        sc = (q @ kk.transpose(-1, -2)) * hd ** -0.5
        sc = sc.masked_fill(~allowed, float("-inf"))
        o = (sc.softmax(-1) @ vv).transpose(1, 2).reshape(b, s, nh * hd)
        x = x + a.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))


def lm_loss(logits, ids, n_p):
    """Mean CE of ids[b, t] from the logits at position n_p - 1 + t, t = 0 .. T-1."""
    t = ids.shape[1]
    pred = logits[:, n_p - 1:n_p - 1 + t]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids.reshape(-1))


def grads(fwd, model, p_in, kv, ids):
    """Loss and gradients w.r.t. P_in, KV (shared), the token gate and both segment gates."""
    p = p_in.clone().requires_grad_(True)
    kvv = kv.clone().requires_grad_(True)
    m = torch.ones(N_P, requires_grad=True)
    g = torch.ones(N_P, SEGMENTS, requires_grad=True)
    go = torch.ones(N_P, SEGMENTS, requires_grad=True)
    width = p_in.shape[1] // SEGMENTS
    pe = p * m[:, None] * g.repeat_interleave(width, dim=1) * go.repeat((1, width))
    logits = fwd(model, pe, kvv, kvv, ids)
    logits = logits.logits if hasattr(logits, "logits") else logits
    loss = lm_loss(logits, ids, N_P)
    loss.backward()
    return loss.detach(), p.grad, kvv.grad, m.grad, g.grad, go.grad


def peft_prefix(fresh, kv, ids, p_in=None):
    """PEFT PrefixTuning on the same model with the same slots, optionally with input prompts."""
    cfg = fresh.config
    pc = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=kv.shape[1], inference_mode=True)
    pm = get_peft_model(fresh, pc).eval()
    # PEFT's rows: (n_kv, layers * 2 * kv_heads * head_dim), per row layer 0 key, layer 0 value, layer 1 key, ...
    layers, n, kvh, hd = kv.shape
    row = torch.stack([kv, kv], dim=1)  # (layers, 2, n, kvh, hd)
    w = row.permute(2, 0, 1, 3, 4).reshape(n, layers * 2 * kvh * hd)
    enc = pm.prompt_encoder[pm.active_adapter]
    assert enc.embedding.weight.shape == w.shape, (enc.embedding.weight.shape, w.shape)
    with torch.no_grad():
        enc.embedding.weight.copy_(w)
    b = ids.shape[0]
    if p_in is None:
        out = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    else:
        x = inputs_embeds(fresh, p_in, ids)
        out = pm(inputs_embeds=x, attention_mask=torch.ones(b, x.shape[1], dtype=torch.long)).logits
    return out, w


def maxdiff(a, b):
    return (a - b).abs().max().item()


def main():
    model = load("eager")
    ids = torch.tensor(IDS, dtype=torch.int64)
    torch.manual_seed(0)
    p_in = torch.randn(N_P, model.config.hidden_size) * STD
    kv = torch.randn(model.config.num_hidden_layers, N_KV, model.config.num_key_value_heads,
                     model.config.head_dim) * STD
    torch.manual_seed(1)
    k_sep = torch.randn_like(kv) * STD
    torch.manual_seed(2)
    v_sep = torch.randn_like(kv) * STD
    checks = {}

    with torch.no_grad():
        base = model(input_ids=ids).logits
        logits = forward_cache(model, p_in, kv, kv, ids).logits
        sep = forward_cache(model, p_in, k_sep, v_sep, ids).logits
        # 1. the literal prefix attention
        checks["cache_vs_literal_shared"] = maxdiff(logits, forward_literal(model, p_in, kv, kv, ids))
        checks["cache_vs_literal_sep"] = maxdiff(sep, forward_literal(model, p_in, k_sep, v_sep, ids))
        # 2. n_kv = 0 against no cache (and the literal path)
        empty = kv[:, :0]
        plain = model(inputs_embeds=inputs_embeds(model, p_in, ids), use_cache=False).logits
        checks["nkv0_cache_vs_no_cache"] = maxdiff(forward_cache(model, p_in, empty, empty, ids).logits, plain)
        checks["nkv0_literal_vs_no_cache"] = maxdiff(forward_literal(model, p_in, empty, empty, ids), plain)
        checks["no_prompts_no_slots_vs_base"] = maxdiff(
            forward_cache(model, p_in[:0], empty, empty, ids).logits[:, :], base)
        # 3. shared K = V against the separate path with two equal copies
        checks["shared_vs_two_copies"] = maxdiff(logits, forward_cache(model, p_in, kv.clone(), kv.clone(), ids).logits)
        # 4. eager against sdpa
        sdpa = load("sdpa")
        checks["eager_vs_sdpa"] = maxdiff(logits, forward_cache(sdpa, p_in, kv, kv, ids).logits)
        # 5. PEFT prefix tuning (fresh model copies: get_peft_model wraps in place)
        peft_tokens, _ = peft_prefix(load("eager"), kv, ids)
        checks["peft_prefix_vs_cache_no_prompts"] = maxdiff(
            peft_tokens, forward_cache(model, p_in[:0], kv, kv, ids).logits)
        peft_prompts, _ = peft_prefix(load("eager"), kv, ids, p_in)
        checks["peft_prefix_vs_cache_with_prompts"] = maxdiff(peft_prompts, logits)
        # the HF labels loss
        labels = torch.cat([torch.full((2, N_P), -100, dtype=torch.int64), ids], dim=1)
        hf_loss = forward_cache(model, p_in, kv, kv, ids, labels=labels).loss
        loss_plain = lm_loss(logits, ids, N_P)
        checks["hf_labels_loss_vs_loss"] = abs(hf_loss.item() - loss_plain.item())

    loss, g_p, g_kv, g_m, g_seg, g_seg_off = grads(forward_cache, model, p_in, kv, ids)
    l2, g_p2, g_kv2, g_m2, g_seg2, g_seg_off2 = grads(forward_literal, model, p_in, kv, ids)
    checks["loss_vs_no_grad_loss"] = abs(loss.item() - loss_plain.item())
    checks["literal_vs_cache_loss"] = abs(loss.item() - l2.item())
    checks["literal_vs_cache_grad_P_in"] = maxdiff(g_p, g_p2)
    checks["literal_vs_cache_grad_KV"] = maxdiff(g_kv, g_kv2)
    checks["literal_vs_cache_gate_grad"] = maxdiff(g_m, g_m2)
    checks["literal_vs_cache_seg_grad"] = maxdiff(g_seg, g_seg2)
    checks["gate_grad_vs_P_in_dot_grad"] = maxdiff(g_m, (p_in * g_p).sum(1))
    w = p_in.shape[1] // SEGMENTS
    checks["seg_grad_vs_P_in_grad_contiguous"] = maxdiff(g_seg, (p_in * g_p).view(N_P, SEGMENTS, w).sum(2))
    checks["seg_grad_official_vs_P_in_grad_interleaved"] = maxdiff(
        g_seg_off, (p_in * g_p).view(N_P, w, SEGMENTS).sum(1))
    checks["seg_grad_rows_sum_to_gate_grad"] = maxdiff(g_seg.sum(1), g_m)

    effects = {
        "max|logits - base| on tokens": maxdiff(logits[:, N_P:], base),
        "max|logits - (prompts only, no slots)|": maxdiff(
            logits, model(inputs_embeds=inputs_embeds(model, p_in, ids), use_cache=False).logits.detach()),
        "max|sep.logits - logits|": maxdiff(sep, logits),
    }
    with torch.no_grad():  # what the position conventions change (so the checks above can see them)
        x = inputs_embeds(model, p_in, ids)
        cache = DynamicCache(ddp_cache_data=[(slot_states(kv[l], 2), slot_states(kv[l], 2)) for l in range(2)],
                             config=model.config)
        from0 = model(inputs_embeds=x, cache=cache, position_ids=torch.arange(x.shape[1]).unsqueeze(0).expand(2, -1),
                      attention_mask=torch.ones(2, N_KV + x.shape[1], dtype=torch.long)).logits
        effects["max|logits - (real positions from 0)|"] = maxdiff(from0, logits)
        cos, sin = model.model.rotary_emb(x, torch.arange(N_KV).unsqueeze(0))
        rot = torch.stack([apply_rotary_pos_emb(slot_states(kv[l], 1), slot_states(kv[l], 1), cos, sin)[1][0]
                           .transpose(0, 1) for l in range(kv.shape[0])])
        effects["max|logits - (slot keys rotated at 0..n_kv-1)|"] = maxdiff(
            forward_cache(model, p_in, rot, kv, ids).logits, logits)

    tensors = {
        "ids": ids, "P_in": p_in, "KV": kv, "logits": logits, "K": k_sep, "V": v_sep, "sep.logits": sep,
        "loss": loss.reshape(1), "grad_P_in": g_p, "grad_KV": g_kv, "gate_grad": g_m, "seg_grad": g_seg,
        "seg_grad_official": g_seg_off, "base.logits": base,
    }
    for k in tensors:
        tensors[k] = tensors[k].detach().contiguous()
        if tensors[k].is_floating_point():
            tensors[k] = tensors[k].float()
    save_file(tensors, os.path.join(ROOT, "kv_prompt.safetensors"))

    meta = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "safetensors": safetensors.__version__},
        "model": "tests/fixtures/golden/llama, LlamaForCausalLM.from_pretrained, eval(), float32, "
                 "attn_implementation eager (sdpa checked equal)",
        "inputs": {
            "ids": IDS, "n_p": N_P, "n_kv": N_KV,
            "init": "torch.manual_seed(0); P_in = randn(3, 32) * 0.5; KV = randn(2, 4, 2, 8) * 0.5 (same stream); "
                    "torch.manual_seed(1); K = randn(2, 4, 2, 8) * 0.5; torch.manual_seed(2); V = randn(2, 4, 2, 8) * 0.5",
        },
        "conventions": {
            "sequence": "inputs_embeds = cat(P_in broadcast to every row, embed_tokens(ids)), length n_p + T = 9; "
                        "logits (2, 9, 96) at every position, prompts included",
            "KV_layout": "KV[l, j, h, :] = slot j of kv head h in layer l (layers, n_kv, kv_heads, head_dim); the cache "
                         "gets KV[l].transpose(0, 1) as (batch, kv_heads, n_kv, head_dim); query head q uses kv head "
                         "q // (heads / kv_heads) (HF repeat_kv). Shared: the same tensor for keys and values; sep: K "
                         "for keys, V for values. In PEFT's prefix row layout (n_kv, layers*2*kv_heads*head_dim) a "
                         "row is layer 0 key, layer 0 value, layer 1 key, layer 1 value, each kv_heads*head_dim",
            "positions": "slot keys unrotated (no RoPE); the prompts and tokens take RoPE positions n_kv + arange(n_p + T) "
                         "= 4 .. 12; position_ids passed explicitly",
            "attention": "every position attends to all n_kv slots, and causally to the prompts and tokens up to itself; "
                         "attention_mask = ones(batch, n_kv + n_p + T)",
            "cache_api": "transformers 5.24: DynamicCache(ddp_cache_data=[(K_l, V_l) per layer], config=model.config) "
                         "(each layer's DynamicLayer.update(K_l, V_l) = cat onto an empty tensor, differentiable), passed "
                         "as model(inputs_embeds=..., cache=cache, position_ids=..., attention_mask=..., use_cache=True) "
                         "(`past_key_values` is the deprecated alias until 5.40); a fresh cache per forward",
            "loss": "mean over b in 0..1 and t in 0..5 (12 terms) of CE(logits[b, n_p - 1 + t], ids[b, t]): the last "
                    "prompt predicts the first token, token t-1 predicts token t; the last position and the prompt "
                    "positions 0..n_p-2 carry no loss. = HF loss with labels = cat(full(-100, n_p), ids) (PEFT "
                    "prompt-learning labels)",
            "gradients": "of that loss, shared case; grad_P_in (3,32), grad_KV (2,4,2,8)",
            "gate_grad": "dL/dm_i at m = ones(3) for P_in * m[:, None]; equals (P_in[i] * grad_P_in[i]).sum(); signed",
            "seg_grad": "dL/dg_is at g = ones(3, 4) for P_in * g.repeat_interleave(8, 1): contiguous segments, "
                        "feature d in segment d // 8; signed; rows sum to gate_grad",
            "seg_grad_official": "the same for the official layout P_in * g.repeat((1, 8)) (vit_prompt_VK.py l. 139): "
                                 "feature d in piece d % 4",
            "base.logits": "model(input_ids=ids).logits, no prompts, no slots",
        },
        "official": {
            "source": "ChengHan111/E2VPT @ 7a66e75eef6b7e15df83463d31b60eba5938d208",
            "kv_prompts": "src/models/vit_backbones/vit_changeVK.py Attention: deep_QKV_embeddings (num_heads, NUM_TOKENS, "
                          "head_dim) per layer (l. 157-173; separate _K/_V when SHARE_PARAM_KV False, l. 131-155); "
                          "forward l. 294-309: after the q/k/v projections and head split (l. 237-243), "
                          "QKV_dropout(QKV_proj(P)) with QKV_proj = Identity (l. 225), expanded over the batch, cat on "
                          "dim 2 (sequence) in front of keys and values when LAYER_BEHIND (l. 301-302, 308-309), behind "
                          "otherwise; queries untouched; no positions (ViT: position embeddings are added to the inputs)",
            "defaults": "src/configs/config.py l. 183-216: NUM_TOKENS 5, DEEP True, DROPOUT 0.0, LAYER_BEHIND True, "
                        "SHARE_PARAM_KV True, ORIGIN_INIT 2 (kaiming_uniform_), SHARED_ACCROSS False, QUERY_PROMPT_MODE 0, "
                        "NUM_TOKENS_P 5, DEEP_P True, CLS_TOKEN_P_PIECES_NUM 16, MASK_RESERVE False, MIN_NUMBER_CLS_TOKEN 1, "
                        "MIN_NUMBER_CLS_TOKEN_PIECE 4",
            "visual_prompts": "src/models/vit_prompt/vit_prompt_VK.py incorporate_prompt l. 127-155: after [CLS], before "
                              "the patches; DEEP_P: layer i >= 1 replaces the prompt slots by deep_prompt_embeddings[i-1] "
                              "(l. 170-209)",
            "masks": "vit_prompt_VK.py l. 44-51 (ones, requires_grad=True, trained in stage 1: vit_models.py l. 147-154 "
                     "keeps every parameter named *prompt* or *QKV*), applied l. 137-143 and to deep prompts l. 187-193; "
                     "pieces: mask.repeat((1, hidden/16)), feature d -> piece d % 16",
            "importance": "src/engine/trainer.py calculate_importance l. 359-434: trained checkpoint, eval(), per training "
                          "batch forward_one_batch(is_train=True) = zero_grad + backward + optimizer.step() (l. 130-133); "
                          "score += mask.grad (signed, no abs), / number of batches; optional per-token L2 normalisation",
            "selection": "ascending signed score, lowest first (l. 535-555 tokens; l. 500-532 pieces, the same count for "
                         "every token); counts int(n*p/100), p = 10..90, capped at n - MIN_NUMBER (l. 436-475)",
            "rewinding": "tune_vtab_PruningRewind_CVK.py rewind_train l. 432-484 / main l. 555-625: new model with fresh "
                         "random prompts and key-value prompts (no seed set), the chosen mask entries set to 0 and the "
                         "masks frozen (vit_prompt_VK.py l. 53-67, 223-236), the full schedule trained again per (tokens, "
                         "pieces) pair; best pair on val (find_best_MtMtp l. 84-125), then 5 seeds. Masked tokens stay "
                         "in the sequence as zero vectors; key-value prompts are not pruned",
        },
        "checks_max_abs_diff": checks,
        "max_abs": {k: tensors[k].abs().max().item() for k in
                    ("grad_P_in", "grad_KV", "gate_grad", "seg_grad", "seg_grad_official")},
        "min_abs": {k: tensors[k].abs().min().item() for k in ("gate_grad", "seg_grad", "seg_grad_official")},
        "effects": effects,
    }
    with open(os.path.join(ROOT, "kv_prompt.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    for k, v in tensors.items():
        print(f"{k:20s} {tuple(v.shape)} {v.dtype}")
    print(f"loss {loss.item():.6f}")
    print("gate_grad", g_m.tolist())
    for k, v in checks.items():
        print(f"check {k:45s} {v:.3e}")
    for k, v in effects.items():
        print(f"effect {k:45s} {v:.4f}")
    tol = {"shared_vs_two_copies": 0.0}
    for k, v in checks.items():
        assert v <= tol.get(k, 1e-5), (k, v)
    for k, v in effects.items():
        assert v > 1e-3, k


if __name__ == "__main__":
    main()
