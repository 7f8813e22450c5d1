#!/usr/bin/env python3
"""Writes docs/papers/palora.md (stdout) and its plot (the two fronts) from tools/papers/palora.sh."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import report  # noqa: E402

scores, tasks_path, palora_run, lora_a_run, lora_b_run, steps, seed, svg = sys.argv[1:9]
a, b = sorted(json.load(open(tasks_path))["train"])
runs = {n: json.load(open(p)) for n, p in [("palora", palora_run), ("lora A", lora_a_run), ("lora B", lora_b_run)]}
rows = report.runs(scores)
point = lambda r: (r["tasks"][a]["loss"], r["tasks"][b]["loss"])
base = point(next(r for r in rows if r["label"] == "base"))
front = {lab: [(float(r["preference"].split(",")[0]), point(r)) for r in rows if r["label"] == lab]
         for lab in ["palora", "mix"]}


def hypervolume(points, ref):
    """Area dominated by `points` (both losses lower is better) inside the box below `ref`."""
    pts = sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1])
    area, best_b = 0.0, ref[1]
    for i, (la, lb) in enumerate(pts):
        if lb < best_b:
            nxt = ref[0]
            area += (nxt - la) * (best_b - lb)
            best_b = lb
    return area


def dominated(p, others):
    return any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in others)


hv = {lab: hypervolume([p for _, p in pts], base) for lab, pts in front.items()}
pal, mix = [p for _, p in front["palora"]], [p for _, p in front["mix"]]
mix_dominated = sum(dominated(p, pal) for p in mix)
pal_dominated = sum(dominated(p, mix) for p in pal)


def plot():
    w, h, L, B, T = 560, 420, 70, 50, 30
    allp = pal + mix + [base]
    lo_a, hi_a = min(p[0] for p in allp), max(p[0] for p in allp)
    lo_b, hi_b = min(p[1] for p in allp), max(p[1] for p in allp)
    pad_a, pad_b = (hi_a - lo_a) * 0.05 + 1e-3, (hi_b - lo_b) * 0.05 + 1e-3
    x = lambda v: L + (v - lo_a + pad_a) / (hi_a - lo_a + 2 * pad_a) * (w - L - 20)
    y = lambda v: h - B - (v - lo_b + pad_b) / (hi_b - lo_b + 2 * pad_b) * (h - B - T)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="{w/2}" y="16" text-anchor="middle">validation loss per task, λ = 0 … 1 (lower left is better)</text>',
           f'<line x1="{L}" y1="{h-B}" x2="{w-20}" y2="{h-B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{h-B}" stroke="black"/>',
           f'<text x="{(L+w)/2}" y="{h-12}" text-anchor="middle">{a}</text>',
           f'<text x="14" y="{(T+h-B)/2}" transform="rotate(-90 14 {(T+h-B)/2})" text-anchor="middle">{b}</text>']
    for k in range(5):
        va, vb = lo_a + (hi_a - lo_a) * k / 4, lo_b + (hi_b - lo_b) * k / 4
        out.append(f'<text x="{x(va):.1f}" y="{h-B+16}" text-anchor="middle">{va:.3f}</text>')
        out.append(f'<text x="{L-6}" y="{y(vb)+4:.1f}" text-anchor="end">{vb:.3f}</text>')
    for j, (lab, col, pts) in enumerate([("PaLoRA (one model)", "#d95f02", pal),
                                         ("LoRA A, LoRA B mixed linearly", "#1b9e77", mix)]):
        out.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.5" points="'
                   + " ".join(f"{x(p[0]):.1f},{y(p[1]):.1f}" for p in pts) + '"/>')
        out += [f'<circle cx="{x(p[0]):.1f}" cy="{y(p[1]):.1f}" r="3" fill="{col}"/>' for p in pts]
        out.append(f'<text x="{w-24}" y="{T+16*j+12}" fill="{col}" text-anchor="end">{lab}</text>')
    out.append(f'<circle cx="{x(base[0]):.1f}" cy="{y(base[1]):.1f}" r="4" fill="black"/>')
    out.append(f'<text x="{x(base[0])-6:.1f}" y="{y(base[1])-6:.1f}" text-anchor="end">base model</text>')
    out.append("</svg>")
    return "\n".join(out)


open(svg, "w").write(plot())
table = "\n".join(
    f"| {l:g} | {p[0]:.4f} | {p[1]:.4f} | {m[0]:.4f} | {m[1]:.4f} |"
    for (l, p), (_, m) in zip(front["palora"], front["mix"]))
secs = {n: r.get("median_step_seconds", float("nan")) for n, r in runs.items()}
holds = hv["palora"] >= hv["mix"]
print(f"""# PaLoRA: a Pareto front from one model (SmolLM2)

**Claim** (Dimitriadis et al., ICLR 2025): one model with a LoRA per task, mixed by a preference
ray and trained on annealed rays, traces a Pareto front between the tasks that dominates or
matches per-task models combined afterwards.

**Run.** `tools/papers/palora.sh {steps} {seed}`: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized
to f32), two BIG-bench natural_instructions subtasks chosen by seed {seed}
(`tools/data/natural_instructions.py`: 400 training and 32 validation examples each), A =
`{a}`, B = `{b}`; every linear, rank 8 per task, alpha 16; sequences of 192, batch 4, {steps}
steps, AdamW at lr 1e-3 with 10 warm-up steps and a cosine decay, seed {seed}. PaLoRA: both
tasks, task-balanced batches, 2 rays per step annealed as the official sampler (mul 5, ε 0.01),
the base frozen (the paper also trains it). Baseline: LoRA r 8 on A alone and on B alone, the
same steps, mixed linearly, λ ΔW_A + (1 − λ) ΔW_B (`tools/papers/palora_mix.py`). Both scored on
the two tasks' validation examples at preference (λ, 1 − λ), λ = 0, 0.1, …, 1. Median step
time: PaLoRA {secs['palora']:.2f} s (two forward-backward passes per batch), LoRA
{secs['lora A']:.2f} s / {secs['lora B']:.2f} s. CPU: {report.cpu()}. Other work may have run
on the machine, so step times are indicative only.

![the two fronts]({os.path.basename(svg)})

Base model: {base[0]:.4f} on A, {base[1]:.4f} on B.

| λ (weight of A) | PaLoRA on A | PaLoRA on B | mixed LoRAs on A | mixed LoRAs on B |
|---:|---:|---:|---:|---:|
{table}

Hypervolume below the base model's point (larger is better): PaLoRA {hv['palora']:.5f}, mixed
LoRAs {hv['mix']:.5f}. Mixed-LoRA points dominated by a PaLoRA point: {mix_dominated} of
{len(mix)}; PaLoRA points dominated by a mixed-LoRA point: {pal_dominated} of {len(pal)}.

**What came out.** PaLoRA's front {"dominates or matches" if holds else "does not match"} the
mixed per-task LoRAs by hypervolume ({hv['palora']:.5f} vs {hv['mix']:.5f}): the claim
{"holds" if holds else "does not hold"} at this scale (one seed, {steps} steps). PaLoRA trained
one model at about twice a LoRA's step cost; the baseline trained two.
""")
