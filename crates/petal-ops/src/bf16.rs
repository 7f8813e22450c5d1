//! bf16 matrix multiply with f32 accumulation on AVX512-BF16 (`vdpbf16ps`): the fast path of
//! the bf16 base weights. `c (m, n) = [c +] alpha a (m, k) b (k, n)` with `a` in f32 (rounded to
//! bf16, nearest-even, as it is packed) and `b` in bf16. Each `vdpbf16ps` lane multiplies a
//! pair of bf16 values of `a` (k = 2p, 2p + 1) with the same pair of `b` and adds both products
//! to an f32 accumulator, so both operands are packed as k-pairs in 32-bit words: `a` row by
//! row (`[r][p]`, the microkernel broadcasts one word per row), `b` in panels of `NR` columns
//! (`[p][j]`, one 48-wide row of words per pair). The microkernel holds an `MR x NR` tile of c
//! in 24 zmm registers; k is cut in blocks of `KC` pairs (both panels stay in L1) and n in
//! blocks that fit L2; row panels are spread over rayon's threads. On CPUs with AMX the same
//! packed panels feed AMX tiles instead (`crate::amx`: 16 x 48 of c a call, k in blocks of
//! `KC_AMX` pairs, k padded to whole tile rows of 16 pairs).
//! `mm_bf16_reference` is the readable twin (bf16-rounded inputs, f64 sums).

use crate::amx::Bf16Kernel;
use crate::cpu::View;
pub(crate) use packed_a::{Left, Out, PackedA};
use rayon::prelude::*;

const MR: usize = 8;
const NR: usize = 48;
/// k-pairs per block: an A panel (8 x 128 words) and a B panel (128 x 48 words) fit L1.
const KC: usize = 128;
/// k-pairs per block on AMX: half as many stores of the c tiles (128 to 1024 measured alike,
/// 256 a little ahead in training; so did running 8 row panels against each B panel, to keep
/// it in L1).
const KC_AMX: usize = 256;
/// k-pairs per block for the kernel this CPU takes.
fn kc_here() -> usize {
    match Bf16Kernel::chosen() {
        Bf16Kernel::Amx => KC_AMX,
        Bf16Kernel::Avx512 => KC,
    }
}
/// Bytes of packed B one column block may take (kept in L2 while every row panel uses it).
const NC_BYTES: usize = 512 * 1024;
// the AMX kernel covers a panel with three 16-column tiles, a k-block with whole tile rows
const _: () = assert!(
    NR == 48 && KC.is_multiple_of(crate::amx::PAIRS) && KC_AMX.is_multiple_of(crate::amx::PAIRS)
);

/// Whether this CPU runs the kernel (x86-64 with AVX512F and AVX512-BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A bf16 matrix view (raw bits): element (i, j) at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct BView<'a> {
    pub x: &'a [u16],
    pub rs: usize,
    pub cs: usize,
}

impl BView<'_> {
    fn at(&self, i: usize, j: usize) -> u16 {
        self.x[i * self.rs + j * self.cs]
    }
}

/// The left operand of a product: f32 values (rounded to bf16 as they are packed) or bf16 bits.
#[derive(Clone, Copy)]
pub(crate) enum AView<'a> {
    F32(View<'a>),
    Bf16(BView<'a>),
}

impl<'a> From<View<'a>> for AView<'a> {
    fn from(v: View<'a>) -> Self {
        AView::F32(v)
    }
}

impl AView<'_> {
    fn strides(&self) -> (usize, usize, usize) {
        match self {
            AView::F32(v) => (v.rs, v.cs, v.x.len()),
            AView::Bf16(v) => (v.rs, v.cs, v.x.len()),
        }
    }
    fn at(&self, i: usize, j: usize) -> u16 {
        match self {
            AView::F32(v) => to_bf16(v.x[i * v.rs + j * v.cs]),
            AView::Bf16(v) => v.at(i, j),
        }
    }
}

/// bf16 bits widened to f32 (exact).
pub(crate) fn widen(src: &[u16], dst: &mut [f32]) {
    for (d, &b) in dst.iter_mut().zip(src) {
        *d = from_bf16(b);
    }
}

/// f32 values rounded to the nearest bf16 (ties to even; NaN stays NaN).
pub(crate) fn narrow(src: &[f32], dst: &mut [u16]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX512F and AVX512-BF16 (checked above).
        done = unsafe { x86::narrow(src, dst) };
    }
    for (d, &x) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = to_bf16(x);
    }
}

/// The bits of `x` rounded to bf16 (nearest, ties to even; NaN stays NaN).
pub fn to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `b (k, n)` packed once: k-blocks of `KC` pairs, each a run of `NR`-column panels `[p][j]`.
pub(crate) struct PackedB {
    k: usize,
    n: usize,
    /// pairs packed: k's pairs padded with zeros to whole AMX tile rows
    kp: usize,
    /// pairs per k-block
    kc: usize,
    words: Aligned,
}

/// `len` words starting at a 64-byte boundary inside a vector (where a cache line starts: each
/// AMX tile row is then one line, not two).
struct Aligned {
    v: Vec<u32>,
    off: usize,
    len: usize,
}

impl Aligned {
    /// `len` words in `v`'s allocation, grown as needed: new words are zero, old ones kept.
    fn reuse(mut v: Vec<u32>, len: usize) -> Aligned {
        v.resize(len + 15, 0);
        let off = (64 - v.as_ptr() as usize % 64) % 64 / 4;
        Aligned { v, off, len }
    }

    fn zeroed(len: usize) -> Aligned {
        Aligned::reuse(Vec::new(), len)
    }

    fn get(&self) -> &[u32] {
        &self.v[self.off..self.off + self.len]
    }

    fn get_mut(&mut self) -> &mut [u32] {
        &mut self.v[self.off..self.off + self.len]
    }
}

impl PackedB {
    pub fn new(k: usize, n: usize, b: BView, par: bool) -> PackedB {
        let kp = k.div_ceil(2).next_multiple_of(crate::amx::PAIRS);
        let np = n.div_ceil(NR);
        let mut words = Aligned::zeroed(kp * np * NR);
        let kc = kc_here();
        let per_block = kc * np * NR;
        let fill = |(blk, dst): (usize, &mut [u32])| {
            let p0 = blk * kc;
            let kcp = kc.min(kp - p0);
            for (jp, panel) in dst.chunks_mut(kcp * NR).enumerate() {
                pack_b_panel(b, k, n, p0, kcp, jp * NR, panel);
            }
        };
        let w = words.get_mut();
        if par {
            w.par_chunks_mut(per_block).enumerate().for_each(fill);
        } else {
            w.chunks_mut(per_block).enumerate().for_each(fill);
        }
        PackedB {
            k,
            n,
            kp,
            kc,
            words,
        }
    }

    /// The packed words in order.
    fn words(&self) -> &[u32] {
        self.words.get()
    }

    /// The panel of k-block `blk` (starting at pair `p0`, `kcp` pairs), column panel `jp`.
    fn panel(&self, p0: usize, kcp: usize, jp: usize) -> &[u32] {
        let np = self.n.div_ceil(NR);
        let at = p0 * np * NR + jp * kcp * NR;
        &self.words()[at..at + kcp * NR]
    }
}

fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

fn pack_b_panel(b: BView, k: usize, n: usize, p0: usize, kcp: usize, j0: usize, dst: &mut [u32]) {
    let cols = NR.min(n - j0);
    let pairs = kcp.min((k / 2).saturating_sub(p0)); // pairs with both values present
    if b.rs == 1 {
        // b = W^T of a row-major W (n, k): each column's pairs are adjacent in W's row
        for jj in 0..cols {
            let row = &b.x[(j0 + jj) * b.cs + 2 * p0..];
            for (p, two) in row.chunks_exact(2).take(pairs).enumerate() {
                dst[p * NR + jj] = pair(two[0], two[1]);
            }
        }
    } else if b.cs == 1 {
        // row-major b (k, n): interleave rows 2p and 2p + 1
        for p in 0..pairs {
            let k0 = 2 * (p0 + p);
            let (lo, hi) = (&b.x[k0 * b.rs + j0..], &b.x[(k0 + 1) * b.rs + j0..]);
            let out = &mut dst[p * NR..p * NR + cols];
            for ((w, &l), &h) in out.iter_mut().zip(&lo[..cols]).zip(&hi[..cols]) {
                *w = pair(l, h);
            }
        }
    }
    let done = if b.rs == 1 || b.cs == 1 { pairs } else { 0 };
    for p in done..kcp {
        let k0 = 2 * (p0 + p);
        let row = &mut dst[p * NR..p * NR + cols];
        for (jj, w) in row.iter_mut().enumerate() {
            let at = |kk: usize| if kk < k { b.at(kk, j0 + jj) } else { 0 };
            *w = pair(at(k0), at(k0 + 1));
        }
    }
}

/// Rows `i0..i0 + MR` of `a`, pairs `p0..p0 + kcp`, as bf16 pairs `[r][p]` (zero past m, k).
fn pack_a_panel(a: AView, m: usize, k: usize, i0: usize, p0: usize, kcp: usize, dst: &mut [u32]) {
    for (r, row) in dst.chunks_mut(kcp).enumerate() {
        let i = i0 + r;
        if i >= m {
            row.iter_mut().for_each(|w| *w = 0);
            continue;
        }
        let k0 = 2 * p0;
        let full = (2 * kcp).min(k - k0); // values present in this block
        match a {
            AView::F32(v) if v.cs == 1 => cvt_row(&v.x[i * v.rs + k0..i * v.rs + k0 + full], row),
            AView::Bf16(v) if v.cs == 1 => {
                let src = &v.x[i * v.rs + k0..i * v.rs + k0 + full];
                for (w, p) in row.iter_mut().zip(src.chunks(2)) {
                    *w = pair(p[0], p.get(1).copied().unwrap_or(0));
                }
                row[full.div_ceil(2)..].iter_mut().for_each(|w| *w = 0);
            }
            _ => {
                for (p, w) in row.iter_mut().enumerate() {
                    let at = |q: usize| {
                        let kk = k0 + 2 * p + q;
                        if kk < k {
                            a.at(i, kk)
                        } else {
                            0
                        }
                    };
                    *w = pair(at(0), at(1));
                }
            }
        }
    }
}

/// Contiguous f32 values to bf16 pairs (the last pair padded with zero).
fn cvt_row(src: &[f32], dst: &mut [u32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX512F and AVX512-BF16 (checked above).
        done = unsafe { x86::cvt_row(src, dst) };
    }
    for (p, w) in dst.iter_mut().enumerate().skip(done) {
        let lo = src.get(2 * p).map_or(0, |&x| to_bf16(x));
        let hi = src.get(2 * p + 1).map_or(0, |&x| to_bf16(x));
        *w = pair(lo, hi);
    }
}

/// `c (m, n, row-major) = [c +] alpha a (m, k) b (k, n)`, b packed by `PackedB::new`, on the
/// kernel this CPU takes (`Bf16Kernel::chosen`).
pub(crate) fn mm_bf16_packed(
    m: usize,
    c: &mut [f32],
    acc: bool,
    alpha: f32,
    a: AView,
    b: &PackedB,
    par: bool,
) {
    mm_bf16_packed_on(Bf16Kernel::chosen(), m, c, acc, alpha, a, b, par)
}

/// `mm_bf16_packed` on the given kernel (`Amx` only where `amx::available()`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm_bf16_packed_on(
    kernel: Bf16Kernel,
    m: usize,
    c: &mut [f32],
    acc: bool,
    alpha: f32,
    a: AView,
    b: &PackedB,
    par: bool,
) {
    let out = Out { c, ldc: b.n, c0: 0 };
    mm_bf16_into(kernel, m, out, acc, alpha, Left::View(a), b, par)
}

/// `out = [out +] alpha a (m, k) b (k, n)` on `kernel`, into a tile of a wider output.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm_bf16_into(
    kernel: Bf16Kernel,
    m: usize,
    out: Out,
    acc: bool,
    alpha: f32,
    a: Left,
    b: &PackedB,
    par: bool,
) {
    let (k, n) = (b.k, b.n);
    let Out { c, ldc, c0 } = out;
    if m == 0 || n == 0 {
        return;
    }
    assert!(c0 + n <= ldc, "bf16 matmul: output tile past its row");
    assert!(
        c.len() >= (m - 1) * ldc + c0 + n,
        "bf16 matmul: output too small"
    );
    let amx = kernel == Bf16Kernel::Amx && crate::amx::available();
    let mr = if amx { crate::amx::MR } else { MR };
    match a {
        Left::View(v) if k > 0 => {
            let (rs, cs, len) = v.strides();
            assert!(
                (m - 1) * rs + (k - 1) * cs < len,
                "bf16 matmul: input too small"
            );
        }
        Left::Packed(p) => assert!(
            p.m == m && p.k == k && p.kc == b.kc && p.mr == mr,
            "bf16 matmul: left operand packed for another product"
        ),
        _ => {}
    }
    let c = &mut c[..(m - 1) * ldc + c0 + n];
    let kp = b.kp;
    if kp == 0 {
        if !acc {
            c.chunks_mut(ldc).for_each(|row| row[c0..c0 + n].fill(0.0));
        }
        return;
    }
    let panels = m.div_ceil(mr);
    let np = n.div_ceil(NR);
    let kc = b.kc;
    let mut abuf = match a {
        Left::View(_) => Aligned::zeroed(panels * mr * kc.min(kp)),
        Left::Packed(_) => Aligned::zeroed(0),
    };
    for p0 in (0..kp).step_by(kc) {
        let kcp = kc.min(kp - p0);
        let ap: &[u32] = match a {
            Left::View(v) => {
                let ap = &mut abuf.get_mut()[..panels * mr * kcp];
                let pack =
                    |(ip, dst): (usize, &mut [u32])| pack_a_panel(v, m, k, ip * mr, p0, kcp, dst);
                if par {
                    ap.par_chunks_mut(mr * kcp).enumerate().for_each(pack);
                } else {
                    ap.chunks_mut(mr * kcp).enumerate().for_each(pack);
                }
                ap
            }
            Left::Packed(p) => p.block(p0, kcp),
        };
        let add = acc || p0 > 0; // each k-block adds alpha times its part
        let jc = (NC_BYTES / (kcp * 4 * NR)).max(1); // column panels per L2 block
        for jp0 in (0..np).step_by(jc) {
            let jp1 = (jp0 + jc).min(np);
            let tile = |(ip, crows): (usize, &mut [f32])| {
                let rows = crows.len().div_ceil(ldc);
                let a_panel = &ap[ip * mr * kcp..(ip + 1) * mr * kcp];
                let panels =
                    (jp0..jp1).map(|jp| (jp * NR, NR.min(n - jp * NR), b.panel(p0, kcp, jp)));
                if amx {
                    // SAFETY: AMX is available (checked above).
                    let tiles = unsafe { crate::amx::Tiles::start() };
                    let mut out = [0f32; crate::amx::MR * NR];
                    for (j0, cols, b_panel) in panels {
                        tiles.micro_16x48(kcp, a_panel, b_panel, &mut out);
                        store(&out, &mut crows[c0 + j0..], ldc, add, alpha, rows, cols);
                    }
                } else {
                    for (j0, cols, b_panel) in panels {
                        micro(
                            kcp,
                            a_panel,
                            b_panel,
                            &mut crows[c0 + j0..],
                            ldc,
                            add,
                            alpha,
                            rows,
                            cols,
                        );
                    }
                }
            };
            if par {
                c.par_chunks_mut(mr * ldc).enumerate().for_each(tile);
            } else {
                c.chunks_mut(mr * ldc).enumerate().for_each(tile);
            }
        }
    }
}

/// `c = [c +] alpha out` for the `rows x cols` corner of an AMX result (`NR` columns a row).
fn store(out: &[f32], c: &mut [f32], ldc: usize, add: bool, alpha: f32, rows: usize, cols: usize) {
    for r in 0..rows {
        let (src, dst) = (&out[r * NR..r * NR + cols], &mut c[r * ldc..r * ldc + cols]);
        if add {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += alpha * s);
        } else {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d = alpha * s);
        }
    }
}

/// `c = [c +] alpha a b` with b in bf16, packed here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm_bf16(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    acc: bool,
    alpha: f32,
    a: AView,
    b: BView,
    par: bool,
) {
    if k > 0 && n > 0 {
        let last = (k - 1) * b.rs + (n - 1) * b.cs;
        assert!(last < b.x.len(), "bf16 matmul: weight too small");
    }
    let packed = PackedB::new(k, n, b, par);
    mm_bf16_packed(m, c, acc, alpha, a, &packed, par);
}

/// Rows of `x` (f32 or bf16) as a contiguous matrix of `width` columns.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Rows<'_> {
    fn len(&self) -> usize {
        match self {
            Rows::F32(x) => x.len(),
            Rows::Bf16(x) => x.len(),
        }
    }
    fn view(&self, width: usize) -> AView<'_> {
        match *self {
            Rows::F32(x) => AView::F32(crate::cpu::rows(x, width)),
            Rows::Bf16(x) => AView::Bf16(BView {
                x,
                rs: width,
                cs: 1,
            }),
        }
    }
}

/// `x W^T` (`wt`) or `x W` for rows of `x` and a row-major bf16 `W (w_rows, w_cols)`, on
/// rayon's threads: the product of a frozen bf16 linear, forward (`wt`) or input gradient.
pub(crate) fn linear(x: Rows, w: &[u16], w_rows: usize, w_cols: usize, wt: bool) -> Vec<f32> {
    let (k, n, b) = if wt {
        (
            w_cols,
            w_rows,
            BView {
                x: w,
                rs: 1,
                cs: w_cols,
            },
        )
    } else {
        (
            w_rows,
            w_cols,
            BView {
                x: w,
                rs: w_cols,
                cs: 1,
            },
        )
    };
    let m = x.len() / k.max(1);
    if wt && crate::skinny::takes(m) {
        return crate::skinny::xwt_bf16(&x, w, m, n, k); // few rows (decoding)
    }
    let mut y = vec![0f32; m * n];
    mm_bf16(m, n, k, &mut y, false, 1.0, x.view(k), b, true);
    y
}

/// One `MR x NR` tile (only `rows x cols` of it stored): `c = [c +] scale a_panel b_panel`.
#[allow(clippy::too_many_arguments)]
fn micro(
    kcp: usize,
    a: &[u32],
    b: &[u32],
    c: &mut [f32],
    ldc: usize,
    add: bool,
    scale: f32,
    rows: usize,
    cols: usize,
) {
    assert!(a.len() >= MR * kcp && b.len() >= NR * kcp);
    assert!(rows <= MR && cols <= NR && (rows == 0 || c.len() >= (rows - 1) * ldc + cols));
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has the features (checked); the asserts above bound every access.
        unsafe { x86::micro(kcp, a, b, c, ldc, add, scale, rows, cols) };
        return;
    }
    for r in 0..rows {
        for j in 0..cols {
            let mut s = 0f32;
            for p in 0..kcp {
                let (x, y) = (a[r * kcp + p], b[p * NR + j]);
                s += from_bf16(x as u16) * from_bf16(y as u16)
                    + from_bf16((x >> 16) as u16) * from_bf16((y >> 16) as u16);
            }
            let o = &mut c[r * ldc + j];
            *o = if add { *o + s * scale } else { s * scale };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

/// The readable twin: inputs rounded to bf16, products summed in f64.
pub fn mm_bf16_reference(a: &[f32], b_bits: &[u16], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|q| {
                    from_bf16(to_bf16(a[i * k + q])) as f64 * from_bf16(b_bits[q * n + j]) as f64
                })
                .sum();
            c[i * n + j] = s as f32;
        }
    }
    c
}

mod packed_a;
mod rows;
#[cfg(test)]
mod tests;
