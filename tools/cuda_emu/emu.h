// A CPU stand-in for the few CUDA features petal's kernels use, so their logic (indexing,
// tiling, masking, reductions) can be checked on a machine without a GPU: each block runs as
// blockDim.x OS threads meeting at a real barrier for __syncthreads, blocks one after another
// (so `__shared__` can be a function-local static), warp shuffles through a buffer and a
// barrier of the warp's own threads (a warp's lanes call them together, as on a GPU). Not a model of timing or of memory
// coherence beyond what __syncthreads orders. C++20.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct emu_dim3 {
    unsigned x, y, z;
};
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 blockDim, gridDim;
inline std::barrier<>* emu_barrier = nullptr;
inline std::vector<std::barrier<>*> emu_warps;
inline float emu_lanes[1024];

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    std::barrier<>& warp = *emu_warps[threadIdx.x / 32];
    emu_lanes[threadIdx.x] = v;
    warp.arrive_and_wait();
    const float r = emu_lanes[threadIdx.x ^ lane_mask];
    warp.arrive_and_wait();
    return r;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
using std::max;
using std::min;

struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// Runs `kernel` over the grid: blockDim.x OS threads, which take the blocks in turn and meet
// at the barrier after each (so one block's shared memory is done with before the next).
template <class F>
void emu_launch(emu_dim3 grid, unsigned block, F kernel) {
    blockDim = {block, 1, 1};
    gridDim = grid;
    std::barrier<> bar(block);
    emu_barrier = &bar;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    emu_warps.clear();
    for (unsigned w = 0; w * 32 < block; w++) {
        warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - 32 * w)));
        emu_warps.push_back(warps.back().get());
    }
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; t++)
        threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned z = 0; z < grid.z; z++)
                for (unsigned y = 0; y < grid.y; y++)
                    for (unsigned x = 0; x < grid.x; x++) {
                        blockIdx = {x, y, z};
                        kernel();
                        bar.arrive_and_wait();
                    }
        });
    for (auto& t : threads) t.join();
}
