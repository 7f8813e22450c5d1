# Sourced by the paper-claim scripts that train on SmolLM2 (after they set `steps`, and `lr` unless they pass it per run):
# the petal binary (built if missing), a temp folder removed on exit, the assets, and the
# training flags they share (Shakespeare, sequences of 128, batch 4, 10 warm-up steps, held-out
# loss on 32 sequences, a JSON summary).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
petal=${PETAL:-$root/target/release/petal}
[ -x "$petal" ] || (cd "$root" && cargo build --release -p petal-cli)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$petal" assets smollm2 shakespeare >/dev/null
common=(--model asset:smollm2 --data asset:shakespeare --max-steps "$steps"
  --seq-len 128 --batch-size 4 --warmup-steps 10 --eval-every 100000 --save-every 100000
  --max-eval-examples 32 --json)
# scripts that sweep the learning rate leave `lr` empty and pass --lr per run
[ -z "${lr:-}" ] || common+=(--lr "$lr")
# `shared`: `common` without the flags given (and their values), for scripts whose runs give
# those flags themselves
without() {
  shared=()
  local skip=0 a f
  for a in "${common[@]}"; do
    if [ $skip = 1 ]; then skip=0; continue; fi
    for f in "$@"; do [ "$a" = "$f" ] && skip=1; done
    [ $skip = 1 ] || shared+=("$a")
  done
}
