#!/usr/bin/env python3
"""Writes docs/papers/intrinsic.md (stdout) and the d90 plot from tools/papers/intrinsic.sh."""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import report  # noqa: E402

results, steps, seed, cs, lr_full, svg = sys.argv[1:7]
runs = {r["label"]: r for r in report.runs(results)}
full = runs.pop("full")
before = full["eval_before"]["loss"]
gain_full = before - full["eval_after"]["loss"]
# labels d<d>_lr<lr>: every run, then the best rate of each d
tried = sorted(((int(k[1:].split("_lr")[0]), k.split("_lr")[1], r) for k, r in runs.items()),
               key=lambda t: (t[0], float(t[1])))
best = {}
for d, lr, r in tried:
    if d not in best or r["eval_after"]["loss"] < best[d][1]["eval_after"]["loss"]:
        best[d] = (lr, r)
sweep = [(d, best[d][1]) for d in sorted(best)]
d90 = next((d for d, r in sweep if before - r["eval_after"]["loss"] >= 0.9 * gain_full), None)

# the plot: held-out loss against d (log scale), the full-tuning and 90% lines
W, H, L, B, T = 560, 320, 70, 44, 24
xs = [math.log10(d) for d, _ in sweep]
ys = [r["eval_after"]["loss"] for _, r in sweep]
lo = min(ys + [full["eval_after"]["loss"]]) - 0.05
hi = max(ys + [before]) + 0.05
x = lambda v: L + (v - min(xs)) / max(1e-9, max(xs) - min(xs)) * (W - L - 30)
y = lambda v: H - B - (v - lo) / (hi - lo) * (H - B - T)
s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
     f'<text x="{W/2}" y="14" text-anchor="middle">held-out loss after {steps} steps against d (q_proj, v_proj)</text>',
     f'<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="black"/>',
     f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
     f'<text x="{(L+W)/2}" y="{H-8}" text-anchor="middle">d (log scale)</text>']
for k in range(5):
    v = lo + (hi - lo) * k / 4
    s.append(f'<text x="{L-6}" y="{y(v)+4:.1f}" text-anchor="end">{v:.2f}</text>')
for d, _ in sweep:
    s.append(f'<text x="{x(math.log10(d)):.1f}" y="{H-B+16}" text-anchor="middle">{d}</text>')
for val, lab, col in [(before, "no tuning", "#999"), (full["eval_after"]["loss"], "full tuning", "#1b9e77"),
                      (before - 0.9 * gain_full, "90% of the full gain", "#7570b3")]:
    s.append(f'<line x1="{L}" y1="{y(val):.1f}" x2="{W-20}" y2="{y(val):.1f}" stroke="{col}" stroke-dasharray="4 3"/>')
    s.append(f'<text x="{W-22}" y="{y(val)-4:.1f}" text-anchor="end" fill="{col}">{lab}</text>')
pts = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(xs, ys))
s.append(f'<polyline fill="none" stroke="#d95f02" stroke-width="2" points="{pts}"/>')
s += [f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="3" fill="#d95f02"/>' for a, b in zip(xs, ys)]
s.append("</svg>")
open(svg, "w").write("\n".join(s))
rows = "\n".join(
    f"| {d:,} | {lr} | {r['eval_after']['loss']:.4f} | {100 * (before - r['eval_after']['loss']) / gain_full:.0f}% | "
    f"{r['median_step_seconds']:.2f} |{' best' if best[d][0] == lr else ''} |" for d, lr, r in tried)
print(f"""# Intrinsic dimension of SmolLM2 on Shakespeare (d90)

**Claim** (Li et al., ICLR 2018; for language models Aghajanyan et al., 2020): training in a
random subspace of a few hundred to a few thousand dimensions recovers most of what full
fine-tuning gains; d90 is the smallest d reaching 90% of the full gain.

**Run.** `tools/papers/intrinsic.sh {steps} {seed}`: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized
to f32), Shakespeare, sequences of 128, batch 4, {steps} steps, AdamW with 10 warm-up steps and a
cosine decay, seed {seed}; held-out loss on 32 validation sequences; q_proj and v_proj
({full['trainable_params'] - 192:,} weights). Each d: one θ of d values through a Fastfood projection
per module, at lr = c * sqrt(1000 / d) for c in {cs} (Adam moves each coordinate of θ by about lr
per step, so the weights' change grows with sqrt(d) at one rate), the best c counting for each d
and drawn in the plot; full tuning of the same modules (their full copies, with an IA3 vector of
192 values on one k_proj that carries them), lr {lr_full}. The gain is the drop in held-out loss
from the untuned model ({before:.4f}). CPU: {report.cpu()}. Other work ran on the machine
during these runs, so step times are indicative only.

![loss against d](intrinsic.svg)

Full tuning: {full['eval_after']['loss']:.4f} (gain {gain_full:.4f}).

| d | lr | held-out loss | share of the full gain | median step s | |
|---:|---:|---:|---:|---:|---|
{rows}

**What came out.** {f"d90 = {d90:,} among the d tried" if d90 else "No d tried reaches 90% of the full gain"}
(one seed, {steps} steps, {len(cs.split())} rates per d: a d between two tried ones is not resolved,
and a longer run moves the curve).
""")
