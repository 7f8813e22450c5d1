//! Causal attention that never holds the score matrix: `softmax(scale q k^T + mask) v` computed
//! row by row with a scratch of one row of scores per thread, keeping only each row's
//! log-sum-exp for backward (FlashAttention's recomputation, Dao et al., 2022). The composed form
//! (`causal_attention_reference`) materialises scores and probabilities of shape (rows, T) for
//! every head and keeps them for backward: O(t T) memory per head against O(t) here.
//!
//! Layout (grouped-query attention without copying k/v per query head): q is (b, g, R, d) with
//! R = rep * t rows per kv group, row r being query position r % t (HF's repeat_kv order); k, v
//! are (b, g, T, d); query position i sees keys j <= i + offset (offset = T - t: prefix or cache).
//!
//! Backward recomputes the probabilities twice: once per row for dq, once per key chunk for dk
//! and dv, so every output element has one writer and the passes run in parallel without locks.

use crate::cpu::{f32s, fast_ok};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Rows (forward, dq) and keys (dk, dv) per parallel task.
const CHUNK: usize = 16;

struct Flash {
    scale: f32,
    t: usize,
    offset: usize,
    /// Each row's log-sum-exp of the scaled scores, from the forward pass.
    lse: Mutex<Vec<f32>>,
}

struct Dims {
    pairs: usize, // b * g
    rows: usize,  // R
    keys: usize,  // T
    d: usize,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

impl Flash {
    /// Keys visible to row r.
    fn visible(&self, r: usize, keys: usize) -> usize {
        (r % self.t + self.offset + 1).min(keys)
    }

    fn dims(&self, q: &Layout, k: &Layout) -> Result<Dims> {
        let (qd, kd) = (q.shape().dims(), k.shape().dims());
        if qd.len() != 4 || kd.len() != 4 || qd[..2] != kd[..2] || qd[3] != kd[3] {
            candle_core::bail!("causal_attention: q {qd:?} and k/v {kd:?} do not fit")
        }
        Ok(Dims {
            pairs: qd[0] * qd[1],
            rows: qd[2],
            keys: kd[2],
            d: qd[3],
        })
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
        let (q, k, v) = (f32s(qs, ql)?, f32s(ks, kl)?, f32s(vs, vl)?);
        let Dims {
            rows,
            keys,
            d,
            pairs,
        } = self.dims(ql, kl)?;
        let mut out = vec![0f32; pairs * rows * d];
        let mut lse = vec![0f32; pairs * rows];
        out.par_chunks_mut(rows * d)
            .zip(lse.par_chunks_mut(rows))
            .enumerate()
            .for_each(|(pair, (out, lse))| {
                let kp = &k[pair * keys * d..(pair + 1) * keys * d];
                let vp = &v[pair * keys * d..(pair + 1) * keys * d];
                let qp = &q[pair * rows * d..(pair + 1) * rows * d];
                out.par_chunks_mut(CHUNK * d)
                    .zip(lse.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each_init(
                        || vec![0f32; keys],
                        |s, (c, (o, l))| {
                            for (i, (o, l)) in o.chunks_mut(d).zip(l.iter_mut()).enumerate() {
                                let r = c * CHUNK + i;
                                let qr = &qp[r * d..(r + 1) * d];
                                let n = self.visible(r, keys);
                                let mut m = f32::NEG_INFINITY;
                                for (j, s) in s[..n].iter_mut().enumerate() {
                                    *s = self.scale * dot(qr, &kp[j * d..(j + 1) * d]);
                                    m = m.max(*s);
                                }
                                let mut z = 0f32;
                                for s in s[..n].iter_mut() {
                                    *s = (*s - m).exp();
                                    z += *s;
                                }
                                o.fill(0.0);
                                for (j, &p) in s[..n].iter().enumerate() {
                                    axpy(o, p / z, &vp[j * d..(j + 1) * d]);
                                }
                                *l = m + z.ln();
                            }
                        },
                    );
            });
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("lse lock".into()))? = lse;
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let host = |t: &Tensor| t.contiguous()?.flatten_all()?.to_vec1::<f32>();
        let (qv, kv, vv, ov, gv) = (host(q)?, host(k)?, host(v)?, host(o)?, host(grad)?);
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("lse lock".into()))?
            .clone();
        let Dims {
            rows,
            keys,
            d,
            pairs,
        } = self.dims(q.layout(), k.layout())?;
        if lse.len() != pairs * rows {
            candle_core::bail!("causal_attention: backward without its forward")
        }
        // D_r = dO_r . O_r
        let dd: Vec<f32> = gv
            .chunks(d)
            .zip(ov.chunks(d))
            .map(|(g, o)| dot(g, o))
            .collect();
        let row = |pair: usize, n: usize, i: usize| (pair * n + i) * d..(pair * n + i + 1) * d;
        // p_rj and ds_rj = p_rj (dO_r . v_j - D_r)
        let probs = |pair: usize, r: usize, j: usize| -> (f32, f32) {
            let s = self.scale * dot(&qv[row(pair, rows, r)], &kv[row(pair, keys, j)]);
            let p = (s - lse[pair * rows + r]).exp();
            let dp = dot(&gv[row(pair, rows, r)], &vv[row(pair, keys, j)]);
            (p, p * (dp - dd[pair * rows + r]))
        };
        // dq_r = scale sum_j ds_rj k_j, per row
        let mut dq = vec![0f32; qv.len()];
        dq.par_chunks_mut(rows * d)
            .enumerate()
            .for_each(|(pair, dq)| {
                dq.par_chunks_mut(CHUNK * d)
                    .enumerate()
                    .for_each(|(c, dq)| {
                        for (i, dq) in dq.chunks_mut(d).enumerate() {
                            let r = c * CHUNK + i;
                            for j in 0..self.visible(r, keys) {
                                let (_, ds) = probs(pair, r, j);
                                axpy(dq, self.scale * ds, &kv[row(pair, keys, j)]);
                            }
                        }
                    });
            });
        // dv_j = sum_r p_rj dO_r and dk_j = scale sum_r ds_rj q_r, per key chunk
        let mut dk = vec![0f32; kv.len()];
        let mut dv = vec![0f32; vv.len()];
        dk.par_chunks_mut(keys * d)
            .zip(dv.par_chunks_mut(keys * d))
            .enumerate()
            .for_each(|(pair, (dk, dv))| {
                dk.par_chunks_mut(CHUNK * d)
                    .zip(dv.par_chunks_mut(CHUNK * d))
                    .enumerate()
                    .for_each(|(c, (dk, dv))| {
                        let (j0, n) = (c * CHUNK, dk.len() / d);
                        for r in 0..rows {
                            let vis = self.visible(r, keys);
                            if vis <= j0 {
                                continue;
                            }
                            let (qr, gr) = (&qv[row(pair, rows, r)], &gv[row(pair, rows, r)]);
                            for i in 0..n.min(vis - j0) {
                                let (p, ds) = probs(pair, r, j0 + i);
                                axpy(&mut dv[i * d..(i + 1) * d], p, gr);
                                axpy(&mut dk[i * d..(i + 1) * d], self.scale * ds, qr);
                            }
                        }
                    });
            });
        let t = |x: Vec<f32>, like: &Tensor| Tensor::from_vec(x, like.shape(), like.device());
        Ok((Some(t(dq, q)?), Some(t(dk, k)?), Some(t(dv, v)?)))
    }
}

/// The composed twin: scores, `causal_softmax` (in f32) and the weighted sum of values.
pub fn causal_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    t: usize,
    offset: usize,
) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?; // (b, g, R, T)
    let p = crate::causal_softmax(&scores, scale, t, offset)?.to_dtype(v.dtype())?;
    p.matmul(v)
}

/// `softmax(scale q k^T + causal mask) v` for grouped q (b, g, rep * t, d) and k, v (b, g, T, d),
/// query position i seeing keys j <= i + offset. f32 on the CPU takes the kernel that never holds
/// the (rep * t, T) scores; other devices and dtypes the composed ops.
pub fn causal_attention(
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
    if !(fast_ok(q) && fast_ok(k) && fast_ok(v)) {
        return causal_attention_reference(q, k, v, scale, t, offset);
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Flash {
            scale: scale as f32,
            t,
            offset,
            lse: Mutex::new(Vec::new()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rand, same};

    #[test]
    fn blockwise_causal_attention_equals_the_composed_ops_in_value_and_gradients() {
        // (batch, groups, rep, t, offset, d): GQA with 2 query heads per group, a prefix or
        // cache (offset > 0), one position per head (decoding), rows not a multiple of the chunk
        for (b, g, rep, t, offset, d) in [
            (2, 3, 2, 16, 0, 8),
            (1, 2, 4, 8, 5, 4),
            (2, 1, 3, 1, 7, 6),
            (2, 2, 1, 21, 2, 5),
        ] {
            let inputs = [
                rand(&[b, g, rep * t, d], 1),
                rand(&[b, g, t + offset, d], 2),
                rand(&[b, g, t + offset, d], 3),
            ];
            let scale = 1.0 / (d as f64).sqrt();
            same(
                &inputs,
                |x| causal_attention(&x[0], &x[1], &x[2], scale, t, offset).unwrap(),
                |x| causal_attention_reference(&x[0], &x[1], &x[2], scale, t, offset).unwrap(),
            );
        }
    }
}
