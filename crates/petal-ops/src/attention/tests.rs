//! The blockwise kernel against the composed ops, in both layouts, with and without RoPE.

use super::*;
use crate::testing::{rand, same};

#[test]
fn token_major_attention_equals_the_composed_ops_on_transposed_heads() {
    // (batch, t, heads, kv heads, offset, d)
    for (b, t, nh, nkv, offset, d) in [(2, 16, 4, 2, 0, 8), (1, 7, 3, 1, 5, 4), (2, 1, 2, 2, 3, 6)]
    {
        let inputs = [
            rand(&[b, t, nh, d], 1),
            rand(&[b, t + offset, nkv, d], 2),
            rand(&[b, t + offset, nkv, d], 3),
        ];
        let scale = 1.0 / (d as f64).sqrt();
        // the reference: heads first (b, heads, t, d), query heads grouped per kv head
        let reference = |x: &[Tensor]| {
            let g = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
            let qg = g(&x[0]).reshape((b, nkv, nh / nkv * t, d)).unwrap();
            let o =
                causal_attention_reference(&qg, &g(&x[1]), &g(&x[2]), scale, t, offset).unwrap();
            o.reshape((b, nh, t, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        same(
            &inputs,
            |x| causal_attention_bthd(Kernels::FUSED, &x[0], &x[1], &x[2], d, scale, None).unwrap(),
            reference,
        );
        // heads and d merged (b, t, heads * d), as the projections write them
        let merged: Vec<Tensor> = inputs.iter().map(|x| x.flatten_from(2).unwrap()).collect();
        same(
            &merged,
            |x| causal_attention_bthd(Kernels::FUSED, &x[0], &x[1], &x[2], d, scale, None).unwrap(),
            |x| {
                let split = |x: &Tensor| x.reshape((b, (), x.dim(2).unwrap() / d, d)).unwrap();
                let o = reference(&[split(&x[0]), split(&x[1]), split(&x[2])]);
                o.flatten_from(2).unwrap()
            },
        );
    }
}

#[test]
fn rope_inside_attention_equals_rotating_q_and_the_unprefixed_keys_first() {
    let inv: Vec<f32> = (0..3).map(|i| 1.0 / 100f32.powf(i as f32 / 3.0)).collect();
    let (cos, sin) = crate::nn::rope_tables(&inv, 40, &candle_core::Device::Cpu).unwrap();
    // (batch, t, heads, kv heads, keys, prefix keys left unrotated), d = 6
    for (b, t, nh, nkv, keys, from) in [(2, 9, 4, 2, 9, 0), (1, 5, 2, 1, 12, 3), (2, 1, 3, 3, 7, 2)]
    {
        let d = 6;
        let scale = 0.4;
        let rope = Rope {
            cos: &cos,
            sin: &sin,
            from,
        };
        // the composed reference: heads first, rotate, then the composed attention
        let reference = |x: &[Tensor]| {
            let g = |x: &Tensor, h: usize| {
                x.reshape((b, (), h, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let rot = |x: &Tensor, p0: usize, n: usize| {
                crate::nn::apply_rope_reference(
                    x,
                    &cos.narrow(0, p0, n).unwrap(),
                    &sin.narrow(0, p0, n).unwrap(),
                )
                .unwrap()
            };
            let q = rot(&g(&x[0], nh), keys - t, t);
            let k = g(&x[1], nkv);
            let k = Tensor::cat(
                &[
                    k.narrow(2, 0, from).unwrap(),
                    rot(&k.narrow(2, from, keys - from).unwrap(), from, keys - from),
                ],
                2,
            )
            .unwrap();
            let qg = q.reshape((b, nkv, nh / nkv * t, d)).unwrap();
            let o =
                causal_attention_reference(&qg, &k, &g(&x[2], nkv), scale, t, keys - t).unwrap();
            let o = o.reshape((b, nh, t, d)).unwrap().transpose(1, 2).unwrap();
            o.contiguous().unwrap().reshape((b, t, nh * d)).unwrap()
        };
        same(
            &[
                rand(&[b, t, nh * d], 1),
                rand(&[b, keys, nkv * d], 2),
                rand(&[b, keys, nkv * d], 3),
            ],
            |x| {
                causal_attention_bthd(Kernels::FUSED, &x[0], &x[1], &x[2], d, scale, Some(rope))
                    .unwrap()
            },
            reference,
        );
    }
}

#[test]
fn blockwise_causal_attention_equals_the_composed_ops_in_value_and_gradients() {
    // (batch, groups, rep, t, offset, d): GQA with 2 query heads per group, a prefix or
    // cache (offset > 0), one position per head (decoding), rows not a multiple of the chunk
    for (b, g, rep, t, offset, d) in [
        (2, 3, 2, 16, 0, 8),
        (1, 2, 4, 8, 5, 4),
        (2, 1, 3, 1, 7, 6),
        (2, 2, 1, 21, 2, 5),
        (1, 2, 3, 50, 4, 8), // tiles of 64 rows wrapping across heads
    ] {
        let inputs = [
            rand(&[b, g, rep * t, d], 1),
            rand(&[b, g, t + offset, d], 2),
            rand(&[b, g, t + offset, d], 3),
        ];
        let scale = 1.0 / (d as f64).sqrt();
        same(
            &inputs,
            |x| causal_attention(Kernels::FUSED, &x[0], &x[1], &x[2], scale, t, offset).unwrap(),
            |x| causal_attention_reference(&x[0], &x[1], &x[2], scale, t, offset).unwrap(),
        );
    }
}
