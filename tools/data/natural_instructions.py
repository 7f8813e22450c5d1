#!/usr/bin/env python3
"""Multi-task JSONL from BIG-bench's natural_instructions (61 instruction subtasks), for petal's
multi-task training and the mixtures' paper claims: one line per example,
{"prompt": "<instruction>\\n\\nInput: <input>\\nOutput:", "completion": " <first target>",
 "task": "<subtask>"}, the instruction being the first sentence of the subtask's definition
(`--instruction full`: all of it, which alone often fills 128 tokens).

    tools/data/natural_instructions.py SRC OUT_DIR [--train-tasks N] [--heldout-tasks M]
        [--per-task K] [--eval-per-task E] [--max-chars C] [--instruction first|full] [--seed S]

SRC: the folder `petal assets natural_instructions` prints (one <subtask>.json per subtask).
Writes OUT_DIR/train.jsonl (K examples of each of the first N subtasks of a seeded shuffle),
OUT_DIR/val.jsonl (E other examples of the same subtasks) and OUT_DIR/heldout.jsonl (E examples
of each of the next M subtasks, never trained on), and OUT_DIR/tasks.json (which is which).
Examples whose prompt and completion exceed C characters are skipped, so short sequences hold
whole examples. Standard library only.
"""
import argparse
import json
import os
import random


def instruction(t, full):
    p = t.get("task_prefix") or t.get("description", "")
    p = p.replace("Definition:", "", 1).strip()
    return p if full else p.split(". ")[0].rstrip(".") + "."


def lines(task, examples, prefix):
    for e in examples:
        target = e["target"][0] if isinstance(e["target"], list) else e["target"]
        yield {"prompt": f"{prefix.strip()}\n\nInput: {e['input'].strip()}\nOutput:",
               "completion": f" {str(target).strip()}", "task": task}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--train-tasks", type=int, default=8)
    ap.add_argument("--heldout-tasks", type=int, default=4)
    ap.add_argument("--per-task", type=int, default=200)
    ap.add_argument("--eval-per-task", type=int, default=8)
    ap.add_argument("--max-chars", type=int, default=600)
    ap.add_argument("--instruction", choices=["first", "full"], default="first")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    names = sorted(f[:-5] for f in os.listdir(a.src) if f.endswith(".json"))
    if not names:
        raise SystemExit(f"{a.src}: no <subtask>.json files (run `petal assets natural_instructions`)")
    pools = {}
    for n in names:
        t = json.load(open(os.path.join(a.src, n + ".json")))
        ex = [l for l in lines(n, t["examples"], instruction(t, a.instruction == "full"))
              if len(l["prompt"]) + len(l["completion"]) <= a.max_chars]
        need = a.per_task + a.eval_per_task
        if len(ex) >= need:
            rng.shuffle(ex)
            pools[n] = ex
    usable = sorted(pools)
    rng.shuffle(usable)
    if len(usable) < a.train_tasks + a.heldout_tasks:
        raise SystemExit(f"only {len(usable)} subtasks have {a.per_task + a.eval_per_task} examples "
                         f"of at most {a.max_chars} characters; ask for fewer tasks or raise --max-chars")
    train, held = usable[:a.train_tasks], usable[a.train_tasks:a.train_tasks + a.heldout_tasks]
    os.makedirs(a.out, exist_ok=True)
    write = lambda f, rows: open(os.path.join(a.out, f), "w").write("".join(json.dumps(r) + "\n" for r in rows))
    write("train.jsonl", [r for n in train for r in pools[n][:a.per_task]])
    write("val.jsonl", [r for n in train for r in pools[n][a.per_task:a.per_task + a.eval_per_task]])
    write("heldout.jsonl", [r for n in held for r in pools[n][:a.eval_per_task]])
    json.dump({"train": train, "heldout": held, "seed": a.seed, "per_task": a.per_task,
               "eval_per_task": a.eval_per_task, "max_chars": a.max_chars, "instruction": a.instruction},
              open(os.path.join(a.out, "tasks.json"), "w"), indent=1)
    print(f"{len(train)} training subtasks x {a.per_task}, {len(held)} held out; wrote {a.out}")


if __name__ == "__main__":
    main()
