// Causal attention that never holds the score matrix (FlashAttention's tiling and
// recomputation, Dao et al. 2022), compiled once per head size HD (-DHD=64, ...; HD <= 128).
// Token-major layout, as the projections write it: q, o (b, t, nh, HD), k, v (b, T, nkv, HD);
// query head h reads kv head h / (nh / nkv); query i sits at position T - t + i and sees keys
// j <= T - t + i. One thread owns a query row (forward, dq) or a key row (dk, dv), f32
// arithmetic, tiles of the other side in shared memory. Backward recomputes: `attn_stats` the
// rows' log-sum-exp and rowsum(dO * O), then `attn_dq` and `attn_dkv` (the latter sums the
// query heads of its kv head, so no atomics). With `rope` set, q and k come unrotated and are
// rotated as they are read (rotate-half by the f32 tables cs/sn (positions, HD/2); keys before
// `from` stay as they are), and dq, dk are turned back as they are written.

#define TQ (HD > 64 ? 16 : 32)  // query rows per block (forward, dq) or per tile (dkv)
#define TK (HD > 64 ? 16 : 32)  // keys per tile (forward, dq) or per block (dkv)

__device__ __forceinline__ i64 q_at(int bi, int i, int h, int t, int nh) {
    return (((i64)bi * t + i) * nh + h) * HD;
}
__device__ __forceinline__ i64 k_at(int bi, int j, int g, int T, int nkv) {
    return (((i64)bi * T + j) * nkv + g) * HD;
}

// This thread's query row in the query-row kernels (forward, stats, dq): row i of head h in
// batch bi, reading kv head g; it sees `seen` keys and some row of its block sees `kend`.
struct QueryRow {
    int i, h, bi, g, offset, seen, kend;
    bool live;
};

__device__ QueryRow query_row(int t, int T, int nh, int nkv) {
    QueryRow r;
    r.i = blockIdx.x * TQ + threadIdx.x, r.h = blockIdx.y, r.bi = blockIdx.z;
    r.g = r.h / (nh / nkv), r.offset = T - t;
    r.live = r.i < t;
    r.seen = r.live ? r.offset + r.i + 1 : 0;
    r.kend = r.offset + min(t, (int)(blockIdx.x + 1) * TQ);
    return r;
}

// RoPE inside the kernels: the tables, whether to rotate, and the first rotated key.
struct Rot {
    const float* cs;
    const float* sn;
    int on, from;
};

__device__ __forceinline__ Rot make_rot(const float* cs, const float* sn, int on, int from) {
    Rot r;
    r.cs = cs, r.sn = sn, r.on = on, r.from = from;
    return r;
}

// Value c of the head row at x + base, rotated to position p where `on`.
template <typename X>
__device__ __forceinline__ float rot_ld(const X* x, i64 base, int c, const Rot& r, int p, bool on) {
    const float v = ld(x, base + c);
    if (!on) return v;
    const int half = HD / 2, j = c < half ? c : c - half;
    const float co = r.cs[(i64)p * half + j], si = r.sn[(i64)p * half + j];
    return c < half ? v * co - ld(x, base + c + half) * si : v * co + ld(x, base + c - half) * si;
}

// g, a gradient with respect to a row rotated to position p, turned back (where `on`) and
// stored at out + base.
template <typename X>
__device__ __forceinline__ void rot_st(X* out, i64 base, const float* g, const Rot& r, int p,
                                       bool on) {
    const int half = HD / 2;
#pragma unroll
    for (int c = 0; c < HD; c++) {
        float v = g[c];
        if (on) {
            const int j = c < half ? c : c - half;
            const float co = r.cs[(i64)p * half + j], si = r.sn[(i64)p * half + j];
            v = c < half ? g[c] * co + g[c + half] * si : g[c] * co - g[c - half] * si;
        }
        st(out, base + c, v);
    }
}

// Loads keys (rotated where `rotate`) or values j0..j0 + TK of kv head g into shared memory,
// 0 past T.
template <typename X>
__device__ void load_keys(const X* k, float (*ks)[HD], int bi, int j0, int g, int T, int nkv,
                          const Rot& rot, bool rotate) {
    for (int e = threadIdx.x; e < TK * HD; e += blockDim.x) {
        const int r = e / HD, c = e % HD, j = j0 + r;
        const bool on = rotate && rot.on && j >= rot.from;
        ks[r][c] = j < T ? rot_ld(k, k_at(bi, j, g, T, nkv), c, rot, j, on) : 0.f;
    }
}

// o = softmax(scale q k^T + mask) v; grid (ceil(t / TQ), nh, b), TQ threads.
template <typename X>
__device__ void attn_fwd(const X* q, const X* k, const X* v, X* o, int t, int T, int nh,
                         int nkv, float scale, Rot rot) {
    __shared__ float ks[TK][HD];
    __shared__ float vs[TK][HD];
    const QueryRow row_ = query_row(t, T, nh, nkv);
    const int i = row_.i, h = row_.h, bi = row_.bi, g = row_.g, seen = row_.seen, kend = row_.kend;
    const bool live = row_.live;
    float qr[HD], acc[HD];
#pragma unroll
    for (int c = 0; c < HD; c++) {
        qr[c] = live ? rot_ld(q, q_at(bi, i, h, t, nh), c, rot, row_.offset + i, rot.on) * scale
                     : 0.f;
        acc[c] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (int j0 = 0; j0 < kend; j0 += TK) {
        __syncthreads();  // the previous tile is read
        load_keys(k, ks, bi, j0, g, T, nkv, rot, true);
        load_keys(v, vs, bi, j0, g, T, nkv, rot, false);
        __syncthreads();
        const int upto = min(TK, seen - j0);  // this row's visible keys in the tile
        for (int r = 0; r < upto; r++) {
            float sc = 0.f;
#pragma unroll
            for (int c = 0; c < HD; c++) sc += qr[c] * ks[r][c];
            if (sc > m) {  // a new maximum: rescale what is summed so far
                const float corr = expf(m - sc);
                l *= corr;
#pragma unroll
                for (int c = 0; c < HD; c++) acc[c] *= corr;
                m = sc;
            }
            const float p = expf(sc - m);
            l += p;
#pragma unroll
            for (int c = 0; c < HD; c++) acc[c] += p * vs[r][c];
        }
    }
    if (!live) return;
    const float inv = 1.f / l;
#pragma unroll
    for (int c = 0; c < HD; c++) st(o, q_at(bi, i, h, t, nh) + c, acc[c] * inv);
}

// stats[0, bi, h, i] = log-sum-exp of row i's scaled visible scores, stats[1, bi, h, i] =
// sum_c dO[i, c] O[i, c]; grid and block as attn_fwd.
template <typename X>
__device__ void attn_stats(const X* q, const X* k, const X* o, const X* dout, float* stats,
                           int t, int T, int nh, int nkv, float scale, int b, Rot rot) {
    __shared__ float ks[TK][HD];
    const QueryRow row_ = query_row(t, T, nh, nkv);
    const int i = row_.i, h = row_.h, bi = row_.bi, g = row_.g, seen = row_.seen, kend = row_.kend;
    const bool live = row_.live;
    float qr[HD];
    float dd = 0.f;
#pragma unroll
    for (int c = 0; c < HD; c++) {
        const i64 a = q_at(bi, i, h, t, nh);
        qr[c] = live ? rot_ld(q, a, c, rot, row_.offset + i, rot.on) * scale : 0.f;
        dd += live ? ld(dout, a + c) * ld(o, a + c) : 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (int j0 = 0; j0 < kend; j0 += TK) {
        __syncthreads();
        load_keys(k, ks, bi, j0, g, T, nkv, rot, true);
        __syncthreads();
        const int upto = min(TK, seen - j0);
        for (int r = 0; r < upto; r++) {
            float d = 0.f;
#pragma unroll
            for (int c = 0; c < HD; c++) d += qr[c] * ks[r][c];
            const float mn = fmaxf(m, d);
            l = l * expf(m - mn) + expf(d - mn);
            m = mn;
        }
    }
    if (!live) return;
    const i64 row = ((i64)bi * nh + h) * t + i, plane = (i64)b * nh * t;
    stats[row] = m + logf(l);
    stats[plane + row] = dd;
}

// dq = scale sum_j p_ij (dp_ij - D_i) k_j, p = exp(scale q k - lse), dp = dO v; as attn_fwd.
template <typename X>
__device__ void attn_dq(const X* q, const X* k, const X* v, const X* dout, const float* stats,
                        X* dq, int t, int T, int nh, int nkv, float scale, int b, Rot rot) {
    __shared__ float ks[TK][HD];
    __shared__ float vs[TK][HD];
    const QueryRow row_ = query_row(t, T, nh, nkv);
    const int i = row_.i, h = row_.h, bi = row_.bi, g = row_.g, seen = row_.seen, kend = row_.kend;
    const bool live = row_.live;
    const i64 row = ((i64)bi * nh + h) * t + i, plane = (i64)b * nh * t;
    const float lse = live ? stats[row] : 0.f, dd = live ? stats[plane + row] : 0.f;
    float qr[HD], dr[HD], acc[HD];
#pragma unroll
    for (int c = 0; c < HD; c++) {
        const i64 a = q_at(bi, i, h, t, nh);
        qr[c] = live ? rot_ld(q, a, c, rot, row_.offset + i, rot.on) * scale : 0.f;
        dr[c] = live ? ld(dout, a + c) : 0.f;
        acc[c] = 0.f;
    }
    for (int j0 = 0; j0 < kend; j0 += TK) {
        __syncthreads();
        load_keys(k, ks, bi, j0, g, T, nkv, rot, true);
        load_keys(v, vs, bi, j0, g, T, nkv, rot, false);
        __syncthreads();
        const int upto = min(TK, seen - j0);
        for (int r = 0; r < upto; r++) {
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int c = 0; c < HD; c++) {
                s += qr[c] * ks[r][c];
                dp += dr[c] * vs[r][c];
            }
            const float ds = expf(s - lse) * (dp - dd) * scale;
#pragma unroll
            for (int c = 0; c < HD; c++) acc[c] += ds * ks[r][c];
        }
    }
    if (!live) return;
    rot_st(dq, q_at(bi, i, h, t, nh), acc, rot, row_.offset + i, rot.on);
}

// out[0] = dk, out[1] = dv, (2, b, T, nkv, HD): one thread per key j of kv head g, over the
// query heads of the group and the query rows that see j; grid (ceil(T / TK), nkv, b), TK
// threads.
template <typename X>
__device__ void attn_dkv(const X* q, const X* k, const X* v, const X* dout, const float* stats,
                         X* out, int t, int T, int nh, int nkv, float scale, int b, Rot rot) {
    __shared__ float kr[TK][HD + 1];  // this block's keys and values, one row per thread
    __shared__ float vr[TK][HD + 1];
    __shared__ float qs[TQ][HD];  // a tile of query rows and their dO
    __shared__ float ds_[TQ][HD];
    __shared__ float ls[TQ], dds[TQ];
    const int j = blockIdx.x * TK + threadIdx.x, g = blockIdx.y, bi = blockIdx.z;
    const int rep = nh / nkv, offset = T - t;
    const bool live = j < T;
    for (int e = threadIdx.x; e < TK * HD; e += blockDim.x) {
        const int r = e / HD, c = e % HD, jj = blockIdx.x * TK + r;
        const i64 a = k_at(bi, jj, g, T, nkv);
        kr[r][c] = jj < T ? rot_ld(k, a, c, rot, jj, rot.on && jj >= rot.from) : 0.f;
        vr[r][c] = jj < T ? ld(v, a + c) : 0.f;
    }
    float dk[HD], dv[HD];
#pragma unroll
    for (int c = 0; c < HD; c++) dk[c] = dv[c] = 0.f;
    // the first query row that sees this block's first key
    const int i_first = max(0, (int)blockIdx.x * TK - offset);
    const i64 plane = (i64)b * nh * t;
    for (int h = g * rep; h < (g + 1) * rep; h++) {
        for (int i0 = i_first; i0 < t; i0 += TQ) {
            __syncthreads();
            for (int e = threadIdx.x; e < TQ * HD; e += blockDim.x) {
                const int r = e / HD, c = e % HD, i = i0 + r;
                const i64 a = q_at(bi, i, h, t, nh);
                qs[r][c] = i < t ? rot_ld(q, a, c, rot, offset + i, rot.on) * scale : 0.f;
                ds_[r][c] = i < t ? ld(dout, a + c) : 0.f;
            }
            for (int r = threadIdx.x; r < TQ; r += blockDim.x) {
                const i64 row = ((i64)bi * nh + h) * t + i0 + r;
                ls[r] = i0 + r < t ? stats[row] : 0.f;
                dds[r] = i0 + r < t ? stats[plane + row] : 0.f;
            }
            __syncthreads();
            if (!live) continue;
            for (int r = 0; r < TQ; r++) {
                const int i = i0 + r;
                if (i >= t || j > offset + i) continue;
                float s = 0.f, dp = 0.f;
#pragma unroll
                for (int c = 0; c < HD; c++) {
                    s += qs[r][c] * kr[threadIdx.x][c];
                    dp += ds_[r][c] * vr[threadIdx.x][c];
                }
                const float p = expf(s - ls[r]);
                const float ds = p * (dp - dds[r]);  // qs holds scale q: dk gets the scale
#pragma unroll
                for (int c = 0; c < HD; c++) {
                    dv[c] += p * ds_[r][c];
                    dk[c] += ds * qs[r][c];
                }
            }
        }
    }
    if (!live) return;
    const i64 at = k_at(bi, j, g, T, nkv), half = (i64)b * T * nkv * HD;
    rot_st(out, at, dk, rot, j, rot.on && j >= rot.from);
#pragma unroll
    for (int c = 0; c < HD; c++) st(out, half + at + c, dv[c]);
}

// Arguments: tensors (the tables last), the output, then the scalars, RoPE's last.
#define ATTN(X, S)                                                                              \
    extern "C" __global__ void attn_fwd_##S(const X* q, const X* k, const X* v,                 \
                                            const float* cs, const float* sn, X* o, int t,      \
                                            int T, int nh, int nkv, float scale, int rope,      \
                                            int from) {                                         \
        attn_fwd(q, k, v, o, t, T, nh, nkv, scale, make_rot(cs, sn, rope, from));                    \
    }                                                                                           \
    extern "C" __global__ void attn_stats_##S(const X* q, const X* k, const X* o,               \
                                              const X* dout, const float* cs, const float* sn,  \
                                              float* stats, int t, int T, int nh, int nkv,      \
                                              float scale, int b, int rope, int from) {         \
        attn_stats(q, k, o, dout, stats, t, T, nh, nkv, scale, b, make_rot(cs, sn, rope, from));     \
    }                                                                                           \
    extern "C" __global__ void attn_dq_##S(const X* q, const X* k, const X* v, const X* dout,   \
                                           const float* stats, const float* cs,                 \
                                           const float* sn, X* dq, int t, int T, int nh,        \
                                           int nkv, float scale, int b, int rope, int from) {   \
        attn_dq(q, k, v, dout, stats, dq, t, T, nh, nkv, scale, b, make_rot(cs, sn, rope, from));    \
    }                                                                                           \
    extern "C" __global__ void attn_dkv_##S(const X* q, const X* k, const X* v, const X* dout,  \
                                            const float* stats, const float* cs,                \
                                            const float* sn, X* out, int t, int T, int nh,      \
                                            int nkv, float scale, int b, int rope, int from) {  \
        attn_dkv(q, k, v, dout, stats, out, t, T, nh, nkv, scale, b, make_rot(cs, sn, rope, from));  \
    }

ATTN(float, f32)
ATTN(bf16, bf16)
