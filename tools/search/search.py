#!/usr/bin/env python3
"""Hyperparameter and method search for petal on Optuna: TPE (Bayesian optimisation) proposes a
trial's settings, `petal train` runs it, and the Hyperband pruner stops a trial early from the
held-out losses petal writes every `eval_every` steps. The method itself is a parameter
(NOAH's question: which of prompt, adapter and LoRA suits the task, answered by search), each
method with its own options (a conditional space).

The Python side drives: Optuna is a Python library whose sampler and pruner run in the process
that asks for trials, so this driver asks, runs `petal train` (a process per trial, the same
command a user runs) and tells; several machines work on one study by running it against the
same RDB storage (a database URL; SQLite for one machine). Killing the search and starting it
again continues the study: finished trials are kept, the ones the kill interrupted are marked
failed, and it runs until the study holds `trials` finished ones.

    python tools/search/search.py --config space.toml [--petal target/release/petal]

space.toml (see docs/search.md):

    study = "shakespeare"                       # the study's name in the storage
    storage = "sqlite:///runs/search/study.db"  # an Optuna RDB URL
    out = "runs/search"                         # trial runs, best.toml, plots
    base = "examples/shakespeare-lora.toml"     # a petal train config every trial starts from
    trials = 20                                 # finished (complete or pruned) trials wanted
    sampler = "tpe"                             # tpe | random
    startup_trials = 3                          # TPE's random first trials (default trials / 3)
    pruner = "hyperband"                        # hyperband | median | none
    objective = "eval_loss"                     # eval_loss (minimised) | accuracy (with task)
    # task = "elementary_math_qa"; task_max_examples = 50
    seed = 0

    [params]                                    # petal train keys
    lr = { low = 1e-4, high = 1e-2, log = true }
    method = { choices = ["lora", "loha", "ia3"] }
    [params.lora]                               # a method's options, under its PEFT keys
    r = { choices = [4, 8, 16] }
    lora_dropout = { low = 0.0, high = 0.1 }

Writes OUT/trials/N (each trial's run folder), OUT/results.md (the table), OUT/best.toml (the
best trial as a runnable `petal train --config`), OUT/history.svg and OUT/importance.svg.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import warnings

TRAIN_KEYS = ["lr", "schedule", "warmup_steps", "batch_size", "grad_accum", "max_grad_norm",
              "target_modules", "exclude_modules", "seq_len", "method", "max_steps"]


def fail(msg):
    print(f"petal search: {msg}", file=sys.stderr)
    sys.exit(2)


def read_space(path):
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        fail(f"{path}: not valid TOML: {e}")
    for k in ["study", "storage", "out", "base", "trials"]:
        if k not in cfg:
            fail(f"{path}: no `{k}` key")
    known = {"study", "storage", "out", "base", "trials", "sampler", "pruner", "objective", "task",
             "task_max_examples", "seed", "params", "startup_trials"}
    for k in cfg:
        if k not in known:
            fail(f"{path}: unknown key `{k}` (known: {', '.join(sorted(known))})")
    if not isinstance(cfg["trials"], int) or cfg["trials"] < 1:
        fail(f"{path}: `trials` must be a whole number >= 1")
    if not isinstance(cfg.get("params", {}), dict):
        fail(f"{path}: `params` must be a table ([params])")
    for k in ("seed", "startup_trials", "task_max_examples"):
        if k in cfg and (not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] < 0):
            fail(f"{path}: `{k}` must be a whole number >= 0, not {cfg[k]!r}")
    if cfg.get("objective", "eval_loss") not in ("eval_loss", "accuracy"):
        fail(f"{path}: `objective` must be eval_loss or accuracy")
    if cfg.get("objective") == "accuracy" and "task" not in cfg:
        fail(f"{path}: `objective = \"accuracy\"` needs a `task` (petal eval --task)")
    return cfg


def check_param(where, name, spec):
    """A parameter's range: {low, high[, log, step]} or {choices}; a clear error otherwise."""
    if not isinstance(spec, dict):
        fail(f"{where}: `{name}` must be a table: {{ low = .., high = .. }} or {{ choices = [..] }}")
    unknown = set(spec) - {"choices", "low", "high", "log", "step", "log_float"}
    if unknown:
        fail(f"{where}: `{name}`: unknown key `{sorted(unknown)[0]}` (low, high, log, step or choices)")
    if "choices" in spec:
        if not isinstance(spec["choices"], list):
            fail(f"{where}: `{name}`: `choices` must be a list, not {spec['choices']!r}")
        if not spec["choices"]:
            fail(f"{where}: `{name}`: `choices` is empty")
        return
    if "low" not in spec or "high" not in spec:
        fail(f"{where}: `{name}` needs `low` and `high`, or `choices`")
    lo, hi = spec["low"], spec["high"]
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if not (number(lo) and number(hi)):
        fail(f"{where}: `{name}`: `low` and `high` must be numbers, not {lo!r} and {hi!r}")
    if not isinstance(spec.get("log", False), bool):
        fail(f"{where}: `{name}`: `log` must be true or false, not {spec['log']!r}")
    if "step" in spec and not (number(spec["step"]) and spec["step"] > 0):
        fail(f"{where}: `{name}`: `step` must be a number > 0, not {spec['step']!r}")
    if not lo < hi:
        fail(f"{where}: `{name}`: the range [{lo}, {hi}] is empty (low must be below high)")
    if spec.get("log") and lo <= 0:
        fail(f"{where}: `{name}`: a log range needs low > 0, not {lo}")


def check_space(path, cfg, methods):
    params = cfg.get("params", {})
    options = {m["method"]: {o["key"] for o in m["options"]} for m in methods}
    for name, spec in params.items():
        if name in options and isinstance(spec, dict) and "choices" not in spec and "low" not in spec:
            for key, s in spec.items():
                if key not in options[name]:
                    fail(f"{path}: [params.{name}]: unknown option `{key}` of {name} "
                         f"(known: {', '.join(sorted(options[name]))})")
                check_param(f"{path}: [params.{name}]", key, s)
            continue
        if name not in TRAIN_KEYS:
            fail(f"{path}: [params]: unknown parameter `{name}` (known: {', '.join(TRAIN_KEYS)}, "
                 f"or a method's table such as [params.lora])")
        check_param(f"{path}: [params]", name, spec)
    if "method" in params and "choices" in params["method"]:
        for m in params["method"]["choices"]:
            if m not in options:
                fail(f"{path}: [params] method: unknown method `{m}` (known: {', '.join(sorted(options))})")


def suggest(trial, name, spec):
    if "choices" in spec:
        return trial.suggest_categorical(name, spec["choices"])
    lo, hi = spec["low"], spec["high"]
    if isinstance(lo, int) and isinstance(hi, int) and not spec.get("log_float"):
        return trial.suggest_int(name, lo, hi, log=bool(spec.get("log")), step=spec.get("step", 1))
    return trial.suggest_float(name, float(lo), float(hi), log=bool(spec.get("log")))


def settings(trial, params, base):
    """The trial's train keys and its method's options (suggested in that order: the method
    first, then only its own options)."""
    top, table = {}, {}
    for name, spec in params.items():
        if isinstance(spec, dict) and "choices" not in spec and "low" not in spec:
            continue  # a method's table
        top[name] = suggest(trial, name, spec)
    method = top.get("method", base.get("method", "lora"))
    for key, spec in params.get(method, {}).items():
        table[key] = suggest(trial, f"{method}.{key}", spec)
    return top, method, table


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise ValueError(f"cannot write {v!r} as TOML")


SHARED = {"r": "--r", "alpha": "--alpha", "dropout": "--dropout"}
SHARED_OF = {}  # each method's shared flags (petal methods --json)


def write_config(path, base, top, method, table, out, comment="", shared=None):
    """`base` with the trial's settings as a petal train config; the base's shared flags (r,
    alpha, dropout) that `method` has no option for, or whose option the trial sets in the
    method's table, are left out (a top-level key would win over the table; `shared`: the
    method's entry of `petal methods --json`)."""
    cfg = dict(base)
    for key, flag in SHARED.items():
        if shared is not None and (flag not in shared or shared[flag] in (table or {})):
            cfg.pop(key, None)
    cfg.update(top)
    cfg["method"] = method
    cfg["out"] = out
    tables = {k: v for k, v in cfg.items() if isinstance(v, dict)}
    if table:
        tables[method] = {**tables.get(method, {}), **table}
    lines = [f"# {comment}"] if comment else []
    lines += [f"{k} = {toml_value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for name, t in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in t.items()]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def run_trial(trial, a, cfg, base, params):
    import optuna
    top, method, table = settings(trial, params, base)
    run = os.path.join(cfg["out"], "trials", str(trial.number))
    os.makedirs(os.path.dirname(run), exist_ok=True)
    conf = os.path.join(cfg["out"], "trials", f"{trial.number}.toml")
    write_config(conf, base, top, method, table, run, f"trial {trial.number} of study {cfg['study']}",
                 SHARED_OF.get(method))
    log = open(os.path.join(cfg["out"], "trials", f"{trial.number}.log"), "w")
    p = subprocess.Popen([a.petal, "train", "--config", conf], stdout=log, stderr=subprocess.STDOUT)
    try:
        return watch(p, trial, a, cfg, base, run, conf, log.name)
    finally:
        if p.poll() is None:  # stopped (SIGTERM, Ctrl-C) while the trial ran: it goes too
            p.terminate()
            p.wait()


def watch(p, trial, a, cfg, base, run, conf, log):
    """Reports the run's held-out losses as they come (pruning it when the pruner says so),
    then the trial's value."""
    import optuna
    metrics, seen, last = os.path.join(run, "metrics.jsonl"), 0, None
    prune = cfg.get("objective", "eval_loss") == "eval_loss" and cfg.get("pruner", "hyperband") != "none"
    while True:
        done = p.poll() is not None
        if os.path.exists(metrics):
            with open(metrics) as f:
                rows = [json.loads(l) for l in f if l.strip()]
            for r in rows[seen:]:
                if "eval_loss" in r:
                    last = r["eval_loss"]
                    if prune:
                        trial.report(last, r["step"])
            seen = len(rows)
            if prune and last is not None and trial.should_prune():
                p.terminate()
                p.wait()
                raise optuna.TrialPruned()
        if done:
            break
        time.sleep(0.2)
    if p.returncode != 0:
        with open(log) as f:
            tail = f.read().strip().splitlines()[-1:]
        raise RuntimeError(f"petal train exited with {p.returncode}: {' '.join(tail)}")
    trial.set_user_attr("run", run)
    trial.set_user_attr("config", conf)
    if cfg.get("objective", "eval_loss") == "accuracy":
        cmd = [a.petal, "eval", "--model", base.get("model", "asset:smollm2"), "--adapter",
               os.path.join(run, "adapter"), "--task", cfg["task"], "--json"]
        if cfg.get("task_max_examples"):
            cmd += ["--max-examples", str(cfg["task_max_examples"])]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"petal eval: {r.stderr.strip()}")
        return json.loads(r.stdout)["accuracy"]
    if last is None:
        raise RuntimeError("the run wrote no eval_loss (set eval_every in the base config)")
    return last


def report(study, cfg, base, params):
    import optuna
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    head = "| trial | state | value | " + " | ".join(names) + " | seconds |"
    rows = [head, "|" + "---|" * (len(names) + 4)]
    for t in trials:
        secs = f"{(t.datetime_complete - t.datetime_start).total_seconds():.1f}" if t.datetime_complete else ""
        val = f"{t.value:.4f}" if t.value is not None else ""
        cells = [f"{t.params[n]:.3g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, ""))
                 for n in names]
        rows.append(f"| {t.number} | {t.state.name.lower()} | {val} | " + " | ".join(cells) + f" | {secs} |")
    table = "\n".join(rows)
    with open(os.path.join(cfg["out"], "results.md"), "w") as f:
        f.write(f"# Study `{cfg['study']}`\n\n{table}\n")
    print(table)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        print("no trial has completed yet")
        return
    best = study.best_trial
    top = {k: v for k, v in best.params.items() if "." not in k}
    method = top.pop("method", base.get("method", "lora"))
    table = {k.split(".", 1)[1]: v for k, v in best.params.items() if k.startswith(f"{method}.")}
    out = os.path.join(cfg["out"], "best")
    write_config(os.path.join(cfg["out"], "best.toml"), base, top, method, table, out,
                 f"best of study {cfg['study']}: trial {best.number}, {cfg.get('objective', 'eval_loss')} {best.value:.4f}",
                 SHARED_OF.get(method))
    print(f"best: trial {best.number} ({best.value:.4f}) -> {os.path.join(cfg['out'], 'best.toml')}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis
    ax = vis.plot_optimization_history(study)
    ax.figure.savefig(os.path.join(cfg["out"], "history.svg"), bbox_inches="tight")
    plt.close("all")
    if len(done) >= 2 and names:
        ax = vis.plot_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        ax.figure.savefig(os.path.join(cfg["out"], "importance.svg"), bbox_inches="tight")
        plt.close("all")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the search space (space.toml)")
    ap.add_argument("--petal", default="target/release/petal", help="the petal binary")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a clean stop: the running trial too
    warnings.filterwarnings("ignore", module="optuna")
    cfg = read_space(a.config)
    try:
        with open(cfg["base"], "rb") as f:
            base = tomllib.load(f)
    except OSError as e:
        fail(f"{a.config}: base `{cfg['base']}`: {e.strerror}")
    if not os.access(a.petal, os.X_OK):
        fail(f"--petal {a.petal}: not an executable (build it: cargo build --release)")
    methods = json.loads(subprocess.run([a.petal, "methods", "--json"], capture_output=True,
                                        text=True, check=True).stdout)
    params = cfg.get("params", {})
    check_space(a.config, cfg, methods)
    SHARED_OF.update({m["method"]: m.get("shared", {}) for m in methods})
    import optuna
    from optuna.trial import TrialState
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.makedirs(cfg["out"], exist_ok=True)
    seed = cfg.get("seed", 0)
    # TPE draws its first trials at random (Optuna's default: 10); a third of a short study
    startup = cfg.get("startup_trials", max(2, min(10, cfg["trials"] // 3)))
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                         n_startup_trials=startup),
               "random": lambda: optuna.samplers.RandomSampler(seed=seed)}.get(cfg.get("sampler", "tpe"))
    if sampler is None:
        fail(f"{a.config}: `sampler` must be tpe or random")
    steps = base.get("max_steps", 100)
    every = base.get("eval_every", max(1, steps // 5))
    pruner = {"hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=every, max_resource=steps),
              "median": lambda: optuna.pruners.MedianPruner(n_warmup_steps=every),
              "none": lambda: optuna.pruners.NopPruner()}.get(cfg.get("pruner", "hyperband"))
    if pruner is None:
        fail(f"{a.config}: `pruner` must be hyperband, median or none")
    direction = "maximize" if cfg.get("objective") == "accuracy" else "minimize"
    try:
        study = optuna.create_study(study_name=cfg["study"], storage=cfg["storage"], sampler=sampler(),
                                    pruner=pruner(), direction=direction, load_if_exists=True)
    except Exception as e:  # noqa: BLE001 (the storage's own error, whatever its kind)
        fail(f"{a.config}: storage `{cfg['storage']}` cannot be opened: {str(e).splitlines()[0]}")
    # trials a kill interrupted (still marked running) will never finish
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        print(f"trial {t.number}: interrupted earlier, marked failed")
    finished = lambda: len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    print(f"study {cfg['study']}: {finished()} of {cfg['trials']} trials finished", flush=True)
    while finished() < cfg["trials"]:
        trial = study.ask()
        try:
            value = run_trial(trial, a, cfg, base, params)
            study.tell(trial, value)
            state = f"{cfg.get('objective', 'eval_loss')} {value:.4f}"
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            state = "pruned"
        except RuntimeError as e:
            study.tell(trial, state=TrialState.FAIL)
            state = f"failed: {e}"
        print(f"trial {trial.number} {trial.params}: {state}", flush=True)
        if len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) > 3 * cfg["trials"]:
            fail("too many trials failed: see the logs in OUT/trials")
    report(study, cfg, base, params)


if __name__ == "__main__":
    main()
