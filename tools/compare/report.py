"""The method-comparison report (docs/comparison.md and its plots) written from the results
tools/compare/run.py keeps: a section per model and task, with the command that makes it."""
import os

# the CPU and learning rate of the results made before each result recorded its own
# (2026-12-01..03 sessions)
EARLIER_CPU = "AMD EPYC (AVX-512, AVX512-BF16)"
EARLIER_LR = 2e-3


DEFAULT_REPORT = "docs/comparison.md"

# what a result depends on besides its model, task, method and learning rate; results made
# before they were recorded (2026-12-01..03) had these
SETTINGS = ("train", "test", "steps", "seq_len", "batch_size", "seed", "max_prompt_chars", "budget", "chat")
EARLIER_SETTINGS = dict(train=400, test=100, steps=40, seq_len=192, batch_size=4, seed=0,
                        max_prompt_chars=None, budget=None)


def settings(a):
    """The settings results are comparable under; `chat` only where on (earlier results have
    none)."""
    return {k: getattr(a, k) for k in SETTINGS if k != "chat" or a.chat}


def section_command(a, model, task, rs):
    """The command that gives a section's rows (kept results are not run again)."""
    st = rs[0].get("settings", EARLIER_SETTINGS)
    specs = sorted({r["method"] for r in rs})  # the same results, the same command
    methods = (";" if any("," in m for m in specs) else ",").join(specs)
    # the rows trained on this task alone decide the rates (a joint row sweeps its joint data)
    own = [r for r in rs if "trained_on" not in r] or rs
    lrs = {r.get("lr", EARLIER_LR) for r in own}
    # rows trained at the rates another task's sweep chose: the command sweeps that task first;
    # rows swept here: this task first; rows trained on several tasks together (PaLoRA): the
    # command gives them all
    origin = rates_origin(rs)
    first = [origin["task"]] if origin else [task] if any("lr_sweep" in r for r in own) else []
    together = next((r["trained_on"] for r in rs if "trained_on" in r), [])
    tasks = ",".join(dict.fromkeys([*first, *together, task]))
    args = ["--model", model, "--tasks", tasks, "--methods", f"'{methods}'" if ";" in methods else methods]
    for k in SETTINGS:
        if st.get(k) is True:
            args.append(f"--{k}")
        elif st.get(k) is not None:
            args += [f"--{k.replace('_', '-')}", str(st[k])]
    swept = next((r.get("lr_sweep_given", r["lr_sweep"]) for r in own if "lr_sweep" in r), None)
    if origin:
        swept = origin["lr_sweep"]
    if swept:
        args += ["--lr-sweep", ",".join(swept)]
        extend = origin["lr_extend"] if origin else max(r.get("lr_extend", 0) for r in own)
        if extend:
            args += ["--lr-extend", str(extend)]
    elif len(lrs) == 1:
        args += ["--lr", f"{lrs.pop():g}"]
    if a.report != DEFAULT_REPORT:  # a report of its own keeps its runs apart too
        args += ["--out", a.out, "--report", a.report]
    return "python3 tools/compare/run.py --petal target/release/petal " + " ".join(args)


# what a row's figures mean where they differ from the other methods'
NOTES = {
    "ks_lottery": "the trainable count is its first stage's (the whole token embedding, tuned to "
                  "find the winning tokens); the second stage trains and the adapter keeps only the "
                  "top_k tokens' rows (top_k x hidden values).",
    "pasta": "PASTA shifts the hidden states of special tokens alone; a prompt here holds none "
             "(SmolLM2's tokenizer adds no BOS), only the end-of-text token after the answer, "
             "which cannot reach the answer's loss: nothing it trains changes the scores (the "
             "same validation loss at every rate, the base's accuracy). Under `--chat` the "
             "template's turn markers are special tokens before the answer.",
    "palora": "trained once on every task of the section's command together (one LoRA per task, "
              "mixed by a preference; `--task-sampling balanced`, so a step holds half as many of this "
              "task's examples as another method's, and runs one forward and backward per preference "
              "ray, 2 a step), its learning rate swept on that joint data, and scored here at this "
              "task's vertex of the preference (`--preference`: 1 for this task, 0 for the others); its "
              "trainable parameters are the whole adapter's (r per task).",
}
# notes that hold only without --chat
PLAIN_ONLY = {"pasta"}


def rates_origin(rs):
    """How a section's rates were chosen when another task's sweep chose them (`rates_from`:
    that task, its sweep and --lr-extend), else None."""
    return next((r["rates_from"] for r in rs if "rates_from" in r), None)


def at_end(r):
    """Whether a swept row's rate is the lowest or the highest of the rates it tried."""
    rates = sorted(float(lr) for lr in r.get("lr_sweep", {}))
    return len(rates) > 1 and r.get("lr") in (rates[0], rates[-1])


def speed(r):
    """A row's training tokens/s, peak RSS (MB), and the CPU and build that measured them: those
    of its run timed again (`--retime`) where it was, else of its own training."""
    t = r.get("retimed")
    if t:
        return t["train_tokens_per_s"], t["peak_rss_mb"], t["cpu"], t["petal"]
    return r["train_tokens_per_s"], r["peak_rss_mb"], r.get("cpu", EARLIER_CPU), r.get("petal", "unknown")


def report(a, results, failed=()):
    by_task = {}
    for r in results:
        by_task.setdefault((r["model"], r["task"]), []).append(r)
    # speed and memory depend on the CPU and on petal's build: one letter for each pair
    def made(r):
        return speed(r)[2:]

    pairs = list(dict.fromkeys(made(r) for r in results))
    mark = {p: "" if len(pairs) == 1 else chr(ord("a") + i) for i, p in enumerate(pairs)}

    def which(r):  # the letter of a row's CPU and build when there are several
        m = mark[made(r)]
        return f" ({m})" if m else ""

    def build(b):
        return ("a build whose version names no commit (made before 7988df9)" if b == "unknown"
                else f"petal built from {b}")

    if len(pairs) == 1:
        cpu_line = f"CPU: {pairs[0][0]}, {os.cpu_count()} threads; {build(pairs[0][1])}."
    else:
        cpu_line = ("Speed and memory were measured on several CPUs or builds of petal (the letter after "
                    "a row's tokens/s): "
                    + "; ".join(f"({mark[p]}) {p[0]}, {build(p[1])}" for p in pairs)
                    + "; 2 threads. Accuracy does not depend on the CPU; tokens/s and memory do, and on "
                    "the build (a row's letter says which rows compare).")
    lines = ["# Method comparison", "",
             "Every method trained with the same budget on each task (the prompt -> the right answer, "
             "the loss on the answer only), scored on held-out examples by `petal eval --task`. Made by "
             "`tools/compare/run.py` (each section's command; results are kept, so a command continues "
             f"where it stopped); results in `{os.path.join(os.path.dirname(a.report), 'comparison')}/*.json`.",
             "", cpu_line, "",
             "Training tokens/s: a step's budget, --batch-size x --seq-len tokens, over the run's median "
             "step time. Every method of a section sees the same batches, so the column compares "
             "methods; the tokens trained on are fewer (shorter examples, padded to the batch's "
             "longest), and a prompt's tokens are read but not scored.", ""]
    again = sorted({r["retimed"]["steps"] for r in results if r.get("retimed")})
    if again:
        lines += [f"Training tokens/s and peak RSS of {sum(1 for r in results if r.get('retimed'))} of "
                  f"{len(results)} rows are those of their training run again for "
                  f"{' or '.join(map(str, again))} steps in one sitting (`--retime`), so they compare "
                  "across the builds and machines that made the rows"
                  + ("." if all(r.get("retimed") for r in results) else "; the others', of their own training."), ""]
    for (model, task), rs in sorted(by_task.items()):
        base = rs[0].get("base_accuracy")
        n = rs[0]["examples"]
        st = rs[0].get("settings", EARLIER_SETTINGS)
        se = (0.25 / n) ** 0.5  # the largest standard error of an accuracy over n examples
        lines += [f"## {task} on {model}", "",
                  f"`{section_command(a, model, task, rs)}`", "",
                  (f"Base model without an adapter: accuracy {base:.3f}. " if base is not None else "")
                  + f"{st['train']} training and {n} held-out examples"
                  + (f" (of those whose prompt has at most {st['max_prompt_chars']} characters)"
                     if st.get("max_prompt_chars") else "")
                  + f"; an accuracy's standard error is up to {se:.3f}, so differences below about "
                  f"{2 * se:.2f} are within noise. {rs[0]['steps']} training steps a method, batch "
                  f"{st['batch_size']} x {st['seq_len']} tokens, seed {st['seed']}.", ""]
        if st.get("chat"):
            lines += ["Every prompt asked through the model's chat template (`petal eval --chat`: the task's "
                      "description a system turn, the question a user turn), and trained on the same "
                      "conversations with the answer as the assistant's turn.", ""]
        if st.get("budget"):
            lines += [f"Each method with a size option (its rank, or the size RPS, intrinsic dimension, FISH, "
                      f"the prompts and MoV have) sized to the nearest of about {st['budget']:,} trainable "
                      "parameters (the size after the method's name); the others keep their own size.", ""]
        own = [r for r in rs if "trained_on" not in r]  # joint rows' sweeps are their note's
        if any("lr_sweep" in r for r in own):
            extend = max(r.get("lr_extend", 0) for r in own)
            lines += ["Learning rate: the lowest validation loss (5% of the training examples, not the test "
                      "ones) of the rates swept on the first task, reused on the other tasks"
                      + (f"; where it was at an end of the sweep, up to {extend} more rates beyond that end were "
                         "tried (the sweep's ratio)" if extend else "") + ".", ""]
            ends = [r for r in rs if at_end(r)]
            if ends:
                lines += [f"{len(ends)} of {len(rs)} rows (lr marked *) have their lowest validation loss at an end "
                          "of the rates they tried (listed in the last column), so their best rate may lie "
                          "beyond it.", ""]
        elif rates_origin(rs):
            lines += [f"Learning rate: each method's rate from its sweep on {rates_origin(rs)['task']} (the "
                      "lowest validation loss there), not swept again on this task.", ""]
        if any("generated_tokens" in r for r in rs):
            lines += ["Generation: the unmerged evaluation time is per generated token, against the base "
                      "model's. Both decode up to 8 prompts together, a finished answer's place taken by the "
                      "next prompt (rows made with petal before commit 1b948cc decoded fixed groups of 8, each "
                      "waiting for its longest answer; before d9a8b46 an input-side adapter, such as prompt "
                      "tuning, decoded one prompt at a time). "
                      "Each prompt is read once however long its answer, so an adapter whose answers run "
                      "longer than the base's spreads that cost over more tokens: the column mixes the "
                      "adapter's cost with its answers' lengths, and below 1x is no gain.", ""]
        swept = any("lr_sweep" in r for r in rs)  # each rate's validation loss, in a column
        lines += ["| method | accuracy | acc_norm | trainable params | lr | peak RSS | training tokens/s | unmerged eval time vs base |"
                  + (" validation loss by lr |" if swept else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if swept else "")]
        for r in sorted(rs, key=lambda r: (-r["accuracy"], r["method"])):
            norm = f"{r['acc_norm']:.3f}" if r.get("acc_norm") is not None else ""
            by_lr = ", ".join(f"{lr}: {v:.4f}" for lr, v in r.get("lr_sweep", {}).items())
            lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {norm} | {r['trainable_params']:,} | "
                         f"{r.get('lr', EARLIER_LR):g}{'*' if at_end(r) else ''} | {speed(r)[1] / 1024:.2f} GB | {speed(r)[0]:.0f}{which(r)} | "
                         f"{r['inference_overhead']:.2f}x |" + (f" {by_lr} |" if swept else ""))
        lines.append("")
        for method, note in NOTES.items():
            if any(r["method"].split(":")[0] == method for r in rs) and not (
                    method in PLAIN_ONLY and st.get("chat")):
                lines += [f"{method}: {note}", ""]
        svg = plot(a, model, task, rs)
        if svg:
            lines += [f"![accuracy against trainable parameters and peak memory]({svg})", ""]
    for title, gone in [("Methods that did not run", False), ("Results withdrawn", True)]:
        rows = [f"- {spec} on {task}: {why}" for task, spec, why, w in failed if w == gone]
        if rows:
            lines += [f"## {title}", ""] + rows + [""]
    os.makedirs(os.path.dirname(a.report) or ".", exist_ok=True)
    with open(a.report + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(a.report + ".tmp", a.report)
    print(f"report: {a.report}")


def plot(a, model, task, rs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        matplotlib.rcParams["svg.hashsalt"] = "petal"  # the same plot, the same file
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rs = sorted(rs, key=lambda r: r["method"])  # the same results, the same file (colours go in order)
    for ax, key, label, scale in [(axes[0], lambda r: r["trainable_params"], "trainable parameters", "log"),
                                  (axes[1], lambda r: speed(r)[1], "peak RSS (MB)", "linear")]:
        for r in rs:
            ax.scatter(key(r), r["accuracy"])
            ax.annotate(r["method"], (key(r), r["accuracy"]), fontsize=8)
        ax.set_xscale(scale)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
    fig.suptitle(f"{task} on {model}")
    name = f"comparison/{model.replace(':', '_').replace('/', '_')}-{task.replace('/', '_')}.svg"
    path = os.path.join(os.path.dirname(a.report) or ".", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return name
