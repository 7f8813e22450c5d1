"""The comparison's methods and their sizes (tools/compare/run.py): which methods `petal
methods` has and the specs a command names, checked before any run, and each method sized to
the trainable-parameter budget (`--budget`) by probing `petal train --max-steps 0`; with the
shell helper and the methods trained on every task at once, which run.py shares."""
import json
import math
import os
import subprocess


def sh(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{what}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return r.stdout


# methods trained once on every task of the command together, with their training flags
# (PaLoRA: one LoRA per task, mixed by a preference); a task's row is that run scored at the
# task's vertex of the preference (1 for it, 0 for the others)
JOINT = {"palora": ["--task-sampling", "balanced"]}


# a method's size option where it is not the rank (`--r`): the trainable parameters equal its
# value, grow in proportion to it, or grow with it in whole steps
EXACT = {"rps": "budget", "intrinsic": "d"}
LINEAR = {"fish": "density"}
STEPS = {"prompt_tuning": "num_virtual_tokens", "prefix_tuning": "num_virtual_tokens",
         "p_tuning": "num_virtual_tokens", "mov": "num_experts"}


def methods_info(a):
    """method -> its entry of `petal methods --json` (options and their defaults, shared flags);
    a variant (LoRA's "dora") -> its method's entry, so that it is sized as the method is."""
    info = {}
    for m in json.loads(sh([a.petal, "methods", "--json"], "petal methods")):
        info[m["method"]] = m
        info.update({v: m for v in m.get("variants", [])})
    return info


def method_specs(a):
    """--methods as specs: separated by `;` where one holds several options (a trailing `;`
    makes a single such spec one), else by `,`."""
    return [x.strip() for x in a.methods.split(";" if ";" in a.methods else ",") if x.strip()]


def check_args(a, info):
    """Refuse what no run could use, before any work, in one line: a method spec whose name is
    no method of `petal methods` or whose options are not KEY=VALUE keys of it, and a rate of
    --lr-sweep that is not positive."""
    if not method_specs(a):
        raise SystemExit("--methods: give at least one method (petal methods lists them)")
    for spec in method_specs(a):
        method, _, opts = spec.partition(":")
        if method not in info:
            raise SystemExit(f"--methods: `{spec}`: no method `{method}` (petal methods lists them)")
        keys = {o["key"] for o in info[method].get("options", [])}
        for kv in filter(None, opts.split(",")):
            key, eq, _ = kv.partition("=")
            if not eq or key.strip() not in keys:
                raise SystemExit(f"--methods: `{spec}`: `{kv}` is not KEY=VALUE with a key of {method} "
                                 f"({', '.join(sorted(keys))})")
    if a.lr_sweep is not None and not all(x > 0 and math.isfinite(x) for x in a.lr_sweep):
        raise SystemExit(f"--lr-sweep: every rate must be positive, not {a.lr_sweep}")


# methods whose trainable parameters are known only once steps have run, with the options that
# make those steps few (FISH's mask is chosen after its Fisher estimate: one sequence of it is
# enough; RoSA's sparse mask after its warm-up)
PROBE_STEPS = {"fish": (1, ["fisher_samples=1"]), "rosa": (2, ["schedule=wl0"])}


def probe(a, train, spec, cache):
    """Trainable parameters of `spec` on the model (`petal train --max-steps 0`, or PROBE_STEPS'
    few steps of batch 1), cached."""
    method, _, opts = spec.partition(":")
    # a joint method's count depends on its data's tasks (a single task's file refuses it)
    key = f"{spec} on {os.path.basename(os.path.dirname(train))}" if method in JOINT else spec
    if key not in cache:
        steps, fast = PROBE_STEPS.get(method, (0, []))
        cmd = [a.petal, "train", "--model", a.model, "--data", train, "--method", method,
               "--max-steps", str(steps), "--batch-size", "1",
               "--seq-len", str(a.seq_len), "--max-eval-examples", "1", "--json",
               "--out", os.path.join(a.out, ".probe"), "--overwrite", "true"]
        for o in [*filter(None, opts.split(",")), *fast]:  # the fast options win
            cmd += ["--set", o]
        try:
            cache[key] = json.loads(sh(cmd, f"sizing {spec}"))["trainable_params"]
        except SystemExit:  # a size the model's shapes refuse (a block count that does not divide)
            cache[key] = None
    return cache[key]


def sized(a, train, spec, info, cache):
    """`spec` with its size option set so its trainable parameters come closest to --budget
    (on a log scale); unchanged when the spec sets it already or the method has no size."""
    method, _, opts = spec.partition(":")
    given = {o.split("=")[0] for o in filter(None, opts.split(","))}
    rank = info.get(method, {}).get("shared", {}).get("--r")
    key = rank or EXACT.get(method) or LINEAR.get(method) or STEPS.get(method)
    if key is None or key in given:
        return spec
    with_ = lambda v: f"{method}:{','.join(filter(None, [opts, f'{key}={v}']))}"
    if method in EXACT:
        return with_(a.budget)
    if method in LINEAR:
        n = probe(a, train, spec, cache)
        default = next(o["default"] for o in info[method]["options"] if o["key"] == key)
        return with_(f"{min(1.0, default * a.budget / n):.6g}") if n else spec
    best, last = None, None
    for v in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]:
        n = probe(a, train, with_(v), cache)
        if n:
            gap = abs(math.log(n / a.budget))
            if best is None or gap < best[0]:
                best = (gap, v)
            # past the budget and growing with the size (OFT's count shrinks as its block
            # count grows: its sizes are all probed)
            if n > 2 * a.budget and last is not None and n >= last:
                break
            last = n
    return with_(best[1]) if best else spec
