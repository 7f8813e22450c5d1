// petal's CUDA kernels (crates/petal-ops/src/cuda) run on the CPU through emu.h, against naive
// double-precision references written here from the definitions (gradients: analytic naive
// backward passes, themselves checked by central differences). The launch shapes follow
// cuda/mod.rs: rows one block each (threads = cols rounded up to 32, at most 1024), elementwise
// 256 a block, attention tiles of 32 (16 for heads over 64). Built once per head size:
//
//     g++ -std=c++20 -O2 -pthread -DHD=64 tools/cuda_emu/check.cpp -o /tmp/check && /tmp/check
//
// (tools/cuda_emu/run.sh builds and runs it for heads of 32, 64 and 128.) Exits non-zero on
// the first mismatch.
#include "emu.h"

#include "../../crates/petal-ops/src/cuda/common.cuh"
#include "../../crates/petal-ops/src/cuda/kernels.cu"
#include "../../crates/petal-ops/src/cuda/attention.cu"

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>

using vec = std::vector<float>;
using dvec = std::vector<double>;

static vec rnd(size_t n, unsigned seed, float a = 2.f) {
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> u(-a, a);
    vec v(n);
    for (auto& x : v) x = u(g);
    return v;
}

static int failures = 0;

// max |a - b| / max |b| over the entries, reported against `tol`
static void expect(const char* what, const vec& a, const dvec& b, double tol) {
    double d = 0, m = 1e-30;
    for (size_t i = 0; i < b.size(); i++) {
        d = std::max(d, std::fabs(a[i] - b[i]));
        m = std::max(m, std::fabs(b[i]));
    }
    const bool ok = d / m < tol && a.size() == b.size();
    std::printf("%-58s rel err %.2e %s\n", what, d / m, ok ? "ok" : "FAILED");
    failures += !ok;
}

static unsigned row_threads(int cols) { return std::clamp((cols + 31) / 32, 1, 32) * 32; }

// ----------------------------------------------------------------- rows and elementwise ops

static void check_rms() {
    const int rows = 3, cols = 1500;  // a row longer than the block
    const float eps = 1e-5f;
    vec x = rnd(rows * cols, 1), w = rnd(cols, 2), dy = rnd(rows * cols, 3), y(rows * cols),
        dx(rows * cols);
    emu_launch({rows, 1, 1}, row_threads(cols), [&] { rms_fwd(x.data(), w.data(), y.data(), cols, eps); });
    emu_launch({rows, 1, 1}, row_threads(cols),
               [&] { rms_bwd(x.data(), w.data(), dy.data(), dx.data(), cols, eps); });
    dvec ry(rows * cols), rdx(rows * cols);
    for (int r = 0; r < rows; r++) {
        const float* xr = &x[r * cols];
        // y = x w / sqrt(mean x^2 + eps); L = sum dy y; dL/dx by the quotient rule
        double ss = 0, dot = 0;
        for (int j = 0; j < cols; j++) ss += (double)xr[j] * xr[j], dot += (double)xr[j] * w[j] * dy[r * cols + j];
        const double den = std::sqrt(ss / cols + eps);
        for (int j = 0; j < cols; j++) {
            ry[r * cols + j] = xr[j] * w[j] / den;
            rdx[r * cols + j] = w[j] * dy[r * cols + j] / den - xr[j] * dot / (cols * den * den * den);
        }
    }
    expect("rms_fwd (f32)", y, ry, 1e-5);
    expect("rms_bwd (f32)", dx, rdx, 1e-5);
    // bf16 activations and weight against the f32 results
    std::vector<bf16> xb(x.size()), wb(w.size()), yb(y.size());
    for (size_t i = 0; i < x.size(); i++) st(xb.data(), i, x[i]);
    for (size_t i = 0; i < w.size(); i++) st(wb.data(), i, w[i]);
    emu_launch({rows, 1, 1}, row_threads(cols), [&] { rms_fwd(xb.data(), wb.data(), yb.data(), cols, eps); });
    vec yf(y.size());
    for (size_t i = 0; i < y.size(); i++) yf[i] = ld(yb.data(), i);
    expect("rms_fwd (bf16, against f32)", yf, dvec(ry.begin(), ry.end()), 2e-2);
}

static void check_softmax() {
    // causal: rows are groups of t = 5 queries after 2 seen keys, 7 keys
    const int groups = 4, t = 5, cols = 7, rows = groups * t, offset = 2;
    const float scale = 0.3f;
    vec x = rnd(rows * cols, 4), dy = rnd(rows * cols, 5), y(rows * cols), dx(rows * cols);
    emu_launch({rows, 1, 1}, row_threads(cols),
               [&] { softmax_fwd(x.data(), y.data(), cols, scale, t, offset); });
    emu_launch({rows, 1, 1}, row_threads(cols),
               [&] { softmax_bwd(y.data(), dy.data(), dx.data(), cols, scale); });
    dvec ry(rows * cols, 0), rdx(rows * cols, 0);
    for (int r = 0; r < rows; r++) {
        const int seen = offset + r % t + 1;
        double m = -1e300, s = 0, dot = 0;
        for (int j = 0; j < seen; j++) m = std::max(m, (double)scale * x[r * cols + j]);
        for (int j = 0; j < seen; j++) s += std::exp(scale * x[r * cols + j] - m);
        for (int j = 0; j < seen; j++) ry[r * cols + j] = std::exp(scale * x[r * cols + j] - m) / s;
        for (int j = 0; j < seen; j++) dot += ry[r * cols + j] * dy[r * cols + j];
        for (int j = 0; j < seen; j++) rdx[r * cols + j] = scale * ry[r * cols + j] * (dy[r * cols + j] - dot);
    }
    expect("softmax_fwd (f32, causal, scaled)", y, ry, 1e-6);
    expect("softmax_bwd (f32, causal, scaled)", dx, rdx, 1e-6);
    // plain, a row longer than the block
    const int c2 = 2100;
    vec x2 = rnd(2 * c2, 6), y2(2 * c2);
    emu_launch({2, 1, 1}, row_threads(c2), [&] { softmax_fwd(x2.data(), y2.data(), c2, 1.f, 0, 0); });
    dvec r2(2 * c2);
    for (int r = 0; r < 2; r++) {
        double s = 0;
        for (int j = 0; j < c2; j++) s += std::exp((double)x2[r * c2 + j]);
        for (int j = 0; j < c2; j++) r2[r * c2 + j] = std::exp((double)x2[r * c2 + j]) / s;
    }
    expect("softmax_fwd (f32, 2100 columns)", y2, r2, 1e-5);
}

static void check_rope() {
    // token-major (b, t, h, d): head index / h is the position
    const int b = 2, t = 6, h = 3, d = 16, half = d / 2;
    const long long heads = b * t * h;
    vec x = rnd(heads * d, 7), cs(t * half), sn(t * half), y(heads * d), back(heads * d);
    for (int p = 0; p < t; p++)
        for (int j = 0; j < half; j++) {
            const double a = (p + 4) * std::pow(10.0, -j / 3.0);
            cs[p * half + j] = std::cos(a), sn[p * half + j] = std::sin(a);
        }
    const unsigned grid = (heads * half + 255) / 256;
    emu_launch({grid, 1, 1}, 256, [&] { rope(x.data(), cs.data(), sn.data(), y.data(), heads, d, t, h, 1.f); });
    emu_launch({grid, 1, 1}, 256, [&] { rope(y.data(), cs.data(), sn.data(), back.data(), heads, d, t, h, -1.f); });
    dvec ry(heads * d);
    for (long long hh = 0; hh < heads; hh++) {
        const int p = (hh / h) % t;
        for (int j = 0; j < d; j++) {
            // rotate-half: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
            const int jj = j % half;
            const double rot = j < half ? -x[hh * d + j + half] : x[hh * d + j - half];
            ry[hh * d + j] = x[hh * d + j] * cs[p * half + jj] + rot * sn[p * half + jj];
        }
    }
    expect("rope (f32, token-major)", y, ry, 1e-6);
    expect("rope turned back (its backward)", back, dvec(x.begin(), x.end()), 1e-6);
}

static void check_swiglu() {
    const long long n = 1000;
    vec g = rnd(n, 8), u = rnd(n, 9), dy = rnd(n, 10), y(n), out(2 * n);
    const unsigned grid = (n + 255) / 256;
    emu_launch({grid, 1, 1}, 256, [&] { swiglu_fwd(g.data(), u.data(), y.data(), n); });
    emu_launch({grid, 1, 1}, 256, [&] { swiglu_bwd(g.data(), u.data(), dy.data(), out.data(), n); });
    dvec ry(n), rd(2 * n);
    auto f = [](double g, double u) { return g / (1 + std::exp(-g)) * u; };
    for (long long i = 0; i < n; i++) {
        ry[i] = f(g[i], u[i]);
        const double e = 1e-5;  // central differences
        rd[i] = dy[i] * (f(g[i] + e, u[i]) - f(g[i] - e, u[i])) / (2 * e);
        rd[n + i] = dy[i] * (f(g[i], u[i] + e) - f(g[i], u[i] - e)) / (2 * e);
    }
    expect("swiglu_fwd (f32)", y, ry, 1e-6);
    expect("swiglu_bwd (f32, against central differences)", out, rd, 1e-5);
}

static void check_cross_entropy() {
    const int rows = 6, cols = 2000;
    vec x = rnd(rows * cols, 11), loss(rows), dx(rows * cols);
    std::vector<i64> label = {3, -100, 0, 1999, -100, 7};
    float dy = 0.7f;
    emu_launch({rows, 1, 1}, row_threads(cols), [&] { ce_fwd(x.data(), label.data(), loss.data(), cols); });
    emu_launch({rows, 1, 1}, row_threads(cols),
               [&] { ce_grad(x.data(), label.data(), &dy, dx.data(), cols); });
    dvec rl(rows, 0), rdx(rows * cols, 0);
    for (int r = 0; r < rows; r++) {
        if (label[r] < 0) continue;
        double s = 0;
        for (int j = 0; j < cols; j++) s += std::exp((double)x[r * cols + j]);
        rl[r] = std::log(s) - x[r * cols + label[r]];
        for (int j = 0; j < cols; j++)
            rdx[r * cols + j] = dy * (std::exp((double)x[r * cols + j]) / s - (j == label[r]));
    }
    expect("ce_fwd (f32, ignored rows)", loss, rl, 1e-6);
    expect("ce_grad (f32, ignored rows)", dx, rdx, 1e-6);
}

static void check_adamw() {
    // three tensors of different sizes, two steps, against torch.optim.AdamW's formula
    const double lr = 0.01, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
    std::vector<vec> w, g, m, v;
    std::vector<dvec> rw, rm, rv;
    for (int i = 0; i < 3; i++) {
        const size_t n = 100 + 300 * i;
        w.push_back(rnd(n, 70 + i)), g.push_back(rnd(n, 80 + i));
        m.push_back(vec(n, 0.f)), v.push_back(vec(n, 0.f));
        rw.push_back(dvec(w[i].begin(), w[i].end())), rm.push_back(dvec(n, 0)), rv.push_back(dvec(n, 0));
    }
    std::vector<i64> table;
    for (int i = 0; i < 3; i++)
        for (i64 p : {(i64)w[i].data(), (i64)g[i].data(), (i64)m[i].data(), (i64)v[i].data(), (i64)w[i].size()})
            table.push_back(p);
    for (int t = 1; t <= 2; t++) {
        const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
        emu_launch({(700 + 255) / 256, 3, 1}, 256, [&] {
            adamw_multi(table.data(), lr, 1 - lr * wd, b1, 1 - b1, b2, 1 - b2, eps, bc1, bc2);
        });
        for (int i = 0; i < 3; i++)
            for (size_t j = 0; j < rw[i].size(); j++) {
                const double gj = g[i][j];
                rw[i][j] *= 1 - lr * wd;
                rm[i][j] = b1 * rm[i][j] + (1 - b1) * gj;
                rv[i][j] = b2 * rv[i][j] + (1 - b2) * gj * gj;
                rw[i][j] -= lr * (rm[i][j] / bc1) / (std::sqrt(rv[i][j] / bc2) + eps);
            }
    }
    for (int i = 0; i < 3; i++) {
        char name[64];
        std::snprintf(name, sizeof name, "adamw_multi, tensor %d of 3, two steps: w", i);
        expect(name, w[i], rw[i], 1e-6);
        expect("  m", m[i], rm[i], 1e-6);
        expect("  v", v[i], rv[i], 1e-5);
    }
}

// ----------------------------------------------------------------- attention

struct Attn {
    int b, t, T, nh, nkv;
    float scale;
    int rope = 0, from = 0;  // RoPE inside: keys from `from` on and every query rotated
    // q (b, t, nh, HD), k, v (b, T, nkv, HD)
    size_t qa(int bi, int i, int h) const { return (((size_t)bi * t + i) * nh + h) * HD; }
    size_t ka(int bi, int j, int g) const { return (((size_t)bi * T + j) * nkv + g) * HD; }

    // RoPE tables (positions 0..T, HD/2) for the kernels, in f32
    vec cs, sn;
    void tables() {
        const int half = HD / 2;
        cs.assign((size_t)T * half, 0), sn.assign((size_t)T * half, 0);
        for (int p = 0; p < T; p++)
            for (int j = 0; j < half; j++) {
                const double a = p * std::pow(10000.0, -2.0 * j / HD);
                cs[p * half + j] = std::cos(a), sn[p * half + j] = std::sin(a);
            }
    }
    // x's rows rotated in place to their positions (sign -1: turned back), in double
    void rotate(dvec& x, bool queries, double sign) const {
        if (!rope) return;
        const int half = HD / 2, heads = queries ? nh : nkv, n = queries ? t : T;
        for (int bi = 0; bi < b; bi++)
            for (int r = 0; r < n; r++)
                for (int h = 0; h < heads; h++) {
                    const int p = queries ? T - t + r : r;
                    if (!queries && r < from) continue;
                    const size_t a = queries ? qa(bi, r, h) : ka(bi, r, h);
                    for (int j = 0; j < half; j++) {
                        const double c = cs[p * half + j], s = sign * sn[p * half + j];
                        const double x1 = x[a + j], x2 = x[a + j + half];
                        x[a + j] = x1 * c - x2 * s, x[a + j + half] = x2 * c + x1 * s;
                    }
                }
    }

    // o and the gradients from full score matrices, in double: rotate q and k, attend, and
    // turn dq, dk back
    void reference(const vec& q0, const vec& k0, const vec& v, const vec& dout, dvec& o, dvec& dq,
                   dvec& dk, dvec& dv) const {
        dvec q(q0.begin(), q0.end()), k(k0.begin(), k0.end());
        rotate(q, true, 1), rotate(k, false, 1);
        o.assign(q.size(), 0), dq.assign(q.size(), 0), dk.assign(k.size(), 0), dv.assign(v.size(), 0);
        const int off = T - t, rep = nh / nkv;
        for (int bi = 0; bi < b; bi++)
            for (int h = 0; h < nh; h++) {
                const int g = h / rep;
                for (int i = 0; i < t; i++) {
                    const int seen = off + i + 1;
                    dvec p(seen), dp(seen);
                    double m = -1e300, s = 0, pdp = 0;
                    for (int j = 0; j < seen; j++) {
                        double d = 0;
                        for (int c = 0; c < HD; c++) d += q[qa(bi, i, h) + c] * k[ka(bi, j, g) + c];
                        p[j] = scale * d;
                        m = std::max(m, p[j]);
                    }
                    for (int j = 0; j < seen; j++) s += (p[j] = std::exp(p[j] - m));
                    for (int j = 0; j < seen; j++) {
                        p[j] /= s;
                        double d = 0;
                        for (int c = 0; c < HD; c++) {
                            o[qa(bi, i, h) + c] += p[j] * v[ka(bi, j, g) + c];
                            dv[ka(bi, j, g) + c] += p[j] * dout[qa(bi, i, h) + c];
                            d += (double)dout[qa(bi, i, h) + c] * v[ka(bi, j, g) + c];
                        }
                        dp[j] = d;
                        pdp += p[j] * d;
                    }
                    for (int j = 0; j < seen; j++) {
                        const double ds = p[j] * (dp[j] - pdp) * scale;
                        for (int c = 0; c < HD; c++) {
                            dq[qa(bi, i, h) + c] += ds * k[ka(bi, j, g) + c];
                            dk[ka(bi, j, g) + c] += ds * q[qa(bi, i, h) + c];
                        }
                    }
                }
            }
        rotate(dq, true, -1), rotate(dk, false, -1);
    }
};

static void check_attention(Attn a, unsigned seed) {
    const int tile = HD > 64 ? 16 : 32;
    a.tables();
    vec q = rnd((size_t)a.b * a.t * a.nh * HD, seed), k = rnd((size_t)a.b * a.T * a.nkv * HD, seed + 1),
        v = rnd(k.size(), seed + 2), dout = rnd(q.size(), seed + 3);
    vec o(q.size()), stats(2 * (size_t)a.b * a.nh * a.t), dq(q.size()), dkv(2 * k.size());
    const emu_dim3 over_q{(unsigned)((a.t + tile - 1) / tile), (unsigned)a.nh, (unsigned)a.b};
    const emu_dim3 over_k{(unsigned)((a.T + tile - 1) / tile), (unsigned)a.nkv, (unsigned)a.b};
    const Rot rot = make_rot(a.cs.data(), a.sn.data(), a.rope, a.from);
    emu_launch(over_q, tile, [&] { attn_fwd(q.data(), k.data(), v.data(), o.data(), a.t, a.T, a.nh, a.nkv, a.scale, rot); });
    emu_launch(over_q, tile, [&] {
        attn_stats(q.data(), k.data(), o.data(), dout.data(), stats.data(), a.t, a.T, a.nh, a.nkv, a.scale, a.b, rot);
    });
    emu_launch(over_q, tile, [&] {
        attn_dq(q.data(), k.data(), v.data(), dout.data(), stats.data(), dq.data(), a.t, a.T, a.nh, a.nkv, a.scale,
                a.b, rot);
    });
    emu_launch(over_k, tile, [&] {
        attn_dkv(q.data(), k.data(), v.data(), dout.data(), stats.data(), dkv.data(), a.t, a.T, a.nh, a.nkv,
                 a.scale, a.b, rot);
    });
    dvec ro, rdq, rdk, rdv;
    a.reference(q, k, v, dout, ro, rdq, rdk, rdv);
    std::printf("attention b%d t%d T%d heads %d/%d d%d%s\n", a.b, a.t, a.T, a.nh, a.nkv, HD,
                a.rope ? (a.from ? " RoPE, keys before 3 unrotated" : " RoPE") : "");
    expect("  attn_fwd", o, ro, 1e-5);
    expect("  attn_dq", dq, rdq, 1e-5);
    expect("  attn_dkv: dk", vec(dkv.begin(), dkv.begin() + k.size()), rdk, 1e-5);
    expect("  attn_dkv: dv", vec(dkv.begin() + k.size(), dkv.end()), rdv, 1e-5);

    // the reference's gradient itself, by central differences of its loss sum(dout * o)
    auto loss = [&](const vec& qq, const vec& kk, const vec& vv) {
        dvec o2, x1, x2, x3;
        a.reference(qq, kk, vv, dout, o2, x1, x2, x3);
        double l = 0;
        for (size_t i = 0; i < o2.size(); i++) l += o2[i] * dout[i];
        return l;
    };
    double worst = 0;
    for (int which = 0; which < 3; which++)
        for (size_t idx : {(size_t)0, (size_t)HD + 3, k.size() - 1}) {
            vec qq = q, kk = k, vv = v;
            vec& x = which == 0 ? qq : which == 1 ? kk : vv;
            const dvec& g = which == 0 ? rdq : which == 1 ? rdk : rdv;
            const size_t at = idx % x.size();
            const float e = 1e-2f, x0 = x[at];
            x[at] = x0 + e;
            const double lp = loss(qq, kk, vv);
            x[at] = x0 - e;
            const double lm = loss(qq, kk, vv);
            worst = std::max(worst, std::fabs((lp - lm) / (2 * e) - g[at]) / (std::fabs(g[at]) + 1e-3));
        }
    const bool ok = worst < 1e-3;
    std::printf("  %-56s rel err %.2e %s\n", "reference gradient against central differences", worst, ok ? "ok" : "FAILED");
    failures += !ok;
}

int main() {
    std::printf("heads of %d values\n", HD);
    if (HD == 64) {  // the row and elementwise kernels do not depend on HD
        check_rms();
        check_softmax();
        check_rope();
        check_swiglu();
        check_cross_entropy();
        check_adamw();
    }
    check_attention({2, 5, 5, 2, 2, 0.125f}, 20);
    check_attention({1, 37, 45, 4, 2, 0.1f}, 30);   // several blocks and tiles, 8 keys seen before
    check_attention({1, 20, 23, 3, 1, 0.2f}, 40);   // three query heads on one kv head
    check_attention({2, 33, 40, 4, 2, 0.125f, 1, 3}, 50);  // RoPE inside, 3 prefix keys
    check_attention({1, 20, 20, 2, 1, 0.2f, 1, 0}, 60);    // RoPE inside, every key
    std::printf(failures ? "%d FAILED\n" : "all ok\n", failures);
    return failures ? 1 : 0;
}
