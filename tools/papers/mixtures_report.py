#!/usr/bin/env python3
"""Writes docs/papers/mixtures.md (stdout) and its plot from tools/papers/mixtures.sh's results."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import report  # noqa: E402

results, base_path, tasks_path, steps, seed, groups, svg = sys.argv[1:8]
runs = report.runs(results)
base = json.load(open(base_path))
tasks = json.load(open(tasks_path))
names = {"ia3": "IA3", "mov": "MoV, 10 experts", "molora": "MoLoRA, 10 x r 4", "lora4": "LoRA r 4",
         "lora40": "LoRA r 40 (MoLoRA's per-token cost)", "sira": "SiRA, 8 x r 4, top 2",
         "molora2": "MoLoRA, 2 x r 4 (dense, same active rank)", "lora8": "LoRA r 8 (same active rank)"}
claims = {"mov": ("MoV beats IA3 (the paper: by large margins)", "mov", ["ia3"]),
          "molora": ("MoLoRA beats LoRA of the same per-token cost", "molora", ["lora40", "lora4"]),
          "sira": ("SiRA beats dense MoLoRA and LoRA at the same active parameters", "sira", ["molora2", "lora8"])}
colours = ["#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
series = [(names.get(r["label"], r["label"]), colours[i % len(colours)], r["losses"]) for i, r in enumerate(runs)]
open(svg, "w").write(report.curves_svg(series, "training loss (10-step mean)"))
out = [f"""# MoV, MoLoRA and SiRA on multi-task data

**Claims.** MoV and MoLoRA (Zadouri et al., ICLR 2024): mixtures of IA3 vectors / LoRA experts
beat IA3 / LoRA of the same per-token cost on multi-task instruction data, held-out tasks
included. SiRA (Zhu et al., 2023): sparse top-k routing with an expert capacity and expert
dropout beats dense MoLoRA and LoRA at the same active parameters.

**Run.** `tools/papers/mixtures.sh {steps} {seed} "{groups}"`: SmolLM2-135M-Instruct (Q4_1 GGUF,
dequantized to f32); BIG-bench natural_instructions through `tools/data/natural_instructions.py`
(seed {seed}): {len(tasks['train'])} subtasks x {tasks['per_task']} examples trained with
task-balanced sampling (`--task-sampling balanced`), validation on {tasks['eval_per_task']} other
examples of each, and {len(tasks['heldout'])} subtasks never trained on (held out,
{tasks['eval_per_task']} examples each); prompt (the subtask's instruction, first sentence, and the
input) and completion, loss on the completion; sequences of 192, batch 4, {steps} steps, AdamW with
10 warm-up steps and a cosine decay, seed {seed}. CPU: {report.cpu()}. Other work may have run on
the machine, so step times are indicative only.

Training subtasks: {", ".join(tasks['train'])}. Held out: {", ".join(tasks['heldout'])}.

Held-out subtasks before training: {base['loss']:.4f}.

![training loss]({os.path.basename(svg)})
"""]
for g in groups.split():
    rs = [r for r in runs if r["group"] == g]
    if not rs:
        continue
    text, mine, others = claims[g]
    out.append(f"## {text}\n\n| run | trainable params | lr | validation loss before | after | held-out subtasks after | median step s | peak RSS MB |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rs:
        out.append(f"| {names.get(r['label'], r['label'])} | {r['trainable_params']:,} | {r.get('lr', '')} | "
                   f"{r['eval_before']['loss']:.4f} | {r['eval_after']['loss']:.4f} | {r['heldout']['loss']:.4f} | "
                   f"{r['median_step_seconds']:.2f} | {r['peak_rss_mb']:.0f} |")
    by = {r["label"]: r for r in rs}
    if mine in by:
        m = by[mine]
        verdict = []
        for o in others:
            if o in by:
                dv = by[o]["eval_after"]["loss"] - m["eval_after"]["loss"]
                dh = by[o]["heldout"]["loss"] - m["heldout"]["loss"]
                verdict.append(f"{names[o]}: {'ahead' if dv > 0 else 'behind'} by {abs(dv):.4f} on the training "
                               f"subtasks, {'ahead' if dh > 0 else 'behind'} by {abs(dh):.4f} on the held-out ones")
        out.append(f"\n**What came out.** {names[mine]} against " + "; against ".join(verdict) + ".\n")
print("\n".join(out))
