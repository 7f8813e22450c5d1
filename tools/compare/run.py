#!/usr/bin/env python3
"""The method-comparison report: every method given trained on real tasks with the same
budget, each scored on held-out examples, with its trainable parameters, peak memory, training
speed and the cost of running it unmerged; written as docs/comparison.md with SVG plots
(accuracy against trainable parameters, and against peak memory).

A task is a built-in of `petal eval --task` (elementary_math_qa/question_only, multiemo, ...;
TASK/SUBTASK for one sub-task): its examples
are dumped (`--dump-task`), shuffled with the seed, split into --train examples to train on
(prompt -> the right choice, the loss on the answer only) and --test held-out ones, scored
by `petal eval --task` (accuracy, and acc_norm for multiple choice). A method is a name
`petal methods` lists, with optional options: `loha:r=4`, `lora:r=16,lora_alpha=32` (separate
methods by `;` when a spec has several options).

Budgets (`--budget N`): each method with a size option (its rank `--r`, or RPS's budget, the
intrinsic dimension, FISH's density, the prompts' virtual tokens, MoV's experts) is sized so its
trainable parameters come nearest N (probed with `petal train --max-steps 0`, cached in
OUT/MODEL/probes.json); the others keep their size. Learning rate (`--lr-sweep a,b,c`): each
method is trained at every rate on the first task, and the rate with the lowest validation loss
(5% of the training examples; never the test examples) is reused on the other tasks
(OUT/MODEL/lrs.json); `--lr-extend N` tries up to N rates past an end of the sweep where the
lowest loss lies at that end. Give such a run its own --out and --report.

A method that trains on several tasks at once (PaLoRA: one LoRA per task, mixed by a
preference; `JOINT`) is trained once on every task's training examples together and scored on
each task at that task's vertex of the preference.

Instruct models (`--chat`): every prompt is asked through the model's chat template (`petal
eval --chat`) and the training examples are the same conversations, the answer the assistant's
turn; also a run of its own (--out, --report).

Resumable: each (model, task, method) result is kept as OUT/MODEL/TASK/METHOD.json and not run
again (except a first-task result that --lr-extend can take further, and a later task's result
trained at a rate the first task's sweep has since replaced); the report is rewritten from every
result present at the end of each run. The full report is a long command run across sittings; a
cheap subset (a few methods, one task) takes minutes.

Speed and memory (`--retime STEPS`): a row's tokens/s and peak RSS come from its own training,
on whatever machine and build made it (the report marks rows by CPU and build). Run the same
command with `--retime STEPS` to train nothing new but run each kept result's training again
for STEPS steps, one row after another in one sitting, nothing else running: the report then
shows those figures, which compare across rows.

    python3 tools/compare/run.py --petal target/release/petal --model asset:smollm2 \\
        --tasks elementary_math_qa/question_only --methods lora,ia3,loha --train 400 --test 100 --steps 40

Plots need matplotlib (in tools/search/requirements.txt's venv); without it the report has the
table only.
"""
import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time

from report import DEFAULT_REPORT, EARLIER_LR, SETTINGS, report, settings
from sizing import JOINT, check_args, method_specs, methods_info, sh, sized


def solutions(a, task):
    """GSM8K's worked solutions (prompt -> " reasoning... #### N"), trained on in place of the bare
    number the task file scores: the reference data holds them, the dumped task does not."""
    if task.split("/")[0] != "gsm8k":
        return {}
    path = sh([a.petal, "assets", "gsm8k"], "petal assets gsm8k").split("\t")[-1].strip()
    out = {}
    for line in open(path):
        r = json.loads(line)
        out[f"Question: {r['question']}\nAnswer:"] = " " + r["answer"]
    return out


def unscored(test):
    """Whether a generation task's test file predates dumped tasks carrying their scoring
    (`extract`, `stop`): made again then (the same examples: the split is seeded)."""
    with open(test) as f:
        first = json.loads(f.readline() or "{}")
    return first and "choices" not in first and "extract" not in first


def split(a, task, work):
    """The task's train (prompt/completion) and test (task-file) files, made once."""
    train, test = os.path.join(work, "train.jsonl"), os.path.join(work, "test.jsonl")
    if os.path.exists(train) and os.path.exists(test) and not unscored(test):
        return train, test
    os.makedirs(work, exist_ok=True)
    dump = os.path.join(work, "all.jsonl")
    # TASK/SUBTASK: one sub-task of a built-in (elementary_math_qa's sub-tasks ask the same
    # questions with and without hints: split across them, a test question would be trained on)
    cmd = [a.petal, "eval", "--task", task.split("/")[0], "--dump-task", dump]
    if "/" in task:
        cmd += ["--tasks", task]
    sh(cmd, f"dumping {task}")
    rows = [json.loads(l) for l in open(dump)]
    if a.max_prompt_chars:  # long prompts would be cut before their answer at --seq-len
        rows = [r for r in rows if len(r["prompt"]) <= a.max_prompt_chars]
    random.Random(a.seed).shuffle(rows)
    if len(rows) < a.train + a.test:
        raise SystemExit(f"{task}: {len(rows)} examples (after --max-prompt-chars), fewer than --train + --test")
    worked = solutions(a, task)
    with open(train + ".tmp", "w") as f:
        for r in rows[:a.train]:
            answer = (r["choices"][r["answer"]] if "choices" in r
                      else worked.get(r["prompt"], " " + r["answer"]))
            f.write(json.dumps(chat_turns(r, answer) if a.chat else
                               {"prompt": r["prompt"], "completion": answer}) + "\n")
    with open(test + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[a.train:a.train + a.test])
    os.replace(train + ".tmp", train)
    os.replace(test + ".tmp", test)
    return train, test


def chat_turns(r, answer):
    """A training example as the conversation `petal eval --chat` asks it in: the task's
    description a system turn, the rest of the prompt a user turn, the answer (its leading
    space dropped) the assistant's."""
    d = r.get("description", "")
    turns = [{"role": "system", "content": d}] if d else []
    turns += [{"role": "user", "content": r["prompt"][len(d):]},
              {"role": "assistant", "content": answer[1:] if answer.startswith(" ") else answer}]
    return {"messages": turns}


def cpu_desc():
    """The CPU's model name and its widest vector extensions (speed depends on them)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = ("AVX-512, AVX512-BF16" if {"avx512f", "avx512_bf16"} <= flags else
           "AVX-512" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2")
    return f"{name} ({ext})"


def petal_build(a):
    """The commit `--petal` was built from, as its `--version` says (`petal 0.1.0 (7988df97a)`);
    "unknown" for a binary whose version names none (built before 7988df9)."""
    v = sh([a.petal, "--version"], "petal --version").strip()
    return v[v.index("(") + 1:v.rindex(")")] if "(" in v else "unknown"


def evaluate(a, test, adapter=None, extra=()):
    cmd = [a.petal, "eval", "--model", a.model, "--task", test, "--json", "--batch-size", "8", *extra]
    if a.chat:
        cmd.append("--chat")
    if adapter:
        cmd += ["--adapter", adapter]
    t0 = time.time()
    r = json.loads(sh(cmd, f"petal eval {test}"))
    r["seconds"] = time.time() - t0
    return r


def train_cmd(a, spec, train, lr, run, steps, val):
    """`petal train` of `spec` on `train` at `lr` for `steps` steps into `run`, holding out `val`
    of the examples."""
    method, _, opts = spec.partition(":")
    cmd = [a.petal, "train", "--model", a.model, "--data", train, "--method", method,
           "--max-steps", str(steps), "--lr", str(lr), "--batch-size", str(a.batch_size),
           "--seq-len", str(a.seq_len), "--seed", str(a.seed), "--val-fraction", str(val),
           "--out", run, "--overwrite", "true", "--json"]
    for o in filter(None, opts.split(",")):
        cmd += ["--set", o]
    return cmd + JOINT.get(method, [])


def timed_again(a, task, spec, train, r):
    """`r`'s training (its data, rate and options) run again for --retime steps on this CPU and
    build, nothing held out: its tokens/s (the median step) and peak RSS. Rows made by several
    builds or machines are timed again in one sitting so their speed and memory compare."""
    with tempfile.TemporaryDirectory() as d:
        cmd = train_cmd(a, spec, train, r.get("lr", EARLIER_LR), os.path.join(d, "run"), a.retime, 0)
        t = json.loads(sh(cmd, f"petal train {spec} on {task} (timed again)"))
    return dict(train_tokens_per_s=a.batch_size * a.seq_len / t["median_step_seconds"],
                peak_rss_mb=t["peak_rss_mb"], steps=a.retime, cpu=cpu_desc(), petal=petal_build(a))


def run_one(a, task, spec, train, test, base, out, lr, score=True, **extra):
    """Train `spec` at `lr` and (with `score`) evaluate it on the test examples; the result,
    with `extra` fields, is kept as `out`. Without `score` the result has no accuracy yet
    (`scored` adds it)."""
    run = out[:-len(".json")]
    cmd = train_cmd(a, spec, train, lr, run, a.steps, 0.05)  # a folder without its result: cut short
    t = json.loads(sh(cmd, f"petal train {spec} on {task}"))
    result = {
        "model": a.model, "task": task, "method": spec,
        "trainable_params": t["trainable_params"], "total_params": t["total_params"],
        "peak_rss_mb": t["peak_rss_mb"],
        "train_tokens_per_s": a.batch_size * a.seq_len / t["median_step_seconds"],
        "eval_loss_after": t["eval_after"]["loss"], "steps": t["steps"],
        "cpu": cpu_desc(), "petal": petal_build(a), "lr": lr, "settings": settings(a), "adapter": os.path.join(run, "adapter"),
    }
    if score:
        result = scored(a, test, base, result)
    result.update(extra)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)
    return result


def scored(a, test, base, result, extra=()):
    """`result` with its adapter's accuracy on the test examples (`petal eval` given `extra`
    flags too) and its unmerged eval time."""
    e = evaluate(a, test, result["adapter"], extra)
    result = dict(result, accuracy=e["accuracy"], acc_norm=e.get("acc_norm"), examples=e["examples"],
                  unmerged_eval_seconds=e["seconds"], base_eval_seconds=base["seconds"],
                  inference_overhead=overhead(e, base))
    if "generated_tokens" in e:
        result.update(generated_tokens=e["generated_tokens"],
                      base_generated_tokens=base.get("generated_tokens"))
    return result


def sweep(a, task, spec, train, test, base, work, chosen, kept=None, extra=()):
    """Train `spec` at each --lr-sweep rate; keep the one whose validation loss (the training
    data's held-out 5%, not the test examples) is lowest; its run, scored on the test examples,
    is the task's result (the other rates are never scored on them). With --lr-extend N, a
    lowest loss at an end of the sweep gets the next rate beyond that end (the sweep's own
    ratio), up to N more. `kept`: this spec's earlier result, reused where its rate stays best;
    `extra`: flags of its evaluation."""
    runs = {}

    def trained(lr):
        out = os.path.join(work, "sweep", f"{safe(spec)}@{lr:g}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        r = (json.load(open(out)) if os.path.exists(out)
             else run_one(a, task, spec, train, test, base, out, lr, score=False))
        print(f"{task} {spec} lr {lr:g}: validation loss {r['eval_loss_after']:.4f}", flush=True)
        runs[lr] = r

    for lr in a.lr_sweep:
        trained(lr)
    for _ in range(a.lr_extend):
        lr = beyond(runs)
        if lr is None:
            break
        trained(lr)
    best = min(runs.values(), key=val_loss)
    chosen[spec] = best["lr"]
    swept = dict(lr_sweep={f"{lr:g}": runs[lr]["eval_loss_after"] for lr in sorted(runs)},
                 lr_sweep_given=[f"{lr:g}" for lr in a.lr_sweep], lr_extend=a.lr_extend)
    if kept is not None and kept.get("lr") == best["lr"]:
        return dict(kept, **swept)
    best = best if "accuracy" in best else scored(a, test, base, best, extra)
    return dict(best, **swept)


def joint_train(a, model_dir):
    """Every task's training examples in one file, each with its `task`, and its folder."""
    tasks = a.tasks.split(",")
    work = os.path.join(model_dir, "joint-" + "+".join(t.replace("/", "_") for t in tasks))
    train = os.path.join(work, "train.jsonl")
    if not os.path.exists(train):
        os.makedirs(work, exist_ok=True)
        with open(train + ".tmp", "w") as f:
            for t in tasks:
                part = split(a, t, os.path.join(model_dir, t.replace("/", "_")))[0]
                f.writelines(json.dumps(dict(json.loads(line), task=t)) + "\n" for line in open(part))
        os.replace(train + ".tmp", train)
    return train, work


def joint(a, task, spec, train, work, test, base, chosen, kept):
    """`spec` trained on every task (`joint_train`; swept there, the runs shared by the tasks'
    rows) and scored on `task`'s test examples at its vertex of the preference."""
    tasks = a.tasks.split(",")
    if len(tasks) < 2:
        raise SystemExit(f"{spec} trains on several tasks together: give two or more (--tasks)")
    extra = ["--preference", ",".join("1" if t == task else "0" for t in sorted(tasks))]
    if a.lr_sweep:
        r = sweep(a, "+".join(tasks), spec, train, test, base, work, chosen, kept, extra)
    else:
        out = os.path.join(work, safe(spec) + ".json")
        r = (json.load(open(out)) if os.path.exists(out)
             else run_one(a, "+".join(tasks), spec, train, test, base, out, a.lr, score=False))
        r = scored(a, test, base, r, extra)
    return dict(r, task=task, trained_on=tasks, preference=extra[1])


def val_loss(r):
    """A run's validation loss; a diverged run's (NaN) counts as the worst."""
    v = r["eval_loss_after"]
    return v if v is not None and math.isfinite(v) else math.inf


def beyond(runs):
    """The next rate past the end of the swept rates (`runs`: rate -> run) where the lowest
    validation loss is, at the ratio of that end's neighbour; None where it is inside."""
    rates = sorted(runs)
    if len(rates) < 2:
        return None
    best = min(rates, key=lambda lr: val_loss(runs[lr]))
    if best == rates[-1]:
        return float(f"{rates[-1] * rates[-1] / rates[-2]:.3g}")
    if best == rates[0]:
        return float(f"{rates[0] * rates[0] / rates[1]:.3g}")
    return None


def extendable(a, r):
    """A kept first-task result whose lowest validation loss is at an end of its sweep and
    which --lr-extend allows more rates than it has had."""
    by = r.get("lr_sweep")
    if not (a.lr_sweep and a.lr_extend and by):
        return False
    runs = {float(lr): {"eval_loss_after": v} for lr, v in by.items()}
    return beyond(runs) is not None and len(runs) < len(a.lr_sweep) + a.lr_extend


def overhead(e, base):
    """Unmerged evaluation time against the base model's; for generation, per generated token
    (a trained model writes longer answers than the base model: GSM8K's worked solutions)."""
    if e.get("generated_tokens") and base.get("generated_tokens"):
        return (e["seconds"] / e["generated_tokens"]) / (base["seconds"] / base["generated_tokens"])
    return e["seconds"] / base["seconds"]


def retime(r, base):
    """A result measured on this CPU without a base time of its own: its unmerged eval time
    against the base model's on this CPU (`base` holds this CPU's time). A result that has one
    keeps it: the two were measured in one sitting, while machines of one description differ
    from sitting to sitting (the base model's 100 questions: 44.7 s one day, 36.9 s another)."""
    if r.get("cpu") == cpu_desc() and "base_eval_seconds" not in r:
        r["base_eval_seconds"] = base["seconds"]
        r["inference_overhead"] = overhead(
            dict(seconds=r["unmerged_eval_seconds"], generated_tokens=r.get("generated_tokens")), base)


def safe(spec):
    return spec.replace(":", "_").replace(",", "_").replace("=", "")


def rates(text):
    """--lr-sweep's comma list of numbers."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a comma list of numbers (e.g. 5e-4,2e-3)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--petal", default="target/release/petal")
    ap.add_argument("--model", default="asset:smollm2")
    ap.add_argument("--tasks", default="elementary_math_qa/question_only")
    ap.add_argument("--methods", default="lora,ia3,loha")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-sweep", type=rates, default=None,
                    help="learning rates tried on the first task (e.g. 5e-4,2e-3,8e-3); the one with the lowest "
                         "validation loss is kept for every task")
    ap.add_argument("--lr-extend", type=int, default=0,
                    help="where the lowest validation loss is at an end of --lr-sweep, try up to this many rates "
                         "beyond that end (the sweep's ratio); kept results at an end are extended too")
    ap.add_argument("--budget", type=int, default=None,
                    help="trainable parameters each method is sized to (its rank or size option; methods "
                         "without one keep their size)")
    ap.add_argument("--retime", type=int, default=0, metavar="STEPS",
                    help="train nothing new: run each kept result's training again for STEPS steps and "
                         "keep its tokens/s and peak RSS (`retimed`), which the report then shows, so "
                         "rows made by several builds or machines compare; one sitting, nothing else running")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prompt-chars", type=int, default=None,
                    help="only the examples whose prompt has at most this many characters (long ones "
                         "would be cut before their answer at --seq-len)")
    ap.add_argument("--chat", action="store_true",
                    help="ask every prompt through the model's chat template (`petal eval --chat`) and train "
                         "on the same conversations; give such a run its own --out and --report")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--report", default=DEFAULT_REPORT)
    a = ap.parse_args()
    info = methods_info(a)
    check_args(a, info)
    results, failed = [], []
    model_dir = os.path.join(a.out, a.model.replace(":", "_").replace("/", "_"))
    os.makedirs(model_dir, exist_ok=True)
    probes_path, lrs_path = os.path.join(model_dir, "probes.json"), os.path.join(model_dir, "lrs.json")
    probes = json.load(open(probes_path)) if os.path.exists(probes_path) else {}
    chosen = json.load(open(lrs_path)) if os.path.exists(lrs_path) else {}  # spec -> the swept lr
    joint_timed = {}  # --retime: a joint method's figures, of its one training
    for ti, task in enumerate(a.tasks.split(",")):
        work = os.path.join(a.out, a.model.replace(":", "_").replace("/", "_"), task.replace("/", "_"))
        train, test = split(a, task, work)
        st_path = os.path.join(work, "settings.json")
        if os.path.exists(st_path):
            made = json.load(open(st_path))
            differ = [k for k in SETTINGS if made.get(k) != settings(a).get(k)]
            if differ:
                raise SystemExit(f"{work} holds results made with other settings ({', '.join(differ)}: "
                                 f"{', '.join(str(made.get(k)) for k in differ)}): give this run another --out")
        else:
            with open(st_path, "w") as f:
                json.dump(settings(a), f)
        base_path = os.path.join(work, "base.json")
        if not os.path.exists(base_path):
            b = dict(evaluate(a, test), cpu=cpu_desc())
            with open(base_path, "w") as f:
                json.dump(b, f)
        base = json.load(open(base_path))
        # the base model's eval time on this CPU (the unmerged overhead compares times of one CPU)
        if base.get("cpu") != cpu_desc():
            base.setdefault("seconds_by_cpu", {})
            if cpu_desc() not in base["seconds_by_cpu"]:
                base["seconds_by_cpu"][cpu_desc()] = evaluate(a, test)["seconds"]
                with open(base_path, "w") as f:
                    json.dump(base, f)
            base = dict(base, seconds=base["seconds_by_cpu"][cpu_desc()])
        for spec in method_specs(a):
            method = spec.partition(":")[0]
            both = joint_train(a, model_dir) if method in JOINT and "," in a.tasks else None
            if a.budget:
                spec = sized(a, both[0] if both else train, spec, info, probes)
                with open(probes_path, "w") as f:
                    json.dump(probes, f)
            out = os.path.join(work, safe(spec) + ".json")
            # a result of this run's folder, or the committed copy next to the report (a fresh
            # checkout continues from those without training them again)
            committed = os.path.join(os.path.dirname(a.report) or ".", "comparison",
                                     f"{a.model.replace(':', '_')}-{task.replace('/', '_')}-"
                                     f"{spec.replace(':', '_')}.json")
            kept = (json.load(open(out if os.path.exists(out) else committed))
                    if os.path.exists(out) or os.path.exists(committed) else None)
            # a later task's result trained at a rate the first task's sweep has since replaced
            stale = (kept is not None and ti > 0 and spec in chosen
                     and not math.isclose(kept.get("lr", EARLIER_LR), chosen[spec]))
            # or a joint result trained on other tasks than these
            stale |= (kept is not None and method in JOINT
                      and sorted(kept.get("trained_on", [])) != sorted(a.tasks.split(",")))
            if ti == 0 and kept is not None and "lr_sweep" in kept:
                chosen.setdefault(spec, kept["lr"])  # a fresh checkout's committed copy
            if a.retime:  # speed and memory measured again, nothing trained or scored
                if kept is None:
                    print(f"{task} {spec}: no result to time again", flush=True)
                    continue
                r, again = kept, kept.get("retimed", {})
                if (again.get("cpu"), again.get("petal"), again.get("steps")) != (
                        cpu_desc(), petal_build(a), a.retime):
                    try:  # a joint method trains once for every task: timed once
                        r["retimed"] = (joint_timed.get(spec)
                                        or timed_again(a, task, spec, both[0] if both else train, r))
                    except SystemExit as e:
                        print(f"{task} {spec}: not timed again: {e}", flush=True)
                        continue
                    if both:
                        joint_timed[spec] = r["retimed"]
                    with open(out, "w") as f:
                        json.dump(r, f)
                print(f"{task} {spec}: timed again, {r['retimed']['train_tokens_per_s']:.0f} tokens/s, "
                      f"{r['retimed']['peak_rss_mb']:.0f} MB", flush=True)
            elif kept is not None and not (ti == 0 and extendable(a, kept)) and not stale:
                r = kept
                print(f"{task} {spec}: kept ({r['accuracy']:.3f})", flush=True)
            else:
                t0 = time.time()
                try:
                    if method in JOINT:
                        r = joint(a, task, spec, *(both or (train, work)), test, base, chosen,
                                  None if stale else kept)
                        with open(out, "w") as f:
                            json.dump(r, f)
                    elif a.lr_sweep and ti == 0:
                        r = sweep(a, task, spec, train, test, base, work, chosen, kept)
                        with open(out, "w") as f:
                            json.dump(r, f)
                    else:
                        # a rate of the first task's sweep: the result says where it came from
                        origin = (dict(rates_from=dict(task=a.tasks.split(",")[0], lr_extend=a.lr_extend,
                                                       lr_sweep=[f"{x:g}" for x in a.lr_sweep]))
                                  if spec in chosen else {})
                        r = run_one(a, task, spec, train, test, base, out, chosen.get(spec, a.lr), **origin)
                except SystemExit as e:  # a method that cannot run here: said, not kept
                    print(f"{task} {spec}: failed: {e}", flush=True)
                    failed.append((task, spec, str(e)))
                    continue
                with open(lrs_path, "w") as f:
                    json.dump(chosen, f)
                print(f"{task} {spec}: accuracy {r['accuracy']:.3f}, {r['trainable_params']:,} trainable, "
                      f"{time.time() - t0:.0f} s", flush=True)
            r["base_accuracy"] = base["accuracy"]
            retime(r, base)
            results.append(r)
        # the results of earlier runs with other methods, same model and task (same settings:
        # the work folder is per model and task, and the split is made once)
        # and the committed copies next to the report (a fresh checkout continues from them)
        copy = os.path.join(os.path.dirname(a.report) or ".", "comparison")
        prefix = f"{a.model.replace(':', '_')}-{task.replace('/', '_')}-"
        kept = [os.path.join(work, n) for n in sorted(os.listdir(work))
                if n.endswith(".json") and n != "base.json"]
        if os.path.isdir(copy):
            kept += [os.path.join(copy, n) for n in sorted(os.listdir(copy))
                     if n.startswith(prefix) and n.endswith(".json")]
        for path in kept:
            r = json.load(open(path))
            given = {r["method"] for r in results if r["task"] == task}
            if r.get("method") and r["method"] not in given and r.get("task") == task:
                r["base_accuracy"] = base["accuracy"]
                retime(r, base)
                results.append(r)
    copy = os.path.join(os.path.dirname(a.report) or ".", "comparison")
    os.makedirs(copy, exist_ok=True)
    for r in results:
        name = f"{r['model'].replace(':', '_')}-{r['task'].replace('/', '_')}-{r['method'].replace(':', '_')}.json"
        with open(os.path.join(copy, name), "w") as f:  # the adapter's path is this machine's
            json.dump({k: v for k, v in r.items() if k != "adapter"}, f, indent=1)
    # methods that could not run, kept until they do (the report covers every sitting's runs);
    # and results withdrawn (`"withdrawn": true`: made with a bug since fixed), until run again
    failed_path = os.path.join(copy, "failed.json")
    kept_failed = json.load(open(failed_path)) if os.path.exists(failed_path) else []
    ran = {(r["model"], r["task"], r["method"]) for r in results}
    now = {(a.model, t, s) for t, s, _ in failed}
    kept_failed = [f for f in kept_failed if (f["model"], f["task"], f["method"]) not in ran | now]
    kept_failed += [dict(model=a.model, task=t, method=s, why=w) for t, s, w in failed]
    with open(failed_path, "w") as f:
        json.dump(kept_failed, f, indent=1)
    # the report: every committed result, of this run and of earlier ones (other tasks, models)
    everything = {(r["model"], r["task"], r["method"]): r for r in results}
    for n in sorted(os.listdir(copy)):
        if n.endswith(".json") and n != "failed.json":
            r = json.load(open(os.path.join(copy, n)))
            everything.setdefault((r["model"], r["task"], r["method"]), r)
    report(a, list(everything.values()),
           [(f"{f['task']} on {f['model']}", f["method"], f["why"], f.get("withdrawn", False))
            for f in kept_failed])

if __name__ == "__main__":
    main()
