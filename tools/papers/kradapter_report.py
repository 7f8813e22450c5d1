#!/usr/bin/env python3
"""docs/papers/kradapter.md (stdout) and docs/papers/kradapter.svg from kradapter_toy's JSON lines."""
import json
import os
import statistics
import sys

rows = [json.loads(l) for l in open(sys.argv[1])]
seeds, steps = sys.argv[2], sys.argv[3]
targets = list(dict.fromkeys(r["target"] for r in rows))
mean = lambda t, m, k: statistics.mean(r[k] for r in rows if r["target"] == t and r["method"] == m)
per = lambda t, m, k: ", ".join(f"{r[k]:.3f}" for r in rows if r["target"] == t and r["method"] == m)
kr = next(r for r in rows if r["method"] == "KRAdapter")
lo = next(r for r in rows if r["method"] == "LoRA")
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    cpu = "?"

# grouped bars: relative error per target, KRAdapter and LoRA
W, H, L, B = 600, 300, 60, 50
y = lambda v: H - B - v * (H - B - 25)
gw = (W - L - 20) / len(targets)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<text x="{W/2}" y="14" text-anchor="middle">relative error ||dW - T|| / ||T|| after {steps} steps, equal parameters</text>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-10}" y2="{H-B}" stroke="black"/>',
       f'<line x1="{L}" y1="20" x2="{L}" y2="{H-B}" stroke="black"/>']
for k in range(6):
    v = k / 5
    svg.append(f'<text x="{L-6}" y="{y(v)+4:.1f}" text-anchor="end">{v:.1f}</text>')
for i, t in enumerate(targets):
    x0 = L + 10 + i * gw
    for j, (m, c) in enumerate([("KRAdapter", "#d95f02"), ("LoRA", "#7570b3")]):
        v = mean(t, m, "relative_error")
        svg.append(f'<rect x="{x0 + j*(gw-20)/2:.1f}" y="{y(v):.1f}" width="{(gw-20)/2-4:.1f}" height="{H-B-y(v):.1f}" fill="{c}"/>')
    svg.append(f'<text x="{x0+(gw-20)/2:.1f}" y="{H-B+16}" text-anchor="middle">{t}</text>')
svg.append(f'<rect x="{W-190}" y="26" width="10" height="10" fill="#d95f02"/><text x="{W-175}" y="35">KRAdapter</text>')
svg.append(f'<rect x="{W-100}" y="26" width="10" height="10" fill="#7570b3"/><text x="{W-85}" y="35">LoRA</text>')
svg.append("</svg>")
open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "papers", "kradapter.svg"), "w").write("\n".join(svg))

print(f"""# KRAdapter's claim on the paper's toy: a high-rank update from a LoRA-sized budget

**Claim** (Albert et al., ICCV 2025; the official `approximate_weight.py`): approximating a
target matrix at an equal parameter budget, KRAdapter reaches far lower error and higher
effective rank than LoRA on targets with a flat spectrum (random, sparse and whitened noise);
LoRA only wins on genuinely low-rank targets.

**Run.** `tools/papers/kradapter.sh "{seeds}" {steps}`: targets T (1024, 768), seeded as the
official toy builds them (Gaussian noise; the same with 90% zeros; PCA-whitened noise, every
singular value equal; noise cut to rank 192 = 0.25 n). dW from petal's own layers on a zero
base: KRAdapter (n = 768, r = 27, d = 11: {kr['params']:,} parameters, U zero, scaling 2) and LoRA of
rank {lo['lora_r']} (the official toy's `budget / (in + out) + 1`: {lo['params']:,} parameters, both factors
kaiming-uniform, scale 1). petal's AdamW, lr 0.1, weight decay 0.01, {steps} steps on
`||dW - T||_F^2`, as the official config. Effective rank: exp of the entropy of the normalised
singular values (Roy and Vetterli). Seeds {seeds}; CPU: {cpu}.

| target | target eff. rank | KRAdapter error (per seed) | LoRA error (per seed) | KRAdapter eff. rank | LoRA eff. rank |
|---|---:|---|---|---:|---:|""")
for t in targets:
    print(f"| {t} | {mean(t, 'LoRA', 'target_effective_rank'):.0f} | {per(t, 'KRAdapter', 'relative_error')} | "
          f"{per(t, 'LoRA', 'relative_error')} | {mean(t, 'KRAdapter', 'effective_rank'):.0f} | "
          f"{mean(t, 'LoRA', 'effective_rank'):.1f} |")
TIE = 0.005  # differences of relative error below this are called even
diff = {t: mean(t, "LoRA", "relative_error") - mean(t, "KRAdapter", "relative_error") for t in targets}
wins = [t for t in targets if diff[t] > TIE]
ties = [t for t in targets if abs(diff[t]) <= TIE]
losses = [t for t in targets if diff[t] < -TIE]
flat = [t for t in targets if not t.startswith("low rank")]
holds = set(flat) <= set(wins) and all(t.startswith("low rank") for t in losses)
verdict = ("holds: KRAdapter is lower on every flat-spectrum target, LoRA on the low-rank one" if holds else
           "holds only in part: KRAdapter is lower on " + (", ".join(wins) or "no target") +
           "; even (within " + str(TIE) + ") on " + (", ".join(ties) or "no target") +
           "; LoRA lower on " + (", ".join(losses) or "no target"))
print(f"""
![relative error per target](kradapter.svg)

**What came out.** The claim {verdict} (mean over seeds; differences under {TIE} counted as even).
Where KRAdapter is ahead the margins are small, not the paper's "far lower": with about 6.3% of
the target's entries as parameters neither update can fit noise closely.
LoRA's update has effective rank at most its rank ({lo['lora_r']}); KRAdapter's spreads over most of the
768 directions, as the paper argues: the effective-rank half of the claim holds clearly.
""")
