// petal's CUDA kernels, compiled at run time by NVRTC (no headers: bf16 is handled as its bits).
// Arithmetic is f32 throughout; bf16 values are widened as they are read and rounded to the
// nearest even as they are stored, as the CPU kernels do. Row kernels run one block per row
// (blockDim a multiple of 32); elementwise kernels one thread per element (or pair).

// ------------------------------------------------------------------ RMSNorm, frozen weight
// y = x r w, r = 1 / sqrt(mean(x^2) + eps); y in the weight's dtype.
template <typename TX, typename TW>
__device__ void rms_fwd(const TX* x, const TW* w, TW* y, int cols, float eps) {
    const i64 row = (i64)blockIdx.x * cols;
    float ss = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = ld(x, row + j);
        ss += v * v;
    }
    const float r = 1.f / sqrtf(block_sum(ss) / cols + eps);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) st(y, row + j, ld(x, row + j) * r * ld(w, j));
}

// dx = r w dy - r^3 x mean(x w dy); dy in the weight's dtype, dx in x's.
template <typename TX, typename TW>
__device__ void rms_bwd(const TX* x, const TW* w, const TW* dy, TX* dx, int cols, float eps) {
    const i64 row = (i64)blockIdx.x * cols;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = ld(x, row + j);
        ss += v * v;
        dot += v * ld(w, j) * ld(dy, row + j);
    }
    const float r = 1.f / sqrtf(block_sum(ss) / cols + eps);
    const float m = block_sum(dot) / cols;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = ld(x, row + j);
        st(dx, row + j, r * ld(w, j) * ld(dy, row + j) - r * r * r * v * m);
    }
}

// ------------------------------------------------------------------ softmax
// y = softmax(scale x) over each row; with `t` > 0 a causal mask: row r is query r % t at
// position offset + r % t, which sees keys 0..=offset + r % t (the rest get 0).
template <typename T>
__device__ void softmax_fwd(const T* x, T* y, int cols, float scale, int t, int offset) {
    const i64 row = (i64)blockIdx.x * cols;
    const int seen = t > 0 ? min(cols, offset + (int)(blockIdx.x % t) + 1) : cols;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < seen; j += blockDim.x) m = fmaxf(m, scale * ld(x, row + j));
    m = block_max(m);
    float s = 0.f;
    for (int j = threadIdx.x; j < seen; j += blockDim.x) s += expf(scale * ld(x, row + j) - m);
    const float inv = 1.f / block_sum(s);
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        st(y, row + j, j < seen ? expf(scale * ld(x, row + j) - m) * inv : 0.f);
}

// dx = scale y (dy - sum(y dy)) (masked entries have y = 0 and get 0)
template <typename T>
__device__ void softmax_bwd(const T* y, const T* dy, T* dx, int cols, float scale) {
    const i64 row = (i64)blockIdx.x * cols;
    float dot = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) dot += ld(y, row + j) * ld(dy, row + j);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float p = ld(y, row + j);
        st(dx, row + j, scale * p * (ld(dy, row + j) - dot));
    }
}

// ------------------------------------------------------------------ RoPE (rotate-half)
// One thread per pair (j, j + d/2) of a head; head `h` (of `heads`) sits at position
// (h / per_pos) % t, whose angles are cos/sin[pos, j] (f32, (t, d/2)). sign -1 turns back.
template <typename T>
__device__ void rope(const T* x, const float* cs, const float* sn, T* y, i64 heads, int d,
                     int t, int per_pos, float sign) {
    const int half = d / 2;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= heads * half) return;
    const i64 h = i / half;
    const int j = (int)(i % half);
    const i64 p = (h / per_pos) % t;
    const float c = cs[p * half + j], s = sign * sn[p * half + j];
    const float a = ld(x, h * d + j), b = ld(x, h * d + j + half);
    st(y, h * d + j, a * c - b * s);
    st(y, h * d + j + half, b * c + a * s);
}

// ------------------------------------------------------------------ SwiGLU: silu(g) u
template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* y, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float a = ld(g, i);
    st(y, i, a / (1.f + expf(-a)) * ld(u, i));
}

// out[0..n] = dg = dy u s (1 + g (1 - s)), out[n..2n] = du = dy g s, s = sigmoid(g)
template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dy, T* out, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float a = ld(g, i), b = ld(u, i), d = ld(dy, i);
    const float s = 1.f / (1.f + expf(-a));
    st(out, i, d * b * s * (1.f + a * (1.f - s)));
    st(out, n + i, d * a * s);
}

// ------------------------------------------------------------------ cross-entropy
// The row's max m and sum of exp(x - m), on every thread of the block.
template <typename T>
__device__ float2 max_and_sum(const T* x, i64 row, int cols) {
    float m = NEG_INF;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, ld(x, row + j));
    m = block_max(m);
    float s = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += expf(ld(x, row + j) - m);
    return make_float2(m, block_sum(s));
}

// loss[r] = logsumexp(x[r]) - x[r, label[r]], 0 where label[r] < 0 (ignored).
template <typename T>
__device__ void ce_fwd(const T* x, const i64* label, float* loss, int cols) {
    const i64 row = (i64)blockIdx.x * cols;
    const i64 l = label[blockIdx.x];
    if (l < 0) {
        if (threadIdx.x == 0) loss[blockIdx.x] = 0.f;
        return;
    }
    const float2 ms = max_and_sum(x, row, cols);
    if (threadIdx.x == 0) loss[blockIdx.x] = logf(ms.y) + ms.x - ld(x, row + l);
}

// dx[r] = dy (softmax(x[r]) - onehot(label[r])), 0 on ignored rows; dy is one f32 on the device.
template <typename T, typename TO>
__device__ void ce_grad(const T* x, const i64* label, const float* dy, TO* dx, int cols) {
    const i64 row = (i64)blockIdx.x * cols;
    const i64 l = label[blockIdx.x];
    if (l < 0) {
        for (int j = threadIdx.x; j < cols; j += blockDim.x) st(dx, row + j, 0.f);
        return;
    }
    const float2 ms = max_and_sum(x, row, cols);
    const float k = dy[0] / ms.y;
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        st(dx, row + j, expf(ld(x, row + j) - ms.x) * k - (j == l ? dy[0] : 0.f));
}

// ------------------------------------------------------------------ entry points
// Named <kernel>_<dtype of each float tensor argument, in order>.
#define ONE(T, S)                                                                              \
    extern "C" __global__ void softmax_fwd_##S(const T* x, T* y, int cols, float scale, int t, \
                                               int offset) {                                   \
        softmax_fwd(x, y, cols, scale, t, offset);                                             \
    }                                                                                          \
    extern "C" __global__ void softmax_bwd_##S(const T* y, const T* dy, T* dx, int cols,       \
                                               float scale) {                                  \
        softmax_bwd(y, dy, dx, cols, scale);                                                   \
    }                                                                                          \
    extern "C" __global__ void rope_##S(const T* x, const float* c, const float* s, T* y,      \
                                        i64 heads, int d, int t, int per_pos, float sign) {    \
        rope(x, c, s, y, heads, d, t, per_pos, sign);                                          \
    }                                                                                          \
    extern "C" __global__ void swiglu_fwd_##S(const T* g, const T* u, T* y, i64 n) {           \
        swiglu_fwd(g, u, y, n);                                                                \
    }                                                                                          \
    extern "C" __global__ void swiglu_bwd_##S(const T* g, const T* u, const T* dy, T* out,     \
                                              i64 n) {                                         \
        swiglu_bwd(g, u, dy, out, n);                                                          \
    }                                                                                          \
    extern "C" __global__ void ce_fwd_##S(const T* x, const i64* label, float* loss,           \
                                          int cols) {                                          \
        ce_fwd(x, label, loss, cols);                                                          \
    }

#define TWO(TA, SA, TB, SB)                                                                    \
    extern "C" __global__ void rms_fwd_##SA##_##SB(const TA* x, const TB* w, TB* y, int cols,  \
                                                   float eps) {                                \
        rms_fwd(x, w, y, cols, eps);                                                           \
    }                                                                                          \
    extern "C" __global__ void rms_bwd_##SA##_##SB(const TA* x, const TB* w, const TB* dy,     \
                                                   TA* dx, int cols, float eps) {              \
        rms_bwd(x, w, dy, dx, cols, eps);                                                      \
    }                                                                                          \
    extern "C" __global__ void ce_grad_##SA##_##SB(const TA* x, const i64* label,              \
                                                   const float* dy, TB* dx, int cols) {        \
        ce_grad(x, label, dy, dx, cols);                                                       \
    }

ONE(float, f32)
ONE(bf16, bf16)
TWO(float, f32, float, f32)
TWO(float, f32, bf16, bf16)
TWO(bf16, bf16, float, f32)
TWO(bf16, bf16, bf16, bf16)

// ------------------------------------------------------------------ AdamW, every tensor at once
// table: five i64 per tensor (w, g, m, v as f32 device addresses, n); block row y updates
// tensor y in place, torch.optim.AdamW's arithmetic (decay = 1 - lr wd, c1 = 1 - beta1,
// c2 = 1 - beta2, bias corrections bc1, bc2).
extern "C" __global__ void adamw_multi(const i64* table, float lr, float decay, float b1,
                                       float c1, float b2, float c2, float eps, float bc1,
                                       float bc2) {
    const i64* e = table + 5 * (i64)blockIdx.y;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= e[4]) return;
    float* w = (float*)e[0];
    const float* g = (const float*)e[1];
    float* m = (float*)e[2];
    float* v = (float*)e[3];
    const float gi = g[i];
    const float mi = m[i] * b1 + gi * c1;
    const float vi = v[i] * b2 + gi * gi * c2;
    m[i] = mi;
    v[i] = vi;
    w[i] = w[i] * decay - (mi / bc1) / (sqrtf(vi / bc2) + eps) * lr;
}

// ------------------------------------------------------------------ LoRA's low-rank term
// y[row] = ybase[row] + scale (x[row] A^T) B^T, x (n, in) and the base product ybase (n, out)
// in T, A (r, in) and B (out, r) in f32, r <= 64: one block per row, h = x A^T in shared memory
// (each warp takes some of its r dot products).
template <typename T>
__device__ void lora_fwd(const T* x, const float* a, const float* b, const T* ybase, T* y,
                         int in, int r, int out, float scale) {
    __shared__ float h[64];
    const i64 row = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int k = warp; k < r; k += warps) {
        float p = 0.f;
        for (int j = lane; j < in; j += 32) p += ld(x, row * in + j) * a[(i64)k * in + j];
        for (int o = 16; o > 0; o >>= 1) p += __shfl_xor_sync(0xffffffffu, p, o);
        if (lane == 0) h[k] = p;
    }
    __syncthreads();
    for (int o = threadIdx.x; o < out; o += blockDim.x) {
        float d = 0.f;
        for (int k = 0; k < r; k++) d += h[k] * b[(i64)o * r + k];
        st(y, row * out + o, ld(ybase, row * out + o) + scale * d);
    }
}

#define LORA(T, S)                                                                             \
    extern "C" __global__ void lora_fwd_##S(const T* x, const float* a, const float* b,        \
                                            const T* ybase, T* y, int in, int r, int out,      \
                                            float scale) {                                     \
        lora_fwd(x, a, b, ybase, y, in, r, out, scale);                                        \
    }
LORA(float, f32)
LORA(bf16, bf16)
