#!/usr/bin/env bash
# petal's CUDA kernels on the CPU (emu.h) against naive references (check.cpp), for heads of
# 32, 64 and 128 values. Needs g++ with C++20. Run from anywhere.
set -eu
DIR=$(cd "$(dirname "$0")" && pwd)
OUT=${TMPDIR:-/tmp}/petal-cuda-emu
mkdir -p "$OUT"
for hd in 64 32 128; do
    g++ -std=c++20 -O2 -pthread -Wno-unknown-pragmas -DHD=$hd "$DIR/check.cpp" -o "$OUT/check$hd"
    "$OUT/check$hd"
done
