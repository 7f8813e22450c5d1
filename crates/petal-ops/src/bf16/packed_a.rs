//! The operands of `mm_bf16_into` beyond `mm_bf16_packed`'s: a left operand packed once for
//! several products, every k-block's row panels in the order the kernel reads them (the forward
//! over a quantized weight multiplies the same x by each tile of W; packing x again for every
//! tile rounded and moved all of it each time), and an output that is a tile of a wider one.

use super::{kc_here, pack_a_panel, AView, Aligned, MR};
use crate::amx::Bf16Kernel;
use rayon::prelude::*;

/// Where a product's `(m, n)` result goes: columns `c0..c0 + n` of a row-major `c` with `ldc`
/// values a row (a tile of a wider output, written in place).
pub(crate) struct Out<'a> {
    pub c: &'a mut [f32],
    pub ldc: usize,
    pub c0: usize,
}

/// The left operand: a view packed one k-block at a time as the product runs, or packed once
/// already (for several products with the same left operand).
#[derive(Clone, Copy)]
pub(crate) enum Left<'a> {
    View(AView<'a>),
    Packed(&'a PackedA),
}

pub(crate) struct PackedA {
    pub(super) m: usize,
    pub(super) k: usize,
    /// pairs per k-block (as the products' `PackedB`)
    pub(super) kc: usize,
    /// rows per panel (the kernel's)
    pub(super) mr: usize,
    words: Aligned,
}

impl PackedA {
    /// `a (m, k)` packed for products on `kernel`.
    pub fn new(kernel: Bf16Kernel, a: AView, m: usize, k: usize, par: bool) -> PackedA {
        let amx = kernel == Bf16Kernel::Amx && crate::amx::available();
        let mr = if amx { crate::amx::MR } else { MR };
        let kp = k.div_ceil(2).next_multiple_of(crate::amx::PAIRS);
        let kc = kc_here();
        let panels = m.div_ceil(mr);
        let mut words = Aligned::zeroed(panels * mr * kp);
        // every (k-block, row panel) is one task
        let tasks: Vec<(usize, usize, usize)> = (0..kp)
            .step_by(kc)
            .flat_map(|p0| (0..panels).map(move |ip| (p0, kc.min(kp - p0), ip)))
            .collect();
        let mut rest = words.get_mut();
        let mut parts = Vec::with_capacity(tasks.len());
        for &(p0, kcp, ip) in &tasks {
            let (dst, tail) = rest.split_at_mut(mr * kcp);
            parts.push((p0, kcp, ip, dst));
            rest = tail;
        }
        let pack = |(p0, kcp, ip, dst): (usize, usize, usize, &mut [u32])| {
            pack_a_panel(a, m, k, ip * mr, p0, kcp, dst)
        };
        if par {
            parts.into_par_iter().for_each(pack);
        } else {
            parts.into_iter().for_each(pack);
        }
        PackedA {
            m,
            k,
            kc,
            mr,
            words,
        }
    }

    /// The row panels of the k-block that starts at pair `p0` (`kcp` pairs).
    pub(super) fn block(&self, p0: usize, kcp: usize) -> &[u32] {
        let at = self.m.div_ceil(self.mr) * self.mr * p0;
        &self.words.get()[at..at + self.m.div_ceil(self.mr) * self.mr * kcp]
    }
}
