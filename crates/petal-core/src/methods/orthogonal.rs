//! Orthogonal blocks from skew-symmetric parameters, shared by OFT and BOFT: the Cayley
//! transform (exact, or PEFT's Neumann series), blockwise rotation of inputs and the dense
//! block-diagonal form for merging.

use crate::Result;
use candle_core::{DType, Device, Tensor};
use petal_ops::Kernels;

/// Skew-symmetric (k, b, b) matrices from their strict upper triangles (k, b(b-1)/2), in
/// `triu_indices` order (row-major), as one matmul with a fixed ±1 scatter matrix.
pub(crate) fn skew_from_upper(v: &Tensor, b: usize) -> Result<Tensor> {
    let k = v.dim(0)?;
    Ok(v.matmul(&scatter(b, v.device())?)?.reshape((k, b, b))?)
}

/// The constant (b(b-1)/2, b^2) ±1 scatter matrix, made once per block size and device: built
/// per call it cost a host loop and a buffer kept alive by every layer's graph.
fn scatter(b: usize, dev: &Device) -> Result<Tensor> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<(usize, String), Tensor>>> = OnceLock::new();
    let key = (b, format!("{:?}", dev.location()));
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .expect("scatter cache");
    if let Some(t) = cache.get(&key) {
        return Ok(t.clone());
    }
    let n = b * (b - 1) / 2;
    let mut e = vec![0f32; n * b * b];
    let mut i = 0;
    for r in 0..b {
        for c in r + 1..b {
            e[i * b * b + r * b + c] = 1.0;
            e[i * b * b + c * b + r] = -1.0;
            i += 1;
        }
    }
    let t = Tensor::from_vec(e, (n, b * b), dev)?;
    cache.insert(key, t.clone());
    Ok(t)
}

pub(crate) fn eye_batch(k: usize, b: usize, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::eye(b, DType::F32, dev)?
        .unsqueeze(0)?
        .repeat((k, 1, 1))?)
}

/// Exact Cayley transform `(I - Q)(I + Q)^-1` of a batch (k, b, b).
pub(crate) fn cayley(q: &Tensor) -> Result<Tensor> {
    let (k, b, _) = q.dims3()?;
    let eye = eye_batch(k, b, q.device())?;
    let inv = petal_ops::inverse(&(&eye + q)?)?;
    Ok((eye - q)?.matmul(&inv)?)
}

/// PEFT's Cayley-Neumann series with `terms` terms: `I + 2Q + 2Q^2 + … + 2Q^(t-2) + Q^(t-1)`
/// for t > 2 (its loop, read literally: 3 and 4 terms agree). It expands `(I + Q)(I - Q)^-1`,
/// the transpose of the exact form PEFT uses: the two parameterisations rotate opposite ways.
pub(crate) fn cayley_neumann(q: &Tensor, terms: usize) -> Result<Tensor> {
    let (k, b, _) = q.dims3()?;
    let mut r = eye_batch(k, b, q.device())?;
    if terms > 1 {
        r = (r + (q * 2.0)?)?;
        if terms > 2 {
            let q2 = q.matmul(q)?;
            r = (r + (&q2 * 2.0)?)?;
            let mut p = q2;
            for _ in 3..terms.saturating_sub(1) {
                p = p.matmul(q)?;
                r = (r + (&p * 2.0)?)?;
            }
            p = p.matmul(q)?;
            r = (r + p)?;
        }
    }
    Ok(r)
}

/// x (n, k * b) times diag(R_1 … R_k), blockwise: `x_j R_j` for each block of columns.
pub(crate) fn rotate_blocks(k: Kernels, x: &Tensor, r: &Tensor) -> Result<Tensor> {
    Ok(petal_ops::rotate_blocks(k, x, r)?)
}

/// The dense block-diagonal matrix of a batch of blocks (k, b, b).
pub(crate) fn block_diag(r: &Tensor) -> Result<Tensor> {
    let (k, b, _) = r.dims3()?;
    let v = r.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let n = k * b;
    let mut m = vec![0f32; n * n];
    for (blk, vals) in v.chunks(b * b).enumerate() {
        for i in 0..b {
            let row = (blk * b + i) * n + blk * b;
            m[row..row + b].copy_from_slice(&vals[i * b..(i + 1) * b]);
        }
    }
    Ok(Tensor::from_vec(m, (n, n), r.device())?)
}
