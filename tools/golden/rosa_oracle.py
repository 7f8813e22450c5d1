#!/usr/bin/env python3
"""RoSA's layer and mask, transcribed from the paper (Nikdan et al., ICML 2024, arXiv 2401.04679,
Sec. 3) and the official README (IST-DASLab/peft-rosa), written apart from petal's Rust. The
official layer needs CUDA sparse kernels (spops), so it does not run here.

y = x W^T + b + s B A x + x S^T (S not scaled); the mask: the mean over the collection batches of
the squared full-weight gradient G = dL/dW (here with W itself a torch parameter, as autograd
gives it), its top k = int(d out in) entries; S's values gradient = dL/dW restricted to the mask.

Writes tests/fixtures/golden/rosa.safetensors. Run with the pinned venv
(tools/golden/requirements.txt): python tools/golden/rosa_oracle.py
"""
import os

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
OUT, IN, R, ALPHA, D = 6, 8, 2, 3.0, 0.25


def main():
    g = torch.Generator().manual_seed(20240107)
    rnd = lambda *s: torch.randn(*s, generator=g)
    w, b, a, bb = rnd(OUT, IN), rnd(OUT), rnd(R, IN), rnd(OUT, R)
    s = ALPHA / R
    k = int(D * OUT * IN)
    acc = torch.zeros(OUT, IN)
    xs, ps = [rnd(2, 3, IN) for _ in range(2)], [rnd(2, 3, OUT) for _ in range(2)]
    for x, p in zip(xs, ps):  # the collection steps: LoRA trains, S does not exist yet
        wv = w.clone().requires_grad_(True)
        y = x @ wv.T + b + s * (x @ a.T) @ bb.T
        (y * p).sum().backward()
        acc += wv.grad ** 2
    acc /= len(xs)
    mask = torch.topk(acc.flatten(), k).indices.sort().values
    values = rnd(k)
    x3, p3 = rnd(2, 3, IN).requires_grad_(True), rnd(2, 3, OUT)
    sv = values.clone().requires_grad_(True)
    dense = torch.zeros(OUT * IN).index_put((mask,), sv).reshape(OUT, IN)
    y3 = x3 @ w.T + b + s * (x3 @ a.T) @ bb.T + x3 @ dense.T
    (y3 * p3).sum().backward()
    out = {"w": w, "b": b, "a": a, "bb": bb, "x1": xs[0], "p1": ps[0], "x2": xs[1], "p2": ps[1],
           "mask": mask.to(torch.int64), "values": values, "x3": x3.detach(), "p3": p3, "y3": y3.detach(),
           "dx3": x3.grad, "dvalues": sv.grad, "merged": w + s * bb @ a + dense.detach()}
    path = os.path.join(ROOT, "rosa.safetensors")
    save_file({kk: v.contiguous() for kk, v in out.items()}, path)
    print("wrote", path, "k", k, "mask", mask.tolist())


if __name__ == "__main__":
    main()
