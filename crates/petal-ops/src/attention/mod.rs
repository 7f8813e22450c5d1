//! Causal attention that never holds the whole score matrix: `softmax(scale q k^T + mask) v`
//! computed by tiles of query rows, keeping only each row's log-sum-exp for backward, which
//! recomputes the probabilities tile by tile (FlashAttention's recomputation, Dao et al., 2022).
//! The composed form (`causal_attention_reference`) materialises scores and probabilities of
//! shape (rows, T) for every head and keeps them for backward: O(t T) memory per head, against
//! one (64, T) tile per thread here. Tile products run through the `gemm` crate (the matrix
//! multiply candle itself uses), so the arithmetic is that of the composed form.
//!
//! Layout (grouped-query attention without copying k/v per query head): q is (b, g, R, d) with
//! R = rep * t rows per kv group, row r being query position r % t (HF's repeat_kv order); k, v
//! are (b, g, T, d); query position i sees keys j <= i + offset (offset = T - t: prefix or cache).
//! Forward runs tiles in parallel; backward runs (batch, group) pairs in parallel, each owning
//! its dk, dv. `causal_attention_bthd` takes and returns the token-major layout the projections
//! produce (q (b, t, heads, d), k, v (b, T, kv_heads, d)): the op reorders into the grouped
//! layout inside (transient buffers), so no transposed copy of q, k, v or the output becomes a
//! node of the graph.

use crate::cpu::{act_in, act_out, cols, fast_act_ok, mm, rows, View};
use crate::Kernels;
use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

mod composed;
use composed::attention_bthd_composed;
pub use composed::causal_attention_reference;

/// Query rows per tile.
const TILE: usize = 64;

struct Flash {
    scale: f32,
    t: usize,
    offset: usize,
    /// `Some(head_dim)`: inputs and output in the token-major layout (b, t, heads, d) or
    /// (b, t, heads * d)
    bthd: Option<usize>,
    /// RoPE applied inside the op to q and k (given unrotated)
    rope: Option<Rotary>,
    /// Each row's log-sum-exp of the scaled scores, from the forward pass.
    lse: Mutex<Vec<f32>>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Flash {
    /// Keys visible to row r.
    fn visible(&self, r: usize, keys: usize) -> usize {
        (r % self.t + self.offset + 1).min(keys)
    }

    /// Keys visible to any row of the tile starting at r0 with n rows.
    fn tile_keys(&self, r0: usize, n: usize, keys: usize) -> usize {
        if r0 % self.t + n > self.t {
            keys // the tile wraps to the next head: it holds a last position
        } else {
            self.visible(r0 + n - 1, keys)
        }
    }

    /// Scaled scores of the tile's rows against the first `nk` keys, as probabilities
    /// `exp(s - lse)` with masked entries 0. With `lse = None` the rows are normalised here and
    /// their log-sum-exp written to `out_lse`.
    #[allow(clippy::too_many_arguments)]
    fn probs(
        &self,
        r0: usize,
        qt: &[f32],
        kt: View,
        d: usize,
        nk: usize,
        p: &mut [f32],
        lse: Option<&[f32]>,
        out_lse: &mut [f32],
    ) {
        let n = qt.len() / d;
        mm(n, nk, d, p, false, self.scale, rows(qt, d), kt, false);
        for (i, row) in p[..n * nk].chunks_mut(nk).enumerate() {
            let vis = self.visible(r0 + i, nk.max(1)).min(nk);
            row[vis..].fill(0.0);
            let row = &mut row[..vis];
            match lse {
                Some(l) => crate::vmath::exp_sub(row, l[i]),
                None => {
                    let m = crate::vmath::max(row);
                    let z = crate::vmath::exp_sub_sum(row, m);
                    let inv = 1.0 / z;
                    row.iter_mut().for_each(|x| *x *= inv);
                    out_lse[i] = m + z.ln();
                }
            }
        }
    }

    fn dims(&self, q: &Layout, k: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (qd, kd) = (q.shape().dims(), k.shape().dims());
        if let Some(d) = self.bthd {
            // (b, t, nh [, d]) and (b, T, nkv [, d]): pairs (b, kv head), rows rep * t
            let (nh, nkv) = (token_heads(qd, d)?, token_heads(kd, d)?);
            if qd[0] != kd[0] || nkv == 0 || nh % nkv != 0 {
                candle_core::bail!("causal_attention: q {qd:?} and k/v {kd:?} do not fit")
            }
            return Ok((qd[0] * nkv, nh / nkv * qd[1], kd[1], d));
        }
        if qd.len() != 4 || kd.len() != 4 || qd[..2] != kd[..2] || qd[3] != kd[3] {
            candle_core::bail!("causal_attention: q {qd:?} and k/v {kd:?} do not fit")
        }
        // (pairs, rows, keys, d)
        Ok((qd[0] * qd[1], qd[2], kd[2], qd[3]))
    }
}

/// RoPE inside the attention op (rotate-half, HF layout): cos/sin (positions, d/2) from
/// position `first` (the first one rotated); query row r sits at position offset + r % t, key
/// j at position j, and keys before `from` (a prefix, whose keys PEFT gives as they are, or a
/// cache's, rotated already) are not rotated.
struct Rotary {
    cos: Vec<f32>,
    sin: Vec<f32>,
    first: usize,
    from: usize,
}

impl Rotary {
    /// Rotates rows of `x` (d values each) whose position `pos(row)` is Some, by the opposite
    /// angles with `inverse` (the backward pass).
    fn apply(
        &self,
        x: &mut [f32],
        d: usize,
        inverse: bool,
        pos: impl Fn(usize) -> Option<usize> + Sync,
    ) {
        let half = d / 2;
        let sign = if inverse { -1.0 } else { 1.0 };
        x.par_chunks_mut(d).enumerate().for_each(|(row, v)| {
            let Some(p) = pos(row) else { return };
            let p = p - self.first;
            let (c, s) = (
                &self.cos[p * half..(p + 1) * half],
                &self.sin[p * half..(p + 1) * half],
            );
            crate::rope::rotate_half(v, c, s, sign);
        });
    }
}

impl Flash {
    /// q (grouped) and k (laid out as `kv` says) rotated by the op's RoPE, if it has one;
    /// keys before `from` are left as they are (and not copied when none is rotated).
    fn rotate<'a>(
        &self,
        q: std::borrow::Cow<'a, [f32]>,
        k: std::borrow::Cow<'a, [f32]>,
        (nr, keys, d): (usize, usize, usize),
        kv: KvLayout,
        inverse: bool,
    ) -> (std::borrow::Cow<'a, [f32]>, std::borrow::Cow<'a, [f32]>) {
        let Some(rot) = &self.rope else { return (q, k) };
        let mut q = q.into_owned();
        rot.apply(&mut q, d, inverse, |row| {
            Some(self.offset + row % nr % self.t)
        });
        if rot.from >= keys {
            return (q.into(), k);
        }
        let mut k = k.into_owned();
        rot.apply(&mut k, d, inverse, |row| {
            Some(kv.key_of_row(row, keys)).filter(|&j| j >= rot.from)
        });
        (q.into(), k.into())
    }

    /// How k and v lie: grouped (pairs, keys, d), or token-major (b, keys, kv_heads, d).
    fn kv_layout(&self, kl: &Layout, d: usize) -> Result<KvLayout> {
        Ok(match self.bthd {
            None => KvLayout { kv_heads: None },
            Some(_) => KvLayout {
                kv_heads: Some(token_heads(kl.shape().dims(), d)?),
            },
        })
    }
}

/// Where the keys and values of a (batch, kv head) pair lie.
#[derive(Clone, Copy)]
struct KvLayout {
    /// `Some(kv_heads)` for the token-major layout
    kv_heads: Option<usize>,
}

impl KvLayout {
    /// The key index of a row of d values.
    fn key_of_row(&self, row: usize, keys: usize) -> usize {
        match self.kv_heads {
            None => row % keys,
            Some(h) => row / h % keys,
        }
    }

    /// The pair's keys as k^T (d, keys) and values as (keys, d), read in place.
    fn views<'a>(
        &self,
        k: &'a [f32],
        v: &'a [f32],
        pair: usize,
        keys: usize,
        d: usize,
    ) -> (View<'a>, View<'a>) {
        let (start, stride) = match self.kv_heads {
            None => (pair * keys * d, d),
            Some(h) => ((pair / h * keys * h + pair % h) * d, h * d),
        };
        let (k, v) = (&k[start..], &v[start..]);
        (
            View {
                x: k,
                rs: 1,
                cs: stride,
            },
            View {
                x: v,
                rs: stride,
                cs: 1,
            },
        )
    }
}

/// Heads of a token-major (b, t, heads, d) or (b, t, heads * d) shape with head size `d`.
fn token_heads(dims: &[usize], d: usize) -> Result<usize> {
    let width: usize = dims.iter().skip(2).product();
    if !(dims.len() == 3 || dims.len() == 4 && dims[3] == d) || d == 0 || width % d != 0 {
        candle_core::bail!("causal_attention: {dims:?} is not token-major with heads of {d}")
    }
    Ok(width / d)
}

/// (b, a1, a2, d) -> (b, a2, a1, d), rows of d in parallel.
fn swap12(x: &[f32], dims: [usize; 4]) -> Vec<f32> {
    let [_, a1, a2, d] = dims;
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(a1 * d).enumerate().for_each(|(bj, dst)| {
        let (bi, j) = (bj / a2, bj % a2);
        for (i, row) in dst.chunks_mut(d).enumerate() {
            let at = ((bi * a1 + i) * a2 + j) * d;
            row.copy_from_slice(&x[at..at + d]);
        }
    });
    y
}

impl Flash {
    /// A token-major tensor's values in the grouped layout (b, heads, t, d); as they are for
    /// the grouped layout.
    fn grouped<'a>(
        &self,
        x: std::borrow::Cow<'a, [f32]>,
        dims: &[usize],
    ) -> Result<std::borrow::Cow<'a, [f32]>> {
        let Some(d) = self.bthd else { return Ok(x) };
        let h = token_heads(dims, d)?;
        Ok(swap12(&x, [dims[0], dims[1], h, d]).into())
    }

    /// Grouped-layout values of a tensor of token-major `dims` back in that layout.
    fn ungrouped(&self, x: Vec<f32>, dims: &[usize]) -> Result<Vec<f32>> {
        let Some(d) = self.bthd else { return Ok(x) };
        let h = token_heads(dims, d)?;
        Ok(swap12(&x, [dims[0], h, dims[1], d]))
    }
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "petal-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // bf16 activations are widened for the f32 arithmetic (one layer's q, k, v at a time)
        let (q, k, v) = (act_in(qs, ql)?, act_in(ks, kl)?, act_in(vs, vl)?);
        let (pairs, nr, keys, d) = self.dims(ql, kl)?;
        // q (small when decoding) in the grouped layout; k and v read where they are
        let q = self.grouped(q, ql.shape().dims())?;
        let kv = self.kv_layout(kl, d)?;
        let (q, k) = self.rotate(q, k, (nr, keys, d), kv, false);
        let mut out = vec![0f32; pairs * nr * d];
        let mut lse = vec![0f32; pairs * nr];
        out.par_chunks_mut(nr * d)
            .zip(lse.par_chunks_mut(nr))
            .enumerate()
            .for_each(|(pair, (out, lse))| {
                let (kt, vr) = kv.views(&k, &v, pair, keys, d);
                let qp = &q[pair * nr * d..(pair + 1) * nr * d];
                out.par_chunks_mut(TILE * d)
                    .zip(lse.par_chunks_mut(TILE))
                    .enumerate()
                    .for_each_init(
                        || vec![0f32; TILE * keys],
                        |p, (c, (o, l))| {
                            let (r0, n) = (c * TILE, l.len());
                            let nk = self.tile_keys(r0, n, keys);
                            let qt = &qp[r0 * d..(r0 + n) * d];
                            self.probs(r0, qt, kt, d, nk, p, None, l);
                            mm(n, d, nk, o, false, 1.0, rows(p, nk), vr, false);
                        },
                    );
            });
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("lse lock".into()))? = lse;
        let out = self.ungrouped(out, ql.shape().dims())?;
        Ok((act_out(out, qs.dtype())?, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let host = |t: &Tensor, like: &Tensor| -> Result<Vec<f32>> {
            let x = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            Ok(self.grouped(x.into(), like.dims())?.into_owned())
        };
        let (pairs, nr, keys, d) = self.dims(q.layout(), k.layout())?;
        // backward works on grouped copies of everything
        let grouped = KvLayout { kv_heads: None };
        let dims = (nr, keys, d);
        let (qv, kv) = self.rotate(host(q, q)?.into(), host(k, k)?.into(), dims, grouped, false);
        let vv = host(v, v)?;
        let (ov, gv) = (host(o, q)?, host(grad, q)?);
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("lse lock".into()))?
            .clone();
        if lse.len() != pairs * nr {
            candle_core::bail!("causal_attention: backward without its forward")
        }
        // D_r = dO_r . O_r
        let dd: Vec<f32> = gv
            .chunks(d)
            .zip(ov.chunks(d))
            .map(|(g, o)| dot(g, o))
            .collect();
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; qv.len()],
            vec![0f32; kv.len()],
            vec![0f32; vv.len()],
        );
        dq.par_chunks_mut(nr * d)
            .zip(dk.par_chunks_mut(keys * d).zip(dv.par_chunks_mut(keys * d)))
            .enumerate()
            .for_each(|(pair, (dq, (dk, dv)))| {
                let (qo, ko) = (pair * nr * d, pair * keys * d);
                let (qp, gp) = (&qv[qo..qo + nr * d], &gv[qo..qo + nr * d]);
                let (kp, vp) = (&kv[ko..ko + keys * d], &vv[ko..ko + keys * d]);
                let (lp, dp_) = (
                    &lse[pair * nr..(pair + 1) * nr],
                    &dd[pair * nr..(pair + 1) * nr],
                );
                let mut p = vec![0f32; TILE * keys];
                let mut ds = vec![0f32; TILE * keys];
                for r0 in (0..nr).step_by(TILE) {
                    let n = TILE.min(nr - r0);
                    let nk = self.tile_keys(r0, n, keys);
                    let (qt, gt) = (&qp[r0 * d..(r0 + n) * d], &gp[r0 * d..(r0 + n) * d]);
                    let kt = cols(kp, d);
                    self.probs(r0, qt, kt, d, nk, &mut p, Some(&lp[r0..r0 + n]), &mut []);
                    // dS = P (dO V^T - D)
                    mm(
                        n,
                        nk,
                        d,
                        &mut ds,
                        false,
                        1.0,
                        rows(gt, d),
                        cols(vp, d),
                        false,
                    );
                    for i in 0..n {
                        let (pr, sr) = (&p[i * nk..(i + 1) * nk], &mut ds[i * nk..(i + 1) * nk]);
                        sr.iter_mut()
                            .zip(pr)
                            .for_each(|(s, p)| *s = p * (*s - dp_[r0 + i]));
                    }
                    let dqt = &mut dq[r0 * d..(r0 + n) * d];
                    mm(
                        n,
                        d,
                        nk,
                        dqt,
                        false,
                        self.scale,
                        rows(&ds, nk),
                        rows(kp, d),
                        false,
                    );
                    mm(
                        nk,
                        d,
                        n,
                        dk,
                        true,
                        self.scale,
                        cols(&ds, nk),
                        rows(qt, d),
                        false,
                    );
                    mm(nk, d, n, dv, true, 1.0, cols(&p, nk), rows(gt, d), false);
                }
            });
        // gradients of the rotated q, k turned back through the rotation
        let (dq, dk) = self.rotate(dq.into(), dk.into(), dims, grouped, true);
        let (dq, dk) = (dq.into_owned(), dk.into_owned());
        let t = |x: Vec<f32>, like: &Tensor| -> Result<Tensor> {
            let x = self.ungrouped(x, like.dims())?;
            Ok(crate::cpu::tensor(act_out(x, like.dtype())?, like.shape()))
        };
        Ok((Some(t(dq, q)?), Some(t(dk, k)?), Some(t(dv, v)?)))
    }
}

/// `softmax(scale q k^T + causal mask) v` for grouped q (b, g, rep * t, d) and k, v (b, g, T, d),
/// query position i seeing keys j <= i + offset. f32 on the CPU takes the kernel that never holds
/// the (rep * t, T) scores; other devices and dtypes the composed ops.
pub fn causal_attention(
    kern: Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    t: usize,
    offset: usize,
) -> Result<Tensor> {
    let (rows, keys) = (q.dim(2)?, k.dim(2)?);
    if t == 0 || rows % t != 0 || offset + t != keys {
        candle_core::bail!(
            "causal_attention: {rows} rows are not groups of t = {t}, or t + offset != {keys} keys"
        )
    }
    let same = q.dtype() == k.dtype() && k.dtype() == v.dtype();
    if !(same && fast_act_ok(kern, q) && fast_act_ok(kern, k) && fast_act_ok(kern, v)) {
        return composed::causal_attention_composed(kern, q, k, v, scale, t, offset);
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Flash {
            scale: scale as f32,
            t,
            offset,
            bthd: None,
            rope: None,
            lse: Mutex::new(Vec::new()),
        },
    )
}

/// RoPE to apply inside `causal_attention_bthd`: cos/sin tables (positions, d/2) from position
/// 0 covering every key; keys before `from` (a prefix given as keys) stay unrotated.
#[derive(Clone, Copy)]
pub struct Rope<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub from: usize,
}

/// `causal_attention` in the token-major layout: q (b, t, heads, d) and k, v (b, T, kv_heads,
/// d), or the same with heads and d merged (b, t, heads * d) as the projections write them, with
/// T - t keys already seen (prefix or cache); returns q's shape. Query head h reads kv head
/// h / (heads / kv_heads) (HF's repeat_kv). With `rope`, q and k come unrotated and are rotated
/// inside (query i at position T - t + i, key j at j), so no rotated copy becomes a graph node.
/// On the CPU the kernel reorders inside; elsewhere the composed ops run on transposed copies.
pub fn causal_attention_bthd(
    kern: Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    head_dim: usize,
    scale: f64,
    rope: Option<Rope>,
) -> Result<Tensor> {
    let (nh, nkv) = (
        token_heads(q.dims(), head_dim)?,
        token_heads(k.dims(), head_dim)?,
    );
    let (b, t, keys, d) = (q.dim(0)?, q.dim(1)?, k.dim(1)?, head_dim);
    if t == 0 || nkv == 0 || nh % nkv != 0 || keys < t || k.dims() != v.dims() || k.dim(0)? != b {
        candle_core::bail!(
            "causal_attention: q {:?} and k/v {:?} are not token-major with t <= T and heads a \
             multiple of kv heads",
            q.dims(),
            k.dims()
        )
    }
    if let Some(r) = rope {
        if r.cos.dim(0)? < keys || 2 * r.cos.dim(1)? != d || r.from > keys {
            candle_core::bail!(
                "causal_attention: rope tables {:?} do not cover {keys} keys of {d} values (from {})",
                r.cos.dims(),
                r.from
            )
        }
    }
    let same = q.dtype() == k.dtype() && k.dtype() == v.dtype();
    if same && crate::cuda::attention_usable(kern, q, head_dim) {
        // the kernels rotate q and k as they read them; no score matrix held
        let rope = rope.map(|r| (r.cos, r.sin, r.from));
        return crate::cuda::attention(q, k, v, head_dim, scale, rope);
    }
    if !(same && fast_act_ok(kern, q) && fast_act_ok(kern, k) && fast_act_ok(kern, v)) {
        // one node that keeps q, k, v and the output only; backward recomputes the rest
        let rope = rope.map(|r| (r.cos.clone(), r.sin.clone(), r.from));
        return crate::lean::recompute3([q, k, v], move |[q, k, v]| {
            let rope = rope.as_ref().map(|(cos, sin, from)| Rope {
                cos,
                sin,
                from: *from,
            });
            attention_bthd_composed(kern, q, k, v, head_dim, scale, rope)
        });
    }
    // the tables' rows for the positions rotated only, queries' and keys' from `from` (a
    // model's tables cover its whole context; a decoding step rotates its one query)
    let first = rope.map_or(0, |r| r.from.min(keys - t));
    let table = |x: &Tensor| {
        x.narrow(0, first, keys - first)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let rope = rope
        .map(|r| -> Result<Rotary> {
            Ok(Rotary {
                cos: table(r.cos)?,
                sin: table(r.sin)?,
                first,
                from: r.from,
            })
        })
        .transpose()?;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Flash {
            scale: scale as f32,
            t,
            offset: keys - t,
            bthd: Some(d),
            rope,
            lse: Mutex::new(Vec::new()),
        },
    )
}

#[cfg(test)]
mod tests;
