#!/usr/bin/env python3
"""Shared pieces of the paper-claim reports: the CPU line, a results file read back, and two
SVG plots (held-out loss per run as bars; training-loss curves). Standard library only."""
import json
import platform
import subprocess


def cpu():
    """'<model name> (<n> cores; avx512f, avx512_bf16, ...)' of this machine."""
    try:
        name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
        feats = ", ".join(f for f in ["avx512f", "avx512_bf16", "avx2", "fma"] if f in flags)
    except (OSError, StopIteration):
        name, feats = platform.processor(), "?"
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{name} ({cores} cores; {feats})"


def runs(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def smooth(xs, k=10):
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def curves_svg(series, title, w=600, h=320):
    """series: [(label, colour, losses)]; the training loss per step, a 10-step running mean."""
    L, B, T = 60, 40, 24
    pts = {lab: smooth(ls) for lab, _, ls in series}
    lo = min(min(v) for v in pts.values()) - 0.05
    hi = max(max(v) for v in pts.values()) + 0.05
    n = max(len(v) for v in pts.values())
    x = lambda i: L + i / max(1, n - 1) * (w - L - 140)
    y = lambda v: h - B - (v - lo) / (hi - lo) * (h - B - T)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="{w/2}" y="14" text-anchor="middle">{title}</text>',
           f'<line x1="{L}" y1="{h-B}" x2="{w-140}" y2="{h-B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{h-B}" stroke="black"/>',
           f'<text x="{(L+w-140)/2}" y="{h-8}" text-anchor="middle">step</text>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        out.append(f'<text x="{L-6}" y="{y(v)+4:.1f}" text-anchor="end">{v:.2f}</text>')
    for j, (lab, col, _) in enumerate(series):
        p = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(pts[lab]))
        out.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.5" points="{p}"/>')
        out.append(f'<text x="{w-134}" y="{T+16*j+10}" fill="{col}">{lab}</text>')
    out.append("</svg>")
    return "\n".join(out)
