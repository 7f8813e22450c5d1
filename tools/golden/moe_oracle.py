#!/usr/bin/env python3
"""The mixtures of experts, written apart from petal's Rust: MoV and MoLoRA transcribed from the
official layers (for-ai/parameter-efficient-moe, src/mov.py, src/molora.py, src/routing.py: a
router without bias, softmax over the experts in float32, the experts' einsums), SiRA from its
paper (Zhu et al., arXiv 2311.09179) with petal's decisions for what the paper leaves open: the
top-k gates are the router's probabilities times the top-k mask (not renormalised); in training
each expert takes at most ceil(capacity_factor * k * T / E) tokens in batch order, the later ones
dropped for that expert; in evaluation no token is dropped.

Writes tests/fixtures/golden/moe.safetensors. Run with the pinned venv
(tools/golden/requirements.txt): python tools/golden/moe_oracle.py
"""
import math
import os

import numpy as np
from safetensors.numpy import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def router(x, kernel):
    """routing.py: logits = x . kernel (no bias), probabilities = softmax over the experts."""
    return softmax(np.einsum("...d,de->...e", x, kernel))


def molora(x, a, b, kernel, alpha, gates=None):
    """molora.py: ax = x A_e, bax = ax B_e per expert, mixed by the router, times alpha / rank."""
    rank = a.shape[-1]
    ax = np.einsum("bsd,edr->bser", x, a)
    bax = np.einsum("bser,erd->bsed", ax, b)
    p = router(x, kernel) if gates is None else gates
    return np.einsum("...e,...ed->...d", p, bax) * (alpha / rank)


def top_k_capacity(p, k, factor):
    """SiRA's routing, petal's decisions: top k per token, capacity in batch order."""
    rows = p.reshape(-1, p.shape[-1])
    t, e = rows.shape
    cap = max(1, math.ceil(factor * k * t / e))
    mask = np.zeros_like(rows)
    taken = [0] * e
    dropped = 0
    for i in range(t):
        for j in np.argsort(-rows[i], kind="stable")[:k]:
            if taken[j] < cap:
                taken[j] += 1
                mask[i, j] = 1.0
            else:
                dropped += 1
    return mask.reshape(p.shape), dropped / (t * k)


def mov(x, scaling, kernel):
    """mov.py: x * (router(x) . S)."""
    return x * np.einsum("...e,...ed->...d", router(x, kernel), scaling)


def main():
    rng = np.random.default_rng(20230906)
    f = lambda *s, std=1.0: std * rng.standard_normal(s)
    out = {}
    # MoLoRA: E 3, in 10, out 12, rank 3, alpha 16; B non-zero so the experts act
    x, base = f(2, 4, 10), f(2, 4, 12)
    a, b, k = f(3, 10, 3, std=0.3), f(3, 3, 12, std=0.3), f(10, 3, std=0.5)
    out.update({"molora.x": x, "molora.base": base, "molora.A": a, "molora.B": b, "molora.router": k,
                "molora.y": base + molora(x, a, b, k, 16.0)})
    # SiRA: E 4, k 2, capacity factor 0.75 (8 tokens: 3 per expert, so some choices drop)
    x, base = f(2, 4, 10), f(2, 4, 12)
    a, b, k = f(4, 10, 3, std=0.3), f(4, 3, 12, std=0.3), f(10, 4, std=0.8)
    mask, dropped = top_k_capacity(router(x, k), 2, 0.75)
    assert dropped > 0
    y = base + molora(x, a, b, k, 16.0, gates=router(x, k) * mask)
    mask_eval, _ = top_k_capacity(router(x, k), 2, 1e9)
    y_eval = base + molora(x, a, b, k, 16.0, gates=router(x, k) * mask_eval)
    out.update({"sira.x": x, "sira.base": base, "sira.A": a, "sira.B": b, "sira.router": k, "sira.y": y,
                "sira.y_eval": y_eval,
                "sira.dropped": np.array([dropped])})
    # MoV at a linear's output (h = out = 12) and at a linear's input (h = in = 12)
    w, bias, x = f(12, 10, std=0.3), f(12, std=0.1), f(2, 4, 10)
    s, k = 1 + f(3, 12, std=0.3), f(12, 3, std=0.5)
    out.update({"mov_out.w": w, "mov_out.b": bias, "mov_out.x": x, "mov_out.scaling": s, "mov_out.router": k,
                "mov_out.y": mov(x @ w.T + bias, s, k)})
    w, bias, x = f(6, 12, std=0.3), f(6, std=0.1), f(2, 4, 12)
    s, k = 1 + f(3, 12, std=0.3), f(12, 3, std=0.5)
    out.update({"mov_in.w": w, "mov_in.b": bias, "mov_in.x": x, "mov_in.scaling": s, "mov_in.router": k,
                "mov_in.y": mov(x, s, k) @ w.T + bias})
    save_file({n: np.ascontiguousarray(v, dtype=np.float32) for n, v in out.items()},
              os.path.join(ROOT, "moe.safetensors"))


if __name__ == "__main__":
    main()
