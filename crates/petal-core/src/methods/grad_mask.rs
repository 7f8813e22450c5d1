//! Masks chosen from squared weight gradients (RoSA's and FISH's): a layer's full-weight
//! gradient `G = dy^T x` captured in backward without W ever being a variable, its squares
//! accumulated, and the top entries picked.

use crate::Result;
use candle_core::{DType, Tensor, Var};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Squared weight gradients of one linear, accumulated over backward passes.
#[derive(Debug, Default)]
pub(crate) struct GradSquares {
    acc: Mutex<Option<Tensor>>,
    /// Backward passes (per batch) or samples (per sample) accumulated
    count: AtomicUsize,
}

impl GradSquares {
    /// `y` unchanged, as a graph node whose backward adds `G²` to the accumulator, G the weight
    /// gradient `dy^T x` of the whole batch, or with `per_sample` each sample's own (the first
    /// axis of x and y; the empirical Fisher sums per-sample squares). `probe` is any variable,
    /// so the node is in the graph even where nothing below it is trained.
    pub fn capture(
        self: &std::sync::Arc<Self>,
        x: &Tensor,
        y: Tensor,
        probe: &Var,
        per_sample: bool,
    ) -> Result<Tensor> {
        let me = self.clone();
        let x = x.detach();
        let inp = x.dim(candle_core::D::Minus1)?;
        let out = y.dim(candle_core::D::Minus1)?;
        let samples = if per_sample && x.rank() == 3 {
            x.dim(0)?
        } else {
            1
        };
        Ok(petal_ops::lean::lean2(
            [&y, probe.as_tensor()],
            |[y, _]| Ok(y.clone()),
            move |_, _, _, dy_in| {
                let dy = dy_in.to_dtype(DType::F32)?;
                let xf = x.to_dtype(DType::F32)?;
                let (dy, xf) = (
                    dy.reshape((samples, dy.elem_count() / samples / out, out))?,
                    xf.reshape((samples, xf.elem_count() / samples / inp, inp))?,
                );
                // (samples, out, in): each sample's gradient, squared, summed
                let g = dy.transpose(1, 2)?.matmul(&xf)?.sqr()?.sum(0)?;
                let mut acc = me.acc.lock().expect("gradient accumulator");
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
                me.count.fetch_add(samples, Ordering::Relaxed);
                Ok([Some(dy_in.clone()), None])
            },
        )?)
    }

    /// Samples (or passes) accumulated so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// The mean of the squares so far, and the accumulator emptied.
    pub fn take_mean(&self) -> Result<Option<Tensor>> {
        let n = self.count.swap(0, Ordering::Relaxed).max(1);
        let acc = self.acc.lock().expect("gradient accumulator").take();
        Ok(acc.map(|a| a / n as f64).transpose()?)
    }
}

/// Flat positions of the `k` largest entries of `scores` (any shape), ascending.
pub(crate) fn top_k(scores: &Tensor, k: usize) -> Result<Vec<i64>> {
    let v = scores
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let k = k.min(v.len());
    let mut order: Vec<usize> = (0..v.len()).collect();
    if k < v.len() {
        order.select_nth_unstable_by(k, |&a, &b| v[b].total_cmp(&v[a]));
    }
    let mut keep: Vec<i64> = order[..k].iter().map(|&i| i as i64).collect();
    keep.sort_unstable();
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_captured_squares_are_the_weight_gradients_squared() {
        // y = x W^T with W a variable gives dW = dy^T x directly: the capture must agree
        let x = crate::testing::rand_tensor(&[2, 3, 4], 1);
        let w = Var::from_tensor(&crate::testing::rand_tensor(&[5, 4], 2)).unwrap();
        let probe = Var::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let proj = crate::testing::rand_tensor(&[2, 3, 5], 3);
        for per_sample in [false, true] {
            let acc = std::sync::Arc::new(GradSquares::default());
            let y = x.broadcast_matmul(&w.as_tensor().t().unwrap()).unwrap();
            let y = acc.capture(&x, y, &probe, per_sample).unwrap();
            let g = (y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let got = acc.take_mean().unwrap().unwrap();
            let want = if per_sample {
                let mut s = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
                for b in 0..2 {
                    let (xb, pb) = (x.get(b).unwrap(), proj.get(b).unwrap());
                    s = (s + pb.t().unwrap().matmul(&xb).unwrap().sqr().unwrap()).unwrap();
                }
                (s / 2.0).unwrap()
            } else {
                g.get(w.as_tensor()).unwrap().sqr().unwrap()
            };
            assert!(
                crate::testing::max_rel(&got, &want) < 1e-5,
                "per sample {per_sample}"
            );
        }
    }

    #[test]
    fn top_k_keeps_the_largest_in_ascending_positions() {
        let a = Tensor::new(&[[0.1f32, 5.0], [3.0, -9.0]], &Device::Cpu).unwrap();
        assert_eq!(top_k(&a, 2).unwrap(), vec![1, 2]);
        assert_eq!(top_k(&a, 9).unwrap(), vec![0, 1, 2, 3]);
    }
}
