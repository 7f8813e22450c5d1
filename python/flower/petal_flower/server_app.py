"""The Flower ServerApp: the initial adapter from `petal train --max-steps 0`, Flower's FedAvg
or FedProx over the adapter tensors only (or LEGEND's rounds, legend.py), the held-out loss of the global adapter after every
round (`petal eval`), and the results: OUT/adapter (a PEFT folder petal and PEFT load),
OUT/rounds.jsonl (loss, bytes, time per round), OUT/round-R/adapter."""
import json
import tempfile
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from petal_flower import legend
from petal_flower.common import (nbytes, petal, read_adapter, read_labels, shape_problem, task_args,
                                 train_args, write_adapter)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = Path(rc["out"])
    out.mkdir(parents=True, exist_ok=True)
    n = int(rc["num-clients"])
    # the initial adapter; a classifier's from the held-out data, which holds every class (a
    # client's may not: its labels.json then fixes every client's classes)
    first = rc["val-data"] if task_args(rc) else rc["partitions"].split("|")[0]
    with tempfile.TemporaryDirectory() as tmp:
        petal(rc, train_args(rc, first, Path(tmp) / "init", 0, rc["seed"]))
        arrays, config_text = read_adapter(Path(tmp) / "init" / "adapter")
        labels_text = read_labels(Path(tmp) / "init" / "adapter")
    size = nbytes(arrays)
    kinds = {"fedavg": FedAvg, "fedprox": FedProx}
    if rc["strategy"] not in kinds and rc["strategy"] != "legend":
        raise ValueError(f"strategy `{rc['strategy']}` is not one of fedavg, fedprox, legend")
    log = out / "rounds.jsonl"
    log.write_text("")
    t0 = time.time()

    def log_row(rnd: int, tensors, extra) -> float:
        """The global adapter's held-out loss, written with the round's record."""
        folder = write_adapter(out / f"round-{rnd}" / "adapter", tensors, config_text, labels_text)
        e = petal(rc, ["eval", "--model", rc["model"], "--adapter", folder, "--data",
                       rc["val-data"], "--seq-len", rc["seq-len"], "--json",
                       "--max-examples", rc["max-eval-examples"], *task_args(rc)])
        row = {"round": rnd, "eval_loss": e["loss"], "seconds": time.time() - t0, **extra}
        for key in ("accuracy", "macro_f1"):  # a classifier's
            if key in e:
                row[f"eval_{key}"] = e[key]
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return float(e["loss"])

    if rc["strategy"] == "legend":
        log_row(0, arrays, {"bytes_down": 0, "bytes_up": 0, "sim_seconds": 0.0})
        final = legend.run(grid, rc, arrays, config_text, labels_text, log_row)
        write_adapter(out / "adapter", final, config_text, labels_text)
        return

    shapes = {k: v.shape for k, v in arrays.items()}
    faults = {}  # round -> the clients that failed or whose update was refused

    def evaluate(rnd: int, record: ArrayRecord) -> MetricRecord:
        tensors = {k: v.numpy() for k, v in record.items()}
        moved = size * n if rnd > 0 else 0
        loss = log_row(rnd, tensors, {"bytes_down": moved, "bytes_up": moved,
                                      **faults.get(rnd, {})})
        return MetricRecord({"eval-loss": loss})

    class Checked(kinds[rc["strategy"]]):
        """Flower's strategy, aggregating only the replies that hold the global adapter's
        tensors; failed clients and refused updates are recorded with the round."""

        def aggregate_train(self, server_round, replies):
            kept, record = [], faults.setdefault(server_round, {"failed": [], "refused": []})
            for msg in replies:
                node = msg.metadata.src_node_id
                if msg.has_error():
                    record["failed"].append({"node": node, "error": msg.error.reason})
                    continue
                why = shape_problem(shapes, {k: v.numpy() for k, v in msg.content["arrays"].items()})
                if why:
                    print(f"round {server_round}: the update of node {node} is refused: {why}", flush=True)
                    record["refused"].append({"node": node, "error": why})
                    continue
                kept.append(msg)
            return super().aggregate_train(server_round, kept)

    extra = {"proximal_mu": float(rc["proximal-mu"])} if rc["strategy"] == "fedprox" else {}
    strategy = Checked(fraction_train=1.0, fraction_evaluate=0.0,
                       min_train_nodes=n, min_available_nodes=n, **extra)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                            num_rounds=int(rc["num-server-rounds"]),
                            train_config=ConfigRecord({"adapter-config": config_text,
                                                       "labels": labels_text}),
                            evaluate_fn=evaluate, timeout=float(rc["round-timeout"]))
    final = {k: v.numpy() for k, v in result.arrays.items()}
    write_adapter(out / "adapter", final, config_text, labels_text)
    (out / "train_metrics.json").write_text(json.dumps(
        {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()}, indent=1))
