//! Grouped int4 with a scale and a zero point per group of 128 values: GPTQ's storage (what
//! GPTQ and AWQ checkpoints hold), quantized here by round to nearest with GPTQ's own grid
//! (`Quantizer.find_params` of the GPTQ code: the range widened to include 0, `scale = (max -
//! min) / 15`, `zero = round(-min / scale)`, `q = clamp(round(x / scale) + zero, 0, 15)`,
//! scales stored in f16), without GPTQ's error-compensating updates, which need calibration
//! data. A value decodes to `(q - zero) * scale`. A row: `cols / 2` bytes of codes (two per
//! byte, the first value in the low nibble, as GPTQ packs them into int32 words), then per group
//! an f16 scale and a u8 zero.

use super::Quantizer;
use half::f16;

/// Grouped int4 as a [`Quantizer`]: `--quantize int4`.
pub struct Int4 {
    pub group: usize,
}

/// Int4 in groups of 128 (GPTQ's usual `group_size`), and the smaller groups for models whose
/// rows are not whole 128s (SmolLM2's 576).
pub static INT4: Int4 = Int4 { group: 128 };
pub static INT4_G64: Int4 = Int4 { group: 64 };
pub static INT4_G32: Int4 = Int4 { group: 32 };

impl Int4 {
    /// The grid of one group: its f32 scale and zero point (GPTQ's `find_params`, asymmetric).
    pub(super) fn grid(g: &[f32]) -> (f32, f32) {
        let lo = g.iter().fold(0f32, |m, v| m.min(*v));
        let hi = g.iter().fold(0f32, |m, v| m.max(*v));
        let (lo, hi) = match lo == 0.0 && hi == 0.0 {
            true => (-1.0, 1.0),
            false => (lo, hi),
        };
        let scale = (hi - lo) / 15.0;
        (scale, (-lo / scale).round_ties_even())
    }

    /// The code of `v` on a group's grid.
    pub(super) fn code(v: f32, scale: f32, zero: f32) -> u8 {
        ((v / scale).round_ties_even() + zero).clamp(0.0, 15.0) as u8
    }
}

impl Quantizer for Int4 {
    fn name(&self) -> String {
        match self.group {
            128 => "int4".into(),
            g => format!("int4_g{g}"),
        }
    }

    fn block_size(&self) -> usize {
        self.group
    }

    fn row_bytes(&self, cols: usize) -> usize {
        cols / 2 + cols / self.group * 3
    }

    fn decode(&self, cols: usize, bytes: &[u8], out: &mut [f32]) {
        let g = self.group;
        for (row, o) in bytes
            .chunks_exact(self.row_bytes(cols))
            .zip(out.chunks_exact_mut(cols))
        {
            let params = &row[cols / 2..];
            for (j, (packed, o)) in row[..cols / 2]
                .chunks_exact(g / 2)
                .zip(o.chunks_exact_mut(g))
                .enumerate()
            {
                let scale = f16::from_le_bytes([params[3 * j], params[3 * j + 1]]).to_f32();
                let zero = params[3 * j + 2] as f32;
                let table: [f32; 16] = std::array::from_fn(|q| (q as f32 - zero) * scale);
                super::lut::lookup(packed, &table, o, false);
            }
        }
    }

    fn has_nibbles(&self) -> bool {
        self.group.is_multiple_of(32)
    }

    fn nibbles(
        &self,
        cols: usize,
        bytes: &[u8],
        codes: &mut [u8],
        step: &mut [f32],
        lo: &mut [f32],
    ) {
        let (g, rb) = (self.group, self.row_bytes(cols));
        let rows = bytes.chunks_exact(rb).zip(codes.chunks_exact_mut(cols));
        let grids = step
            .chunks_exact_mut(cols / 32)
            .zip(lo.chunks_exact_mut(cols / 32));
        for ((row, c), (s, l)) in rows.zip(grids) {
            for (c, b) in c.chunks_exact_mut(2).zip(&row[..cols / 2]) {
                (c[0], c[1]) = (b & 15, b >> 4);
            }
            let params = &row[cols / 2..];
            for (i, (s, l)) in s.iter_mut().zip(l.iter_mut()).enumerate() {
                let j = i * 32 / g;
                let scale = f16::from_le_bytes([params[3 * j], params[3 * j + 1]]).to_f32();
                (*s, *l) = (scale, -(params[3 * j + 2] as f32) * scale);
            }
        }
    }

    fn encode(&self, cols: usize, w: &[f32]) -> Vec<u8> {
        let g = self.group;
        let mut out = Vec::with_capacity(w.len() / cols * self.row_bytes(cols));
        let mut params = Vec::with_capacity(cols / g * 3);
        for row in w.chunks_exact(cols) {
            params.clear();
            for group in row.chunks_exact(g) {
                let (scale, zero) = Self::grid(group);
                let q = |v: f32| Self::code(v, scale, zero);
                out.extend(group.chunks_exact(2).map(|p| q(p[0]) | (q(p[1]) << 4)));
                params.extend(f16::from_f32(scale).to_le_bytes());
                params.push(zero as u8);
            }
            out.extend_from_slice(&params);
        }
        out
    }

    fn covers_embeddings(&self) -> bool {
        false
    }
}

/// Grouped int4 whose groups gather columns out of order: GPTQ's act-order (`desc_act`), where
/// the columns were quantized in order of decreasing Hessian diagonal and group `k` holds the
/// `k`-th run of `group` columns in that order. A row stores the values of columns `order[0]`,
/// `order[1]`, ... as an [`Int4`] row of that group size; decoding puts each value back in its
/// own column, so every op sees the weight in its real column order and the input needs no
/// permutation.
///
/// The order belongs to one tensor, so each is made at load by [`Int4Ordered::leak`] and lives
/// as long as the process (a [`super::QFormat`] holds its quantizer by `&'static`): a few
/// bytes per input column of every act-order linear, once per model loaded.
pub struct Int4Ordered {
    inner: Int4,
    order: Box<[u32]>,
}

impl Int4Ordered {
    /// The quantizer of one act-order tensor: `order` is a permutation of its columns.
    pub fn leak(group: usize, order: Vec<u32>) -> &'static Self {
        debug_assert!({
            let mut seen = vec![false; order.len()];
            order
                .iter()
                .all(|&c| !std::mem::replace(&mut seen[c as usize], true))
        });
        Box::leak(Box::new(Int4Ordered {
            inner: Int4 { group },
            order: order.into(),
        }))
    }
}

impl Quantizer for Int4Ordered {
    fn name(&self) -> String {
        format!("{}_act", self.inner.name())
    }

    fn block_size(&self) -> usize {
        self.inner.group
    }

    fn row_bytes(&self, cols: usize) -> usize {
        self.inner.row_bytes(cols)
    }

    fn decode(&self, cols: usize, bytes: &[u8], out: &mut [f32]) {
        let mut grouped = vec![0f32; cols];
        for (row, o) in bytes
            .chunks_exact(self.row_bytes(cols))
            .zip(out.chunks_exact_mut(cols))
        {
            self.inner.decode(cols, row, &mut grouped);
            for (&c, v) in self.order.iter().zip(&grouped) {
                o[c as usize] = *v;
            }
        }
    }

    fn encode(&self, cols: usize, w: &[f32]) -> Vec<u8> {
        let grouped: Vec<f32> = w
            .chunks_exact(cols)
            .flat_map(|row| self.order.iter().map(|&c| row[c as usize]))
            .collect();
        self.inner.encode(cols, &grouped)
    }

    fn covers_embeddings(&self) -> bool {
        false
    }
}
