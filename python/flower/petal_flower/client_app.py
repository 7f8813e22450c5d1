"""The Flower ClientApp: a round's local training with `petal train --init-adapter` from the
global adapter the server sent, on this node's partition (`partition-id` of its node config);
only the adapter's tensors go back, with the number of training examples as FedAvg's weight."""
import json
import sys
import tempfile
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from petal_flower.common import injected, nbytes, petal, read_adapter, train_args, write_adapter

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    rc = context.run_config
    pid = int(context.node_config["partition-id"])
    partitions = rc["partitions"].split("|")
    if pid >= len(partitions):
        raise ValueError(f"partition-id {pid}: the run has {len(partitions)} partitions")
    config = msg.content["config"]
    rnd = int(config["server-round"])
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    if injected(rc, "fail-at", pid, rnd):  # a client that crashes mid-round (tests)
        raise RuntimeError(f"client {pid}: failure injected at round {rnd} (run config fail-at)")
    with tempfile.TemporaryDirectory() as tmp:
        start = write_adapter(Path(tmp) / "global", arrays, str(config["adapter-config"]),
                              str(config.get("labels", "")))
        run = Path(tmp) / "run"
        # a seed per round and client: dropout and batch order differ across them, fixed per run
        seed = int(rc["seed"]) * 100_003 + rnd * 1_009 + pid
        args = train_args(rc, partitions[pid], run, rc["local-steps"], seed)
        args += ["--init-adapter", start]
        mu = float(config.get("proximal-mu", 0.0))
        if mu > 0:
            args += ["--prox-mu", mu]
        # LEGEND: this client's layers and ranks, as petal options, and with legend-send = all
        # the global adapter's rest, merged into the base before training
        args += json.loads(str(config.get("petal-args", "[]")))
        if "context" in msg.content:
            context = {k: v.numpy() for k, v in msg.content["context"].items()}
            merged = write_adapter(Path(tmp) / "context", context, str(config["adapter-config"]),
                                   str(config.get("labels", "")))
            args += ["--merge-adapter", merged]
        summary = petal(rc, args)
        local, _ = read_adapter(run / "adapter")
        if injected(rc, "misshape-at", pid, rnd):  # an adapter of another shape (tests)
            first = sorted(local)[0]
            local[first] = local[first][:-1]
        if rc["keep-client-adapters"]:
            keep = Path(rc["out"]) / "clients" / f"round-{rnd}" / f"client-{pid}"
            write_adapter(keep, local, str(config["adapter-config"]))
            # the Simulation Engine runs this in one of Ray's worker processes (tests check it)
            # (and with its seed, to redo its run)
            kept = dict(summary, ray_worker="ray" in sys.modules, seed=seed)
            (keep / "summary.json").write_text(json.dumps(kept))
    losses = summary["losses"]
    # a simulated device: the measured seconds times this partition's slowdown factor
    slow = [float(x) for x in str(rc["slowdowns"]).split(",") if x.strip()]
    slowdown = slow[pid] if pid < len(slow) else 1.0
    # tests: a device of known speed, so that LEGEND's depths follow the slowdowns alone and
    # not two processes' timings on shared cores (5 ms steps measured up to 16x apart)
    step = float(rc.get("step-seconds", 0.0)) or float(summary.get("median_step_seconds") or 0.0)
    metrics = MetricRecord({
        "num-examples": int(summary["train_examples"]),
        "train-loss": float(sum(losses) / len(losses)) if losses else 0.0,
        "seconds": float(summary["seconds"]),
        "bytes-up": nbytes(local),
        "partition-id": pid,
        "slowdown": slowdown,
        "sim-seconds": float(summary["seconds"]) * slowdown,
        "sim-step-seconds": step * slowdown,
    })
    record = ArrayRecord({k: Array(v) for k, v in local.items()})
    return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=msg)
