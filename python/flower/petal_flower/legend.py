"""LEGEND (arXiv 2412.20004, "Adaptive Parameter-Efficient Federated Fine-Tuning on
Heterogeneous Devices") on Flower's Message API, as petal reads the paper (its code was not
found): each client trains LoRA on the last `depth` layers only (decoder layers, or a BERT
encoder's; backpropagation stops early, so slow devices do less), with ranks that do not
decrease towards the output; a classifier's head is trained by every client, since every depth
reaches the output (LoRA outside the layers, on BERT's pooler, is not trained: see slice_for); the
server picks each client's depth from its measured step time so the round's times even out,
and aggregates each layer, and each rank component of it, over the clients that train it.
By default (`legend-send = "own"`) a client's model carries LoRA on its own layers only (only
those travel down, LEGEND's saving in communication): its update is computed without the
input-side layers' global LoRA. With `legend-send = "all"` the whole global adapter travels
down and the client merges what it does not train (the other layers, and its layers' components
beyond its rank) into its base weights (`petal train --merge-adapter`): its update is computed on
the global model; only its own layers travel up. Plain LoRA scaling (alpha / r); rsLoRA would
need alpha scaled by sqrt(r / r_max) instead.

Heterogeneous devices are simulated: client i's measured seconds are multiplied by the run
config's slowdown factor i (`slowdowns`), and a round takes as long as its slowest client.
With `legend-adapt = false` every client trains every layer at full rank: FedAvg of LoRA under
the same accounting, the baseline."""
import json
import re
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from petal_flower.common import shape_problem

# a layer's index in a tensor name: `model.layers.3.` (Llama, Qwen2) or `encoder.layer.3.` (BERT)
LAYER = re.compile(r"\.(layers?)\.(\d+)\.")


def layers_of(arrays):
    """The layers an adapter's tensors belong to."""
    return sorted({int(m.group(2)) for k in arrays if (m := LAYER.search(k))})


def layer_word(arrays):
    """What the model calls its layers in tensor names (`layers` or `layer`)."""
    return next(m.group(1) for k in sorted(arrays) if (m := LAYER.search(k)))


def plan(num_layers, r_max, depth, taper=True):
    """A client's layers (the last `depth`) and each one's rank: r_max at the output, falling
    linearly to half of it at the deepest of them (without `taper`: r_max on all)."""
    layers = list(range(num_layers - depth, num_layers))
    ranks = {}
    for j, layer in enumerate(reversed(layers)):  # j = 0: the output-most layer
        frac = j / (depth - 1) if depth > 1 and taper else 0.0
        ranks[layer] = max(1, round(r_max * (1 - frac / 2)))
    return layers, ranks


def depths(step_cost, prev_depth, num_layers):
    """LEGEND's depth assignment (greedy, per client): a step at depth d costs c·(L + 2d) (one
    forward through all L layers, a backward twice a forward's cost through d of them), c the
    client's own cost fitted from its last round; the target round time is the median
    client's at full depth; each client gets the deepest adapter within it (at least 1)."""
    L = num_layers
    c = {i: t / (L + 2 * prev_depth[i]) for i, t in step_cost.items()}
    target = float(np.median([ci * 3 * L for ci in c.values()]))
    return {i: int(min(L, max(1, (target / ci - L) // 2))) for i, ci in c.items()}


def client_args(layers, ranks, r_max, alpha, word="layers"):
    """`petal train` options for a client's plan: its layers, and per layer a rank and an alpha
    that keep the global scaling alpha / r_max (so a client's rank-r slice of the global
    adapter is the same update as the global adapter's first r components). `word`: what the
    model calls its layers in tensor names."""
    rank_pattern = {rf"{word}\.{l}\..*": r for l, r in ranks.items()}
    alpha_pattern = {rf"{word}\.{l}\..*": alpha * r / r_max for l, r in ranks.items()}
    return ["--layers-to-transform", ",".join(map(str, layers)),
            "--set", f"rank_pattern={json.dumps(rank_pattern)}",
            "--set", f"alpha_pattern={json.dumps(alpha_pattern)}"]


def slice_for(global_arrays, ranks):
    """The global adapter cut to a client's layers and ranks: lora_A (r, in) keeps its first r
    rows, lora_B (out, r) its first r columns; a trained head outside the layers whole. LoRA
    outside the layers (BERT's pooler) is left out: `--layers-to-transform` adapts layers only,
    as PEFT's does, so it keeps its initial value (B = 0, no effect)."""
    out = {}
    for k, g in global_arrays.items():
        m = LAYER.search(k)
        if m is None:
            if ".lora_" not in k:
                out[k] = g
            continue
        if int(m.group(2)) not in ranks:
            continue
        r = ranks[int(m.group(2))]
        if k.endswith("lora_A.weight"):
            out[k] = g[:r]
        elif k.endswith("lora_B.weight"):
            out[k] = g[:, :r]
        else:
            out[k] = g
    return out


def context_for(global_arrays, part):
    """What a client merges into its base under `legend-send = "all"`: the global adapter with
    the components the client trains (`part`, from slice_for) taken out, lora_B's first r
    columns zeroed on its layers (B A is the sum of the components B[:, j] A[j], so the rest of
    its layers' components stay). The head stays: the client's trained copy, started from the
    same global head, replaces it."""
    out = dict(global_arrays)
    for k, p in part.items():
        if k.endswith("lora_B.weight"):
            out[k] = global_arrays[k].copy()
            out[k][:, :p.shape[1]] = 0
    return out


def aggregate(global_arrays, updates):
    """Each element of each tensor: the average of the clients that trained it, weighted by
    their examples (a client's tensor fills the leading corner of the global one); elements no
    client trained keep their global value."""
    new = {}
    for k, g in global_arrays.items():
        total = np.zeros(g.shape, np.float64)
        weight = np.zeros(g.shape, np.float64)
        for arrays, n in updates:
            if k not in arrays:
                continue
            a = arrays[k]
            if a.ndim != g.ndim or any(s > t for s, t in zip(a.shape, g.shape)):
                raise ValueError(f"{k}: a client sent shape {list(a.shape)}, larger than the "
                                 f"global {list(g.shape)}")
            corner = tuple(slice(0, s) for s in a.shape)
            total[corner] += n * a.astype(np.float64)
            weight[corner] += n
        trained = weight > 0
        out = g.astype(np.float64).copy()
        out[trained] = total[trained] / weight[trained]
        new[k] = out.astype(g.dtype)
    return new


def nbytes(arrays):
    return int(sum(a.nbytes for a in arrays.values()))


def run(grid, rc, arrays, config_text, labels_text, log_row):
    """The rounds: plans, per-client messages, aggregation, the held-out loss after each.
    `labels_text`: a classifier's labels.json, sent with the adapter ("" for a decoder)."""
    n = int(rc["num-clients"])
    adapt = bool(rc["legend-adapt"])
    send = str(rc.get("legend-send", "own"))
    if send not in ("own", "all"):
        raise ValueError(f"legend-send `{send}` is not one of own, all")
    r_max, alpha = int(rc["r"]), float(rc["alpha"])
    num_layers = len(layers_of(arrays))
    if layers_of(arrays) != list(range(num_layers)):
        raise ValueError("LEGEND needs an initial adapter on every layer")
    word = layer_word(arrays)
    deadline = time.time() + 300
    nodes = []
    while len(nodes) < n:
        nodes = sorted(grid.get_node_ids())
        if time.time() > deadline:
            raise RuntimeError(f"{len(nodes)} of {n} clients connected after 300 s")
        time.sleep(1)
    nodes = nodes[:n]
    depth = {nid: num_layers for nid in nodes}
    sim_total = 0.0
    for rnd in range(1, int(rc["num-server-rounds"]) + 1):
        messages, sent, shapes = [], {}, {}
        for nid in nodes:
            layers, ranks = plan(num_layers, r_max, depth[nid], adapt)
            part = slice_for(arrays, ranks)
            # what travels down: the client's part, or the whole global adapter it is cut from
            sent[nid] = nbytes(part) if send == "own" else nbytes(arrays)
            shapes[nid] = {k: v.shape for k, v in part.items()}
            config = ConfigRecord({"server-round": rnd, "adapter-config": config_text, "labels": labels_text,
                                   "petal-args": json.dumps(client_args(layers, ranks, r_max, alpha, word))})
            content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in part.items()}),
                                  "config": config})
            if send == "all":
                context = context_for(arrays, part)
                content["context"] = ArrayRecord({k: Array(v) for k, v in context.items()})
            messages.append(Message(content=content, message_type="train", dst_node_id=nid))
        replies = list(grid.send_and_receive(messages, timeout=float(rc["round-timeout"])))
        updates, clients, failed = [], [], []
        for rep in replies:
            nid = rep.metadata.src_node_id
            if rep.has_error():
                failed.append({"node": nid, "error": rep.error.reason})
                continue
            m = rep.content["metrics"]
            local = {k: v.numpy() for k, v in rep.content["arrays"].items()}
            why = shape_problem(shapes[nid], local)
            if why:
                failed.append({"node": nid, "error": f"update refused: {why}"})
                continue
            updates.append((local, float(m["num-examples"])))
            clients.append({"node": nid, "partition": int(m["partition-id"]), "depth": depth[nid],
                            "ranks": plan(num_layers, r_max, depth[nid], adapt)[1],
                            "slowdown": float(m["slowdown"]),
                            "sim_seconds": float(m["sim-seconds"]),
                            "sim_step_seconds": float(m["sim-step-seconds"]),
                            "bytes_down": sent[nid], "bytes_up": nbytes(local)})
        replied = {rep.metadata.src_node_id for rep in replies}
        failed += [{"node": nid, "error": f"no reply within round-timeout ({rc['round-timeout']} s)"}
                   for nid in nodes if nid not in replied]
        if not updates:
            raise RuntimeError(f"round {rnd}: no client replied ({failed})")
        arrays = aggregate(arrays, updates)
        round_time = max(c["sim_seconds"] for c in clients)
        sim_total += round_time
        log_row(rnd, arrays, {"sim_round_seconds": round_time, "sim_seconds": sim_total,
                              "bytes_down": sum(c["bytes_down"] for c in clients),
                              "bytes_up": sum(c["bytes_up"] for c in clients),
                              "clients": sorted(clients, key=lambda c: c["partition"]),
                              "failed": failed})
        if adapt:
            done = {c["node"] for c in clients}
            cost = {c["node"]: c["sim_step_seconds"] for c in clients}
            new = depths(cost, {i: depth[i] for i in cost}, num_layers)
            depth = {nid: new.get(nid, depth[nid]) if nid in done else depth[nid] for nid in nodes}
    return arrays
