//! Decompositions of one weight matrix on the host, in f64 (nalgebra), for initialisations that
//! start an adapter from the base weight's structure: PiSSA, LoftQ and MiCA (singular vectors),
//! OLoRA (QR).
//! They run once per module when an adapter is attached, never in the training step.

use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};

/// A row-major (rows, cols) matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    fn to_na(&self) -> DMatrix<f64> {
        DMatrix::from_row_slice(self.rows, self.cols, &self.data)
    }

    fn from_na(m: &DMatrix<f64>) -> Mat {
        let (rows, cols) = m.shape();
        let data = (0..rows)
            .flat_map(|i| (0..cols).map(move |j| (i, j)))
            .map(|(i, j)| m[(i, j)])
            .collect();
        Mat { rows, cols, data }
    }
}

/// Top-`r` singular triplets of `w`, largest first: `U_r (rows, r)`, `S_r (r)`, `V_r^T (r, cols)`.
pub fn svd_top(w: &Mat, r: usize) -> (Mat, Vec<f64>, Mat) {
    svd_range(w, |k| 0..r.min(k))
}

/// The last `r` singular triplets of `w` in descending order (torch's `U[:, -r:]` of a thin
/// SVD of `min(rows, cols) = k` triplets): the smallest singular values, the largest of them
/// first.
pub fn svd_bottom(w: &Mat, r: usize) -> (Mat, Vec<f64>, Mat) {
    svd_range(w, |k| k - r.min(k)..k)
}

/// The singular triplets at the positions `range(k)` of the thin SVD sorted by singular value,
/// largest first (`k = min(rows, cols)`).
fn svd_range(w: &Mat, range: impl Fn(usize) -> std::ops::Range<usize>) -> (Mat, Vec<f64>, Mat) {
    let svd = w.to_na().svd(true, true);
    let (u, vt) = (svd.u.expect("requested U"), svd.v_t.expect("requested V^T"));
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
    let order = &order[range(order.len())];
    let r = order.len();
    let ur = DMatrix::from_fn(w.rows, r, |i, j| u[(i, order[j])]);
    let vtr = DMatrix::from_fn(r, w.cols, |i, j| vt[(order[i], j)]);
    let s = order.iter().map(|&k| svd.singular_values[k]).collect();
    (Mat::from_na(&ur), s, Mat::from_na(&vtr))
}

/// Randomised top-`r` SVD (Halko, Martinsson and Tropp, 2011, as torch's `svd_lowrank(q = r)`):
/// a Gaussian sketch refined by `niter` power iterations, then the exact SVD of the small
/// projection. Deterministic in `seed`.
pub fn svd_lowrank(w: &Mat, r: usize, niter: usize, seed: u64) -> (Mat, Vec<f64>, Mat) {
    let a = w.to_na();
    let mut g = rand::rngs::StdRng::seed_from_u64(seed);
    let omega = DMatrix::from_fn(w.cols, r, |_, _| {
        let (u1, u2): (f64, f64) = (g.gen::<f64>().max(1e-300), g.gen());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    });
    let orth = |m: DMatrix<f64>| m.qr().q();
    let mut q = orth(&a * omega);
    for _ in 0..niter {
        q = orth(a.transpose() * &q);
        q = orth(&a * &q);
    }
    let b = q.transpose() * &a; // (r, cols)
    let (ub, s, vt) = svd_top(&Mat::from_na(&b), r);
    let u = &q * ub.to_na();
    (Mat::from_na(&u), s, vt)
}

/// Reduced QR by Householder reflections (LAPACK's convention, as `torch.linalg.qr`):
/// `Q (rows, k)`, `R (k, cols)`, `k = min(rows, cols)`.
pub fn qr(w: &Mat) -> (Mat, Mat) {
    let qr = w.to_na().qr();
    (Mat::from_na(&qr.q()), Mat::from_na(&qr.r()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        Mat {
            rows,
            cols,
            data: (0..rows * cols).map(|_| g.gen_range(-1.0..1.0)).collect(),
        }
    }

    fn product(a: &Mat, s: Option<&[f64]>, b: &Mat) -> Vec<f64> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for k in 0..a.cols {
                let f = a.data[i * a.cols + k] * s.map_or(1.0, |s| s[k]);
                for j in 0..b.cols {
                    out[i * b.cols + j] += f * b.data[k * b.cols + j];
                }
            }
        }
        out
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn the_full_svd_reconstructs_the_matrix_with_sorted_singular_values() {
        let w = random(7, 5, 1);
        let (u, s, vt) = svd_top(&w, 5);
        assert!(max_diff(&product(&u, Some(&s), &vt), &w.data) < 1e-12);
        assert!(s.windows(2).all(|p| p[0] >= p[1]));
    }

    #[test]
    fn the_randomised_svd_finds_the_top_subspace_of_a_low_rank_matrix() {
        // rank-3 matrix: the sketch of rank 3 recovers it exactly
        let (a, b) = (random(20, 3, 2), random(3, 12, 3));
        let w = Mat {
            rows: 20,
            cols: 12,
            data: product(&a, None, &b),
        };
        let (u, s, vt) = svd_lowrank(&w, 3, 2, 9);
        assert!(max_diff(&product(&u, Some(&s), &vt), &w.data) < 1e-9);
        let (_, s_exact, _) = svd_top(&w, 3);
        assert!(max_diff(&s, &s_exact) < 1e-9);
    }

    #[test]
    fn the_bottom_triplets_are_the_last_of_the_full_svd() {
        let w = random(9, 6, 5);
        let (u, s, vt) = svd_top(&w, 6);
        let (ub, sb, vtb) = svd_bottom(&w, 2);
        assert_eq!(sb, s[4..].to_vec());
        for i in 0..9 {
            assert_eq!(ub.data[i * 2..i * 2 + 2], u.data[i * 6 + 4..i * 6 + 6]);
        }
        assert_eq!(vtb.data, vt.data[4 * 6..].to_vec());
    }

    #[test]
    fn qr_reconstructs_the_matrix_with_orthonormal_q_and_upper_triangular_r() {
        let w = random(6, 9, 4);
        let (q, r) = qr(&w);
        assert_eq!((q.rows, q.cols, r.rows, r.cols), (6, 6, 6, 9));
        assert!(max_diff(&product(&q, None, &r), &w.data) < 1e-12);
        for i in 0..r.rows {
            for j in 0..i {
                assert_eq!(r.data[i * r.cols + j], 0.0);
            }
        }
    }
}
