#!/usr/bin/env python3
"""Goldens for petal's GPTQ solver (`petal_ops::quant::gptq`): the official algorithm, transcribed.

`fasterquant` of IST-DASLab/gptq (gptq.py, with quant.py's `Quantizer` for 4 bits, asymmetric,
per channel), written here in torch from that code: dead inputs (zero Hessian diagonal) get H_ii = 1
and zero weights; with `actorder` the columns are visited by decreasing diag(H); H is dampened by
`percdamp` times its mean diagonal; `Hinv = cholesky(cholesky_inverse(cholesky(H)), upper=True)`;
columns are quantized in blocks with lazy updates, a group's grid (`find_params` on the weights of
its columns as updated so far) found at its first column; the codes are put back in the columns'
own order and `g_idx[perm[k]] = k // groupsize`. The block size equals the group size here (the
official default is 128 = the usual group size; with smaller groups inside a block of 128 the
official code finds the second group's grid on weights without the block's own updates, which
petal does not copy).

Everything in float64 (the official code runs in float32 on a GPU), so petal's f64 solver is held
to exact codes.

    /root/pyref/bin/python tools/golden/make_gptq_solver.py

Writes tests/fixtures/golden/gptq_solver.safetensors: `w` (24, 256) f32, `h` (256, 256) f64 (2/n X^T X
of correlated inputs with one dead column), and per case `{case}.codes` (u8, (24, 256)),
`{case}.scales` (f32), `{case}.zeros` (u8), `{case}.g_idx` (i64) for the cases g64, g64_act, g128.
Versions: tools/golden/requirements.txt (torch 2.15.0, safetensors 0.8.0).
"""
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[2] / "tests/fixtures/golden/gptq_solver.safetensors"
MAXQ = 15


def find_params(x):
    """quant.py's Quantizer.find_params(x, weight=True), per channel, asymmetric: (scale, zero), (rows,)."""
    xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0], dtype=x.dtype))
    xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0], dtype=x.dtype))
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp], xmax[tmp] = -1, +1
    scale = (xmax - xmin) / MAXQ
    zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(x, scale, zero):
    q = torch.clamp(torch.round(x / scale) + zero, 0, MAXQ)
    return scale * (q - zero), q


def fasterquant(W, H, groupsize, actorder, percdamp=0.01):
    W = W.clone().double()
    H = H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scales, zeros = [], []
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    blocksize = groupsize
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if (i1 + i) % groupsize == 0:
                scale, zero = find_params(W[:, (i1 + i):(i1 + i + groupsize)])
                scales.append(scale)
                zeros.append(zero)
            q, c = quantize(w, scale, zero)
            Q1[:, i] = q
            C1[:, i] = c
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    g_idx = torch.arange(columns) // groupsize
    if actorder:
        invperm = torch.argsort(perm)
        Q, codes, g_idx = Q[:, invperm], codes[:, invperm], g_idx[invperm]
    return codes.to(torch.uint8), torch.stack(scales, 1).float(), torch.stack(zeros, 1).to(torch.uint8), g_idx


def main():
    torch.manual_seed(11)
    rows, cols, n = 24, 256, 600
    w = torch.randn(rows, cols) * 0.05
    mix = torch.randn(cols, cols) / cols**0.5 + torch.eye(cols)
    x = (torch.randn(n, cols) @ mix).double()
    x[:, 7] = 0  # a dead input
    x[:, 40:48] *= 4  # some inputs larger, so act-order reorders
    h = 2 / n * x.t() @ x
    out = {"w": w.float(), "h": h}
    for case, group, act in (("g64", 64, False), ("g64_act", 64, True), ("g128", 128, False)):
        codes, scales, zeros, g_idx = fasterquant(w, h, group, act)
        out.update({f"{case}.codes": codes, f"{case}.scales": scales, f"{case}.zeros": zeros,
                    f"{case}.g_idx": g_idx.to(torch.int64)})
        q = scales.double()[:, g_idx] * (codes.double() - zeros.double()[:, g_idx])
        err = ((q - w.double()) @ x.t()).pow(2).sum().item()
        print(f"{case}: output error {err:.4f}")
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT),
              metadata={k: version(k) for k in ("torch", "safetensors")})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
