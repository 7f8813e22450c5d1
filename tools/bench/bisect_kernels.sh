#!/usr/bin/env bash
# Which CUDA kernel family moves a training's loss curve away from the CPU's: a short LoRA
# training of the golden tiny Llama on the CPU, then on the GPU with each family alone.
#     tools/bench/bisect_kernels.sh path/to/petal
P=$1
NV=$(python3 -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null)
LIBS=$(find $NV /usr/local/cuda*/lib64 \( -name 'libcublas*.so*' -o -name 'libcurand.so*' -o -name 'libnvrtc.so*' \) -printf '%h:' 2>/dev/null)
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:-}"
T=$(mktemp -d)
python3 -c 'print(" ".join(f"w{(i * 7) % 96}" for i in range(2000)))' >$T/data.txt
one() { # device, families
    rm -rf $T/run
    PETAL_CUDA_KERNELS=$2 timeout 60 "$P" train --device $1 --model tests/fixtures/golden/llama --data $T/data.txt \
        --max-steps 6 --lr 0.05 --seq-len 16 --batch-size 2 --val-fraction 0 --out $T/run \
        --r 4 --alpha 8 --target-modules all-linear >/dev/null 2>$T/err || tail -3 $T/err
    printf '%-10s %-10s ' $1 "$2"
    python3 -c 'import json,sys; print(" ".join("%.6f" % json.loads(l)["loss"] for l in open(sys.argv[1]) if "\"loss\"" in l))' $T/run/metrics.jsonl
}
one cpu 0
for f in 0 adamw lora norm softmax rope swiglu loss attention 1; do one cuda $f; done
