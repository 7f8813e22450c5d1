#!/usr/bin/env python3
"""Writes docs/papers/ks_lottery.md (stdout) and its plot from tools/papers/ks_lottery.sh."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import report  # noqa: E402

results, tickets_path, steps, seed, k, lr, svg = sys.argv[1:8]
runs = {r["label"]: r for r in report.runs(results)}
tickets = json.load(open(tickets_path))
names = {"full": "whole embedding", "ks": f"KS-Lottery, {k} tickets", "random": f"{k} random tokens"}
series = [(names[l], c, runs[l]["losses"]) for l, c in [("full", "#1b9e77"), ("ks", "#d95f02"), ("random", "#7570b3")]]
open(svg, "w").write(report.curves_svg(series, "training loss (10-step mean)"))
before = runs["full"]["eval_before"]["loss"]
gain = {l: before - r["eval_after"]["loss"] for l, r in runs.items()}
rows = "\n".join(
    f"| {names[l]} | {runs[l]['eval_after']['loss']:.4f} | {gain[l]:.4f} | {100 * gain[l] / gain['full']:.0f}% | "
    f"{runs[l]['median_step_seconds']:.2f} |" for l in ["full", "ks", "random"])
top = ", ".join(f"{t['token']} (D {t['ks_statistic']:.3f})" for t in tickets["tickets"][:10])
share = lambda l: gain[l] / gain["full"] if gain["full"] > 0 else float("nan")
holds = share("ks") >= 0.5 and share("ks") > share("random")
print(f"""# KS-Lottery on English-French translation (SmolLM2)

**Claim** (Yuan et al., 2024): tuning only the embedding rows of a few dozen tokens chosen by a
Kolmogorov-Smirnov test (the tickets) recovers most of the gain of tuning the whole embedding;
as many random tokens do not.

**Run.** `tools/papers/ks_lottery.sh {steps} {seed} {k} {lr}`: SmolLM2-135M-Instruct (Q4_1 GGUF,
dequantized to f32), English-to-French pairs from BIG-bench multiemo
(`tools/data/multiemo_translation.py`, 2,000 training pairs, 64 validation pairs, seed {seed}),
prompt "Translate English to French. English: ... French:" and loss on the French; sequences of
128, batch 4, AdamW at lr {lr} with 10 warm-up steps and a cosine decay, seed {seed}; the input
embedding only (the tied head keeps the pretrained table). Whole embedding: {steps} steps.
KS-Lottery: the whole embedding for {int(steps) // 2} steps, then the {k} rows of largest KS
statistic among the {len(tickets['candidates'])} tokens stage 1 changed, alone, from their
pretrained values, in a run of {int(steps) + int(steps) // 2} steps (the optimizer reset at the
choice). Random: {k} tokens drawn (seed {seed}) from those same candidates, their rows alone for
{steps} steps. CPU: {report.cpu()}. Other work may have run on the machine, so step times are
indicative only.

![training loss]({os.path.basename(svg)})

Validation loss before training: {before:.4f}.

| run | validation loss after | gain | share of the whole embedding's gain | median step s |
|---|---:|---:|---:|---:|
{rows}

The tickets, largest KS statistic first: {top}, … (all {len(tickets['tickets'])} in the run's
`tickets.json`).

**What came out.** The tickets recover {100 * share('ks'):.0f}% of the whole embedding's gain, the
random tokens {100 * share('random'):.0f}%: the claim {"holds" if holds else "does not hold"} at this scale (one seed,
{steps} steps).
""")
