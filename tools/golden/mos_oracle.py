#!/usr/bin/env python3
"""MoS's assembly of LoRA factors from shard pools, transcribed from the paper (Wang et al., ICLR
2025, arXiv 2410.00938, Sec. 3: subset selection, pair dissociation, vector sharding, shard
privatisation) and the official README, written apart from petal's Rust: a row of A is the
concatenation of in/s shards of pool A picked by the layer's index, a column of B of out/s shards
of pool B; the first p rows / columns are the layer's private ones; dW = (alpha / r) B A. The
gradients of the pools (scatter-adds over the picked shards) come from torch's autograd.

Writes tests/fixtures/golden/mos.safetensors: one layer (out 6, in 8), r 4, p 1, s 2, pools of 9
and 7 shards. Run with the pinned venv: python tools/golden/mos_oracle.py
"""
import os

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
OUT, IN, R, P, S, ALPHA = 6, 8, 4, 1, 2, 6.0


def main():
    g = torch.Generator().manual_seed(2025)
    pool_a = torch.randn(9, S, generator=g).requires_grad_(True)
    pool_b = torch.randn(7, S, generator=g).requires_grad_(True)
    priv_a = torch.randn(P, IN, generator=g).requires_grad_(True)
    priv_b = torch.randn(OUT, P, generator=g).requires_grad_(True)
    idx_a = torch.randint(0, 9, (R - P, IN // S), generator=g)
    idx_b = torch.randint(0, 7, (R - P, OUT // S), generator=g)
    rows_a = torch.stack([torch.cat([pool_a[i] for i in row]) for row in idx_a])  # (R - P, IN)
    cols_b = torch.stack([torch.cat([pool_b[i] for i in row]) for row in idx_b], dim=1)  # (OUT, R - P)
    a = torch.cat([priv_a, rows_a], 0)
    b = torch.cat([priv_b, cols_b], 1)
    delta = ALPHA / R * b @ a
    proj = torch.randn(OUT, IN, generator=g)
    (delta * proj).sum().backward()
    out = {"pool_a": pool_a.detach(), "pool_b": pool_b.detach(), "priv_a": priv_a.detach(),
           "priv_b": priv_b.detach(), "idx_a": idx_a, "idx_b": idx_b, "delta": delta.detach(), "proj": proj,
           "dpool_a": pool_a.grad, "dpool_b": pool_b.grad, "dpriv_a": priv_a.grad, "dpriv_b": priv_b.grad}
    path = os.path.join(ROOT, "mos.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
