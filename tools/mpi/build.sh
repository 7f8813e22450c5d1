#!/usr/bin/env bash
# Build `petal` with the `mpi` and `nccl` features (data-parallel training under mpirun) as
# target/debug/petal-mpi, next to the default build's petal, for the data-parallel tests
# (crates/petal-cli/tests/data_parallel.rs). Installs Open MPI and libclang (for the bindings)
# from Debian's packages first where they are missing and this runs as root.
# `--release` builds target/release/petal-mpi instead. Exit status 2: the packages are missing
# and could not be installed (the data-parallel tests then skip, saying so).
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=debug
flags=()
if [ "${1:-}" = --release ]; then profile=release; flags=(--release); fi
missing=()
command -v mpirun >/dev/null || missing+=(openmpi-bin)
command -v mpicc >/dev/null || missing+=(libopenmpi-dev)
ldconfig -p | grep -q 'libclang[-.0-9]*\.so' || missing+=(libclang-dev)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "tools/mpi/build.sh: missing ${missing[*]}: install them (Debian: apt-get install ${missing[*]})" >&2
        exit 2
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
        { echo "tools/mpi/build.sh: could not install ${missing[*]} from Debian's packages" >&2; exit 2; }
fi
# with `nccl` (GPU gradient sums; CUDA and NCCL are loaded at run time, so no toolkit is needed)
cargo build "${flags[@]}" -p petal-cli --features mpi,nccl
cp "target/$profile/petal" "target/$profile/petal-mpi"
echo "built target/$profile/petal-mpi ($(mpirun --version | head -1))"
