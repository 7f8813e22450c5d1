#!/usr/bin/env bash
# petal's own research methods against LoRA r 8 on the synthetic 35M model (f32 training, 4 x 256
# tokens): `petal bench --method M --rounds 3`, each method and LoRA alternating, ROUNDS times;
# prints a markdown table of median tokens/s and peak RSS, each against LoRA's median.
#
#   tools/bench/research.sh [ROUNDS]   (default 2; about 10 min on 2 cores)
set -euo pipefail
rounds=${1:-2}
root=$(cd "$(dirname "$0")/../.." && pwd)
petal=${PETAL:-$root/target/release/petal}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
methods="ssf kradapter quanta paca:16 rosa fish mos intrinsic chain_of_lora rps"
for r in $(seq "$rounds"); do
  for m in lora:8 $methods; do
    name=${m%%:*}; rank=${m##*:}; [ "$rank" = "$m" ] && rank=8
    echo "== $name round $r" >&2
    "$petal" bench --workload synthetic-35m --mode train --method "$name" --r "$rank" --rounds 3 --json 2>/dev/null |
      python3 -c "import json,sys; d=json.load(sys.stdin); d['method']='$name'; print(json.dumps(d))" >> "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda m, k: statistics.median(r["petal"][k] for r in rows if r["method"] == m)
base_t, base_m = med("lora", "tokens_per_s"), med("lora", "peak_rss_mb")
print("| method | tokens/s | vs LoRA | peak RSS MB | vs LoRA |\n|---|---:|---:|---:|---:|")
for m in dict.fromkeys(r["method"] for r in rows):
    t, mem = med(m, "tokens_per_s"), med(m, "peak_rss_mb")
    print(f"| {m} | {t:.0f} | {t / base_t:.2f}x | {mem:.0f} | {mem / base_m:.2f}x |")
PY
