#!/usr/bin/env python3
"""A claim page for runs compared on held-out loss (MoS, RPS): the table, the loss curves and
the runs ranked. Usage: table_report.py RESULTS SVG TITLE CLAIM RUN [LABEL=TEXT ...] > page.md
(RESULTS: one JSON summary of `petal train --json` per line with a `label`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import report  # noqa: E402

results, svg, title, claim, run = sys.argv[1:6]
names = dict(a.split("=", 1) for a in sys.argv[6:])
runs = report.runs(results)
colours = ["#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e"]
name = lambda r: names.get(r["label"], r["label"])
series = [(name(r), colours[i % len(colours)], r["losses"]) for i, r in enumerate(runs)]
open(svg, "w").write(report.curves_svg(series, "training loss (10-step mean)"))
rows = "\n".join(
    f"| {name(r)} | {r['trainable_params']:,} | {r['eval_before']['loss']:.4f} | {r['eval_after']['loss']:.4f} | "
    f"{r['median_step_seconds']:.2f} | {r['peak_rss_mb']:.0f} |" for r in runs)
ranked = sorted(runs, key=lambda r: r["eval_after"]["loss"])
order = ", then ".join(f"{name(r)} ({r['eval_after']['loss']:.4f})" for r in ranked)
print(f"""# {title}

**Claim.** {claim}

**Run.** {run} CPU: {report.cpu()}.

![training loss]({os.path.basename(svg)})

| run | trainable params | held-out loss before | after | median step s | peak RSS MB |
|---|---:|---:|---:|---:|---:|
{rows}

**What came out.** Lowest held-out loss first: {order}. One seed: differences of a few
hundredths are within what another seed could move.
""")
