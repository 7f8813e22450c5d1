#!/usr/bin/env python3
"""Writes docs/papers/fish.md (stdout) and its plot from tools/papers/fish.sh's results."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import report  # noqa: E402

results, steps, seed, lr, samples, svg = sys.argv[1:7]
est = -(-int(samples) // 4)  # steps of batch 4 that estimate the Fisher
runs = {r["label"]: r for r in report.runs(results)}
label = {"fisher": "FISH mask 0.5%", "random": "random mask 0.5%", "full": "full tuning of q, v"}
colours = {"fisher": "#d95f02", "random": "#7570b3", "full": "#1b9e77"}
series = [(label[k], colours[k], runs[k]["losses"]) for k in label]
open(svg, "w").write(report.curves_svg(series, f"training loss, q_proj and v_proj, seed {seed} (10-step mean)"))
rows = "\n".join(
    f"| {label[k]} | {runs[k]['trainable_params']:,} | {runs[k]['eval_before']['loss']:.4f} | "
    f"{runs[k]['eval_after']['loss']:.4f} | {runs[k]['median_step_seconds']:.2f} | {runs[k]['peak_rss_mb']:.0f} |"
    for k in label)
f, r, full = (runs[k]["eval_after"]["loss"] for k in ["fisher", "random", "full"])
before = runs["fisher"]["eval_before"]["loss"]
share = (before - f) / (before - full) if before != full else float("nan")
print(f"""# FISH mask against a random mask and full tuning on SmolLM2

**Claim** (Sung et al., NeurIPS 2021): training only the 0.5% of weights with the largest
empirical Fisher information beats a random mask of the same density and comes close to full
fine-tuning.

**Run.** `tools/papers/fish.sh {steps} {seed} {lr} {samples}`: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized
to f32), Shakespeare, sequences of 128, batch 4, {steps} steps, AdamW at lr {lr} with 10 warm-up
steps and a cosine decay, seed {seed}; held-out loss on 32 validation sequences; q_proj and v_proj.
FISH: the per-sequence empirical Fisher from {samples} training sequences (the first {est} steps, which
train nothing), then the global top 0.5% (66,355 weights) trained from step {est + 1}, the optimizer started
afresh there; the random mask: the same count at the same step, no Fisher; full tuning: every
weight of q_proj and v_proj (modules_to_save, with an IA3 vector of 192 values on one k_proj, the
smallest adapter to carry them), trained from step 1. One learning rate (all three move raw
weights). CPU: {report.cpu()}. Other work ran on the machine during these runs, so step times are
indicative only.

![training loss](fish.svg)

| run | trainable params | held-out loss before | after | median step s | peak RSS MB |
|---|---:|---:|---:|---:|---:|
{rows}

**What came out.** FISH {f:.4f}, random mask {r:.4f}: the Fisher mask is
{"ahead" if f < r else "not ahead"} by {r - f:+.4f}. Full tuning {full:.4f}; FISH closes
{100 * share:.0f}% of the gap between the untuned model and full tuning, with 0.5% of its values
and {int(steps) - est} of its {steps} steps. One seed and one learning rate.
""")
