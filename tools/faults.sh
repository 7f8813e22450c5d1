#!/usr/bin/env bash
# Fault tests anyone can run (docs/reliability.md): training killed with SIGKILL at random
# moments, then resumed; a merge that meets a full disk, into a new folder and over an old one.
# After each fault it checks what is on disk: every checkpoint and adapter folder complete
# and loadable, an old output untouched, no temp folder left once a later run succeeds.
#
#   tools/faults.sh [KILLS]   (default 12; uses target/release/petal, built if missing)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
petal=$root/target/release/petal
[ -x "$petal" ] || (cd "$root" && cargo build --release -p petal-cli)
kills=${1:-12}
model=$root/tests/fixtures/golden/llama
lora=$root/tests/fixtures/golden/adapters/llama_lora_qv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
for i in $(seq 0 1999); do printf 'w%d ' $(( (i * 7) % 96 )); done > "$work/words.txt"

# a checkpoint or adapter folder is whole: its files are there and it loads onto the model
whole() {
  local d=$1
  for f in adapter_config.json adapter_model.safetensors; do
    [ -s "$d/$f" ] || fail "$d lacks $f"
  done
  "$petal" inspect --model "$model" --adapter "$d" >/dev/null 2>&1 || fail "$d does not load"
}

echo "== kill -9 during training ($kills times), then resume"
run=$work/run
train() {
  "$petal" train --model "$model" --data "$work/words.txt" --out "$run" --seq-len 16 \
    --batch-size 2 --save-every 1 --eval-every 100000 "$@"
}
for k in $(seq 1 "$kills"); do
  if [ -d "$run/checkpoints" ]; then args=(--resume "$run"); else args=(); fi
  # exec: $! is petal itself, not a shell around it
  (exec "$petal" train --model "$model" --data "$work/words.txt" --out "$run" --seq-len 16 \
    --batch-size 2 --save-every 1 --eval-every 100000 --max-steps 100000 "${args[@]}" \
    >/dev/null 2>&1) &
  pid=$!
  sleep "0.$(( RANDOM % 9 + 1 ))"
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for c in "$run"/checkpoints/step-*; do
    [ -d "$c" ] || continue
    whole "$c"
    [ -s "$c/trainer_state.json" ] && [ -s "$c/optimizer.safetensors" ] || fail "$c incomplete"
  done
  [ ! -d "$run/adapter" ] || whole "$run/adapter"
done
stale=$(find "$run" -name '.*.tmp-*' | wc -l)
echo "   after $kills kills: $(ls "$run/checkpoints" | grep -c step-) checkpoints, all whole; $stale temp folders left by killed saves"
[ -s "$run/checkpoints/latest" ] || fail "no checkpoint after $kills kills"
at=$(sed 's/step-0*//' "$run/checkpoints/latest")
train --max-steps $(( at + 3 )) --resume "$run" >/dev/null 2>&1 || fail "the run does not resume"
whole "$run/adapter"
left=$(find "$run" -name '.*.tmp-*' -o -name '.*.old-*' | wc -l)
[ "$left" -eq 0 ] || fail "$left temp folders left after a successful run"
echo "   resumed to the end: adapter whole, no temp folder left"

echo "== a full disk during merge (writes over 48 KB fail with EFBIG)"
full() { (trap '' XFSZ; ulimit -f 48; "$petal" merge --model "$model" --adapter "$lora" --out "$1") >/dev/null 2>&1; }
new=$work/merged
if full "$new"; then fail "merge reported success on a full disk"; fi
[ ! -e "$new" ] || fail "a failed merge left $new"
[ "$(find "$work" -maxdepth 1 -name '.merged.*' | wc -l)" -eq 0 ] || fail "a failed merge left a temp folder"
echo "   into a new folder: refused, nothing left"
"$petal" merge --model "$model" --adapter "$lora" --out "$new" >/dev/null
before=$(cd "$new" && sha256sum * | sha256sum)
if full "$new"; then fail "merge reported success on a full disk"; fi
after=$(cd "$new" && sha256sum * | sha256sum)
[ "$before" = "$after" ] || fail "a failed merge changed the old folder"
[ "$(find "$work" -maxdepth 1 -name '.merged.*' | wc -l)" -eq 0 ] || fail "temp folder left"
echo "   over an old folder: refused, the old one untouched, nothing left"
echo "all fault checks passed"
