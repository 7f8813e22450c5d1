#!/usr/bin/env python3
"""Two LoRA adapters of the same rank, targets and alpha as one PaLoRA adapter whose preference
(λ, 1 - λ) gives the linear mix λ ΔW_A + (1 - λ) ΔW_B: palora_A stacks A_A over A_B (rows),
palora_B puts B_A beside B_B (columns). The baseline of tools/papers/palora.sh. Standard library
only (f32 safetensors).

    tools/papers/palora_mix.py LORA_A LORA_B TASK_A TASK_B OUT_DIR
"""
import array
import json
import os
import struct
import sys


def read(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    out = {}
    for k, v in head.items():
        if k == "__metadata__":
            continue
        if v["dtype"] != "F32":
            raise SystemExit(f"{path}: {k} is {v['dtype']}, expected F32")
        a, b = v["data_offsets"]
        out[k] = (v["shape"], array.array("f", body[a:b]))
    return out


def write(path, tensors):
    head, blobs, off = {}, [], 0
    for k in sorted(tensors):
        shape, data = tensors[k]
        b = data.tobytes()
        head[k] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(head).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    a_dir, b_dir, task_a, task_b, out = sys.argv[1:6]
    ta = read(os.path.join(a_dir, "adapter_model.safetensors"))
    tb = read(os.path.join(b_dir, "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(a_dir, "adapter_config.json")))
    if ta.keys() != tb.keys():
        raise SystemExit("the two adapters adapt different modules")
    mixed = {}
    for k in ta:
        if k.endswith(".lora_A.weight"):
            (r, inp), (_, xa), (_, xb) = ta[k][0], ta[k], tb[k]
            mixed[k.replace(".lora_A.weight", ".palora_A")] = ([2 * r, inp], xa + xb)
        elif k.endswith(".lora_B.weight"):
            (out_f, r), xa, xb = ta[k][0], ta[k][1], tb[k][1]
            rows = array.array("f")
            for i in range(out_f):
                rows.extend(xa[i * r:(i + 1) * r])
                rows.extend(xb[i * r:(i + 1) * r])
            mixed[k.replace(".lora_B.weight", ".palora_B")] = ([out_f, 2 * r], rows)
        else:
            raise SystemExit(f"unexpected tensor {k}")
    os.makedirs(out, exist_ok=True)
    write(os.path.join(out, "adapter_model.safetensors"), mixed)
    keep = {k: cfg[k] for k in ["base_model_name_or_path", "r", "lora_alpha", "target_modules",
                                "task_type"] if k in cfg}
    keep.update(peft_type="PALORA", tasks=[task_a, task_b], inference_mode=True)
    json.dump(keep, open(os.path.join(out, "adapter_config.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
