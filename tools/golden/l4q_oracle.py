#!/usr/bin/env python3
"""L4Q's quantized layer (Jeon et al., arXiv 2402.04902) as petal defines it, written here in
PyTorch apart from petal's Rust, with autograd for the backward pass.

W0 (out, in), LoRA A (r, in), B (out, r), scale s; input columns cut into groups of G per row.
Per (row, group), with L = 2^bits - 1:
    beta0 = min over the group, gamma0 = max((max - min) / L, 1e-6), both rounded to f16 and back;
    gamma = r16(gamma0 * exp(theta)), beta = r16(beta0 + gamma0 * phi), where r16 rounds to f16
        and back with a straight-through gradient: t + (r16(t) - t).detach();
    v = W0 + s * B @ A viewed as (out, in/G, G);  u = clamp((v - beta) / gamma, 0, L);
    q = u + (round(u) - u).detach() (half to even);  W_hat = q * gamma + beta;  delta = W_hat - W0.
Loss = sum(delta * gout); autograd (float32) gives d/dA, d/dB, d/dtheta, d/dphi.

Writes tests/fixtures/golden/l4q.safetensors: for each case c in (b4, b3, b2) the tensors
c.w0, c.a, c.b, c.theta, c.phi, c.gout, c.delta, c.d_a, c.d_b, c.d_theta, c.d_phi and
c.params = [s, G, bits], all float32; metadata {"torch": version}. Prints each case's fraction
of clipped values ((v - beta) / gamma outside [0, L] before the clamp).

Run with the pinned venv (tools/golden/requirements.txt, torch 2.15.0, safetensors 0.8.0):
    python tools/golden/l4q_oracle.py
"""
import math
import os

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
# name: (out, in, r, G, bits, s, seed, theta constant or None for 0.1 * N(0, 1))
CASES = {
    "b4": (6, 64, 3, 32, 4, 2.0, 4021, None),
    "b3": (5, 48, 2, 16, 3, 0.5, 4022, None),
    "b2": (4, 64, 2, 32, 2, 1.0, 4023, math.log(0.6)),
}


def r16(t):
    """Round to float16 and back, gradient passed straight through."""
    return t + (t.half().float() - t).detach()


def init_grid(w0, g, levels):
    """Min-max init per (row, group): (gamma0, beta0), each (out, in/G), f16-rounded."""
    grp = w0.reshape(w0.shape[0], -1, g)
    lo, hi = grp.amin(dim=2), grp.amax(dim=2)
    gamma0 = torch.clamp((hi - lo) / levels, min=1e-6)
    return gamma0.half().float(), lo.half().float()


def forward(w0, a, b, theta, phi, s, g, bits):
    levels = float(2 ** bits - 1)
    gamma0, beta0 = init_grid(w0, g, levels)
    gamma = r16(gamma0 * torch.exp(theta)).unsqueeze(2)
    beta = r16(beta0 + gamma0 * phi).unsqueeze(2)
    v = (w0 + s * (b @ a)).reshape(w0.shape[0], -1, g)
    raw = (v - beta) / gamma
    clipped = ((raw < 0) | (raw > levels)).sum().item() / raw.numel()
    u = torch.clamp(raw, 0.0, levels)
    q = u + (torch.round(u) - u).detach()
    w_hat = (q * gamma + beta).reshape(w0.shape)
    return w_hat - w0, clipped


def main():
    out = {}
    for name, (d_out, d_in, r, g, bits, s, seed, theta_c) in CASES.items():
        assert d_in % g == 0
        gen = torch.Generator().manual_seed(seed)
        n = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float32)
        w0 = 0.05 * n(d_out, d_in)
        a = (0.1 * n(r, d_in)).requires_grad_()
        b = (0.1 * n(d_out, r)).requires_grad_()
        if theta_c is None:
            theta = 0.1 * n(d_out, d_in // g)
        else:
            theta = torch.full((d_out, d_in // g), theta_c, dtype=torch.float32)
        theta.requires_grad_()
        phi = (0.3 * n(d_out, d_in // g)).requires_grad_()
        gout = n(d_out, d_in)
        delta, clipped = forward(w0, a, b, theta, phi, s, g, bits)
        (delta * gout).sum().backward()
        print(f"{name}: clipped {clipped:.1%} of {d_out * d_in} values")
        tensors = {"w0": w0, "a": a, "b": b, "theta": theta, "phi": phi, "gout": gout,
                   "delta": delta, "d_a": a.grad, "d_b": b.grad,
                   "d_theta": theta.grad, "d_phi": phi.grad,
                   "params": torch.tensor([s, float(g), float(bits)])}
        for key, t in tensors.items():
            out[f"{name}.{key}"] = t.detach().to(torch.float32).contiguous()
    save_file(out, os.path.join(ROOT, "l4q.safetensors"), metadata={"torch": torch.__version__})


if __name__ == "__main__":
    main()
