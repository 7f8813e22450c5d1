#!/usr/bin/env bash
# SSF's claim, small: better than BitFit, IA3 and LN tuning at a similar parameter count, and
# merged at zero inference cost. SmolLM2-135M on Shakespeare, the same steps, data, lr and seeds
# for every method; SSF twice: after every linear, and after every linear and per-layer norm (the
# paper's placement, `--set norms=true`). Writes docs/papers/ssf.md (table, SVG plot, command, CPU).
#
#   tools/papers/ssf.sh [STEPS] [SEEDS]   (default 100 steps, seed "0": about 40 min per seed on
#   2 cores at 170 tokens/s)
set -euo pipefail
steps=${1:-100}
seeds=${2:-0}
lr=1e-2
source "$(dirname "$0")/smollm2.sh"
results=$work/results.jsonl
for seed in $seeds; do
  for m in ssf ssf_norms bitfit ia3 ln_tuning; do
    echo "== $m seed $seed" >&2
    flags=(--method "$m")
    [ "$m" = ssf_norms ] && flags=(--method ssf --set norms=true)
    "$petal" train "${common[@]}" "${flags[@]}" --seed "$seed" --out "$work/$m-$seed" \
      2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); d['method']='$m'; d['seed']=$seed; print(json.dumps(d))" >> "$results"
  done
done
# zero cost once merged: the merged SSF model (linears and norms) against the base model and the
# unmerged adapter
"$petal" merge --model asset:smollm2 --adapter "$work/ssf_norms-${seeds%% *}/adapter" --out "$work/merged" >/dev/null
ev() { "$petal" eval --data asset:shakespeare --max-examples 64 --json "$@" 2>/dev/null; }
t0=$(date +%s.%N); ev --model asset:smollm2 > "$work/eval_base.json"; t1=$(date +%s.%N)
ev --model asset:smollm2 --adapter "$work/ssf_norms-${seeds%% *}/adapter" > "$work/eval_ssf.json"; t2=$(date +%s.%N)
ev --model "$work/merged" > "$work/eval_merged.json"; t3=$(date +%s.%N)
python3 "$root/tools/papers/ssf_report.py" "$results" "$work" "$steps" "$seeds" "$lr" \
  "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)" "$(echo "$t3 - $t2" | bc)" > "$root/docs/papers/ssf.md"
cp "$work/plot.svg" "$root/docs/papers/ssf.svg"
echo "wrote docs/papers/ssf.md" >&2
