#!/usr/bin/env python3
"""L4Q's quantized layer (Jeon et al., arXiv 2402.04902) and LR-QAT's (Bondarenko et al., arXiv
2406.06385) as petal defines them, written here in PyTorch apart from petal's Rust, with autograd
for the backward pass.

W0 (out, in), LoRA A (r, in), B (out, r), scale s; input columns cut into groups of G per row.
Both methods share the grid. Per (row, group), with L = 2^bits - 1:
    beta0 = min over the group, gamma0 = max((max - min) / L, 1e-6), both rounded to f16 and back;
    gamma = r16(gamma0 * exp(theta)), beta = r16(beta0 + gamma0 * phi), where r16 rounds to f16
        and back with a straight-through gradient: t + (r16(t) - t).detach().

L4Q (cases b4, b3, b2): the low-rank term is added in weight space before quantizing:
    v = W0 + s * B @ A viewed as (out, in/G, G);  u = clamp((v - beta) / gamma, 0, L);
    q = u + (round(u) - u).detach() (half to even);  W_hat = q * gamma + beta;  delta = W_hat - W0.
Loss = sum(delta * gout).

LR-QAT (cases q4, q3): the low-rank term is added in the grid's integer domain to W0's codes,
which are stored as 8-bit fixed point with f = 8 - bits fractional bits:
    c = clamp((W0 - beta0) / gamma0, 0, L) (no gradient);  codes8 = round(c * 2^f) (0..255, uint8);
    phi_W = codes8 / 2^f;  u = phi_W + s * B @ A viewed as (out, in/G, G) (no division by gamma);
    q = clamp(u, 0, L);  q = q + (round(q) - q).detach() (half to even);
    W_hat = q * gamma + beta reshaped to (out, in).
Loss = sum(W_hat * gout).

Autograd (float32) gives d/dA, d/dB, d/dtheta, d/dphi (theta and phi are leaf tensors).

Writes tests/fixtures/golden/l4q.safetensors, all float32, metadata {"torch": version}:
for each L4Q case c in (b4, b3, b2) the tensors c.w0, c.a, c.b, c.theta, c.phi, c.gout, c.delta,
c.d_a, c.d_b, c.d_theta, c.d_phi and c.params = [s, G, bits]; for each LR-QAT case c in (q4, q3)
the same but c.what (W_hat itself, not W_hat - W0) in place of c.delta, plus c.codes8 (the
integer codes, held as float32). Prints each case's fraction of clipped values (L4Q:
(v - beta) / gamma, LR-QAT: u, outside [0, L] before the clamp).

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
# LR-QAT cases, same fields; B ~ 3 N(0, 1), A ~ N(0, 1) since B @ A is in grid units.
LRQAT_CASES = {
    "q4": (6, 64, 3, 32, 4, 2.0, 4031, None),
    "q3": (5, 48, 2, 16, 3, 0.5, 4032, None),
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


def forward_lrqat(w0, a, b, theta, phi, s, g, bits):
    """LR-QAT: (W_hat, codes8, clipped fraction)."""
    levels = float(2 ** bits - 1)
    frac = 2.0 ** (8 - bits)
    gamma0, beta0 = init_grid(w0, g, levels)
    gamma = r16(gamma0 * torch.exp(theta)).unsqueeze(2)
    beta = r16(beta0 + gamma0 * phi).unsqueeze(2)
    grp = w0.reshape(w0.shape[0], -1, g)
    with torch.no_grad():
        c = torch.clamp((grp - beta0.unsqueeze(2)) / gamma0.unsqueeze(2), 0.0, levels)
        codes8 = torch.round(c * frac)
        assert codes8.min() >= 0 and codes8.max() <= 255
    phi_w = codes8 / frac
    u = phi_w + (s * (b @ a)).reshape(w0.shape[0], -1, g)
    clipped = ((u < 0) | (u > levels)).sum().item() / u.numel()
    q = torch.clamp(u, 0.0, levels)
    q = q + (torch.round(q) - q).detach()
    w_hat = (q * gamma + beta).reshape(w0.shape)
    return w_hat, codes8.reshape(w0.shape), clipped


def draw(d_out, d_in, r, g, seed, theta_c, a_scale, b_scale):
    """A case's inputs, drawn in a fixed order from one seeded generator: W0, A, B, theta
    (unless constant), phi, gout."""
    gen = torch.Generator().manual_seed(seed)
    n = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float32)
    w0 = 0.05 * n(d_out, d_in)
    a = (a_scale * n(r, d_in)).requires_grad_()
    b = (b_scale * n(d_out, r)).requires_grad_()
    if theta_c is None:
        theta = 0.1 * n(d_out, d_in // g)
    else:
        theta = torch.full((d_out, d_in // g), theta_c, dtype=torch.float32)
    theta.requires_grad_()
    phi = (0.3 * n(d_out, d_in // g)).requires_grad_()
    gout = n(d_out, d_in)
    return w0, a, b, theta, phi, gout


def main():
    out = {}
    # L4Q: A, B ~ 0.1 N; LR-QAT: the low-rank term counts grid steps, A ~ N, B ~ 3 N
    for cases, lr_qat in ((CASES, False), (LRQAT_CASES, True)):
        for name, (d_out, d_in, r, g, bits, s, seed, theta_c) in cases.items():
            assert d_in % g == 0
            scales = (1.0, 3.0) if lr_qat else (0.1, 0.1)
            w0, a, b, theta, phi, gout = draw(d_out, d_in, r, g, seed, theta_c, *scales)
            if lr_qat:
                result, codes8, clipped = forward_lrqat(w0, a, b, theta, phi, s, g, bits)
                own = {"what": result, "codes8": codes8}
            else:
                result, clipped = forward(w0, a, b, theta, phi, s, g, bits)
                own = {"delta": result}
            (result * gout).sum().backward()
            kind = " (LR-QAT)" if lr_qat else ""
            print(f"{name}: clipped {clipped:.1%} of {d_out * d_in} values{kind}")
            tensors = {"w0": w0, "a": a, "b": b, "theta": theta, "phi": phi, "gout": gout,
                       **own, "d_a": a.grad, "d_b": b.grad,
                       "d_theta": theta.grad, "d_phi": phi.grad,
                       "params": torch.tensor([s, float(g), float(bits)])}
            for key, t in tensors.items():
                out[f"{name}.{key}"] = t.detach().to(torch.float32).contiguous()
    save_file(out, os.path.join(ROOT, "l4q.safetensors"), metadata={"torch": torch.__version__})


if __name__ == "__main__":
    main()
