//! The composed path a GPU takes (`Kernels::REFERENCE` here, where it runs on the CPU): each op
//! as one lean graph node with a hand-written or recomputed backward, against plain autograd
//! through the composed candle ops, in value and every input gradient.

use candle_core::{Device, Tensor};
use petal_ops::nn;
use petal_ops::testing::{rand, same};
use petal_ops::Kernels;

/// The composed ops, as a GPU takes them (no fused CPU kernel, no CUDA kernel).
const K: Kernels = Kernels::REFERENCE;

fn tables(t: usize, d: usize) -> (Tensor, Tensor) {
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10f32.powf(i as f32 / 3.0))
        .collect();
    nn::rope_tables(&inv, t, &Device::Cpu).unwrap()
}

#[test]
fn the_softmax_node_matches_autograd_through_the_composed_softmax() {
    same(
        &[rand(&[3, 5, 7], 1)],
        |t| petal_ops::softmax_last_dim(K, &t[0]).unwrap(),
        |t| nn::softmax_last_dim_reference(&t[0]).unwrap(),
    )
}

#[test]
fn the_causal_softmax_node_matches_autograd_through_scale_mask_and_softmax() {
    // 2 groups of t = 3 queries a row block, 4 keys, one key seen before
    same(
        &[rand(&[2, 6, 4], 2)],
        |t| petal_ops::causal_softmax(K, &t[0], 0.7, 3, 1).unwrap(),
        |t| {
            let mask = nn::causal_mask(3, 1, candle_core::DType::F32, &Device::Cpu).unwrap();
            let s = (&t[0] * 0.7).unwrap().reshape((4, 3, 4)).unwrap();
            let s = s.broadcast_add(&mask).unwrap().reshape((2, 6, 4)).unwrap();
            nn::softmax_last_dim_reference(&s).unwrap()
        },
    )
}

#[test]
fn the_rms_norm_node_matches_autograd_through_the_composed_norm() {
    let w = rand(&[7], 3); // frozen: a plain tensor
    same(
        &[rand(&[2, 3, 7], 4)],
        |t| petal_ops::rms_norm(K, &t[0], &w, 1e-5).unwrap(),
        |t| nn::rms_norm_reference(&t[0], &w, 1e-5).unwrap(),
    )
}

#[test]
fn the_rope_nodes_match_autograd_through_the_composed_rotation_in_both_layouts() {
    let (cos, sin) = tables(4, 8);
    same(
        &[rand(&[2, 3, 4, 8], 5)],
        |t| petal_ops::apply_rope(K, &t[0], &cos, &sin).unwrap(),
        |t| nn::apply_rope_reference(&t[0], &cos, &sin).unwrap(),
    );
    // token-major (b, t, heads * d)
    same(
        &[rand(&[2, 4, 3 * 8], 6)],
        |t| petal_ops::apply_rope_bthd(K, &t[0], &cos, &sin).unwrap(),
        |t| {
            let x = t[0].reshape((2, 4, 3, 8)).unwrap().transpose(1, 2).unwrap();
            let y = nn::apply_rope_reference(&x, &cos, &sin).unwrap();
            y.transpose(1, 2).unwrap().reshape((2, 4, 24)).unwrap()
        },
    );
}

#[test]
fn the_lora_node_matches_autograd_through_base_plus_scaled_low_rank() {
    let w = rand(&[7, 5], 7);
    let bias = rand(&[7], 8);
    same(
        &[rand(&[2, 3, 5], 9), rand(&[4, 5], 10), rand(&[7, 4], 11)],
        |t| petal_ops::lora(K, &t[0], &w, Some(&bias), &t[1], &t[2], 1.5).unwrap(),
        |t| {
            let h = t[0]
                .reshape((6, 5))
                .unwrap()
                .matmul(&t[1].t().unwrap())
                .unwrap();
            let d = (h.matmul(&t[2].t().unwrap()).unwrap() * 1.5).unwrap();
            let y = t[0].matmul(
                &w.t()
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
                    .repeat((2, 1, 1))
                    .unwrap(),
            );
            (y.unwrap().broadcast_add(&bias).unwrap() + d.reshape((2, 3, 7)).unwrap()).unwrap()
        },
    )
}

#[test]
fn the_recomputed_attention_node_matches_autograd_through_rope_grouped_heads_and_softmax() {
    // 4 query heads on 2 kv heads of 8, 3 new tokens after a 2-token prefix (unrotated keys)
    let (cos, sin) = tables(5, 8);
    let rows = |x: &Tensor, p0, n| x.narrow(0, p0, n).unwrap();
    same(
        &[
            rand(&[2, 3, 32], 12),
            rand(&[2, 5, 16], 13),
            rand(&[2, 5, 16], 14),
        ],
        |t| {
            let rope = Some(petal_ops::Rope {
                cos: &cos,
                sin: &sin,
                from: 2,
            });
            petal_ops::causal_attention_bthd(K, &t[0], &t[1], &t[2], 8, 0.35, rope).unwrap()
        },
        |t| {
            let heads = |x: &Tensor, h| {
                let n = x.dim(1).unwrap();
                x.reshape((2, n, h, 8)).unwrap().transpose(1, 2).unwrap()
            };
            let q =
                nn::apply_rope_reference(&heads(&t[0], 4), &rows(&cos, 2, 3), &rows(&sin, 2, 3));
            let k = heads(&t[1], 2);
            let tail = k.narrow(2, 2, 3).unwrap();
            let tail = nn::apply_rope_reference(&tail, &rows(&cos, 2, 3), &rows(&sin, 2, 3));
            let k = Tensor::cat(&[&k.narrow(2, 0, 2).unwrap(), &tail.unwrap()], 2).unwrap();
            // query head h reads kv head h / 2
            let rep = |x: Tensor| {
                x.unsqueeze(2)
                    .unwrap()
                    .repeat((1, 1, 2, 1, 1))
                    .unwrap()
                    .reshape((2, 4, 5, 8))
                    .unwrap()
            };
            let (k, v) = (rep(k), rep(heads(&t[2], 2)));
            let s = (q.unwrap().matmul(&k.t().unwrap()).unwrap() * 0.35).unwrap();
            let mask = nn::causal_mask(3, 2, candle_core::DType::F32, &Device::Cpu).unwrap();
            let p = nn::softmax_last_dim_reference(&s.broadcast_add(&mask).unwrap()).unwrap();
            let o = p.matmul(&v).unwrap(); // (2, 4, 3, 8)
            o.transpose(1, 2).unwrap().reshape((2, 3, 32)).unwrap()
        },
    )
}

#[test]
fn the_pair_rotation_node_matches_autograd_through_the_composed_rotation() {
    // RoAd's transform over groups of 4 features, y, f and s all trained
    same(
        &[rand(&[2, 3, 8], 15), rand(&[8], 16), rand(&[8], 17)],
        |t| petal_ops::pair_rotate(K, &t[0], &t[1], &t[2], 4).unwrap(),
        |t| petal_ops::pair_rotate::pair_rotate_reference(&t[0], &t[1], &t[2], 4).unwrap(),
    )
}

#[test]
fn the_block_rotation_node_matches_autograd_through_the_batched_block_product() {
    // OFT's x R for 3 blocks of 4, x and the blocks both trained
    same(
        &[rand(&[5, 12], 18), rand(&[3, 4, 4], 19)],
        |t| petal_ops::rotate_blocks(K, &t[0], &t[1]).unwrap(),
        |t| petal_ops::blocks::rotate_blocks_reference(&t[0], &t[1]).unwrap(),
    )
}

#[test]
fn the_swiglu_node_matches_autograd_through_silu_times_up() {
    same(
        &[rand(&[3, 4, 9], 21), rand(&[3, 4, 9], 22)],
        |t| petal_ops::swiglu(K, &t[0], &t[1]).unwrap(),
        |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
    )
}
