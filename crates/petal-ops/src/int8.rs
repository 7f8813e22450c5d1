//! 8-bit products of frozen weights, as SwitchBack runs training's forward and input-gradient
//! products and llama.cpp its inference: `c (m, n) = [c +] a (m, k) b (k, n)` with each row of
//! `a` and each column of `b` quantized in blocks of `BLOCK` values along k to symmetric 8-bit
//! codes (`q = round(x * 127 / absmax)`, value `q * absmax / 127`), the code products of a
//! block summed exactly in i32, each block's sum scaled into the f32 result. The products of
//! a quantized base take it where the CPU has AVX-512 VNNI or AVX-VNNI but no AVX512-BF16
//! (`Frozen::Auto`).
//!
//! Both operands are kept in 32-bit words along k, so one kernel shape serves three
//! instruction sets, picked at run time:
//! - AVX-512 VNNI and AVX-VNNI (`vpdpbusd` on 512 or 256 bits): a word holds four codes;
//!   `vpdpbusd` multiplies unsigned bytes by signed ones, so a's codes are stored plus 128 and
//!   each block takes 128 sum(b) back off;
//! - AVX2 (`vpmaddwd`): a word holds two codes widened to i16;
//! - nibbles (AVX2 `vpmaddubsw`, `int8::nibbles`): b is a 4-bit weight's own codes, unsigned, with a
//!   step and an offset per block, so W is not rounded again; a's codes signed.
//!
//! `a` is stored row by row (`[i][q]`, the microkernel broadcasts one word per row), `b` in
//! panels of `NR` columns (`[q][j]`). `mm_int8_reference` is the readable twin (the same
//! quantization, i64 sums, no blocks).

use crate::bf16::Out;
#[cfg(test)]
use crate::cpu::View;
use rayon::prelude::*;

/// Values of k per scale: each row of a and each column of b has one scale per block of
/// `BLOCK` values along k (as llama.cpp's 8-bit activation blocks, `Q8_K`), so that an
/// outlier costs the precision of its own block only (one scale per whole row, as SwitchBack
/// has, rounded SmolLM2's activations badly enough to stall its training). A block is also the
/// kernels' unit of k: its code products are summed in i32, then scaled into f32.
pub const BLOCK: usize = 32;

/// Bytes of b's packed panels one pass over the rows takes (kept in L2 while every group of
/// rows runs over them; a k-block of a wide b, 128 words by 8960 columns, is 4.4 MiB: one pass
/// over all of it read it from L3 for every group of rows, at 0.45x the VNNI kernel's rate).
/// Under test a panel a pass, so the tests' small products take several passes.
const PASS_BYTES: usize = if cfg!(test) { 1 } else { 256 * 1024 };

/// The instruction set a product runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// AVX-512 F + BW + VNNI: four 8-bit codes a word, 4 x 48 tiles.
    Vnni,
    /// AVX-VNNI (`vpdpbusd` on 256 bits, VEX-encoded: Intel's client CPUs from Alder Lake on,
    /// which have no AVX-512; also Sapphire Rapids): the VNNI words, 6 x 16 tiles.
    AvxVnni,
    /// AVX2: two 16-bit codes a word, 6 x 16 tiles.
    Avx2,
    /// No SIMD kernel: the AVX2 layout, summed in plain loops (tests, other CPUs).
    Plain,
    /// AVX2 `vpmaddubsw` on a 4-bit weight's own codes (`nibbles`): b holds unsigned 4-bit
    /// codes with a step and an offset per block, a signed 8-bit ones; not in [`Kind::ALL`],
    /// as b must come from such a weight (`PackedB::from_codes`).
    Nibbles,
    /// The nibble kernel on `vpdpbusd` (256 bits: AVX-VNNI, or AVX-512 VNNI + VL): the codes'
    /// products summed in i32 in one instruction.
    NibblesVnni,
}

impl Kind {
    /// Every kind, fastest first.
    const ALL: [Kind; 4] = [Kind::Vnni, Kind::AvxVnni, Kind::Avx2, Kind::Plain];

    /// Whether this CPU has the kind's instructions.
    pub(crate) fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Kind::Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Kind::AvxVnni => has!("avx2") && has!("fma") && has!("avxvnni"),
                Kind::Avx2 => has!("avx2") && has!("fma"),
                Kind::Plain => true,
                Kind::Nibbles => has!("avx2") && has!("fma"),
                Kind::NibblesVnni => {
                    has!("avx2")
                        && has!("fma")
                        && (has!("avxvnni") || (has!("avx512vnni") && has!("avx512vl")))
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kind::Plain
        }
    }

    /// The fastest this CPU runs.
    pub fn best() -> Kind {
        Kind::ALL
            .into_iter()
            .find(|k| k.runs_here())
            .unwrap_or(Kind::Plain)
    }

    /// The kernel the products take: the fastest here, or a slower one this CPU also runs
    /// named by `PETAL_INT8_KERNEL` (`avx-vnni`, `avx2`, `plain`: to measure what a CPU
    /// without AVX-512 gets).
    pub fn chosen() -> Kind {
        static CHOSEN: std::sync::OnceLock<Kind> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let v = std::env::var("PETAL_INT8_KERNEL").unwrap_or_default();
            let all = Kind::all_here();
            all.iter()
                .copied()
                .find(|k| k.name() == v.trim())
                .unwrap_or(all[0])
        })
    }

    /// Every kind this CPU runs, fastest first (the tests check each).
    pub fn all_here() -> Vec<Kind> {
        Kind::ALL.into_iter().filter(|k| k.runs_here()).collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Vnni => "avx512-vnni",
            Kind::AvxVnni => "avx-vnni",
            Kind::Avx2 => "avx2",
            Kind::Plain => "plain",
            Kind::Nibbles => "avx2-nibbles",
            Kind::NibblesVnni => "avx-vnni-nibbles",
        }
    }

    /// Whether b is a 4-bit weight's own codes (`int8::nibbles`).
    pub(crate) fn is_nibbles(self) -> bool {
        matches!(self, Kind::Nibbles | Kind::NibblesVnni)
    }

    /// The nibble kernel the products over 4-bit weights take here, if any: on `vpdpbusd`
    /// where the CPU has it, unless `PETAL_INT8_KERNEL` asks for AVX2's (`avx2`).
    pub(crate) fn nibbles() -> Option<Kind> {
        let avx2 = matches!(Kind::chosen(), Kind::Avx2 | Kind::Plain);
        [Kind::NibblesVnni, Kind::Nibbles]
            .into_iter()
            .find(|k| k.runs_here() && !(avx2 && *k == Kind::NibblesVnni))
    }

    /// The nibble kernels this CPU runs (the tests check each).
    #[cfg(test)]
    pub(crate) fn nibbles_here() -> Vec<Kind> {
        [Kind::NibblesVnni, Kind::Nibbles]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// Whether a word holds four 8-bit codes, else two 16-bit ones.
    fn bytes(self) -> bool {
        matches!(self, Kind::Vnni | Kind::AvxVnni) || self.is_nibbles()
    }

    /// Whether a's codes are stored plus 128 (`vpdpbusd` reads them unsigned) and each block's
    /// excess, 128 x the sum of b's codes, taken back off.
    fn excess(self) -> bool {
        matches!(self, Kind::Vnni | Kind::AvxVnni)
    }

    /// Codes per 32-bit word.
    fn group(self) -> usize {
        if self.bytes() {
            4
        } else {
            2
        }
    }

    /// Words per block of k.
    fn bw(self) -> usize {
        BLOCK / self.group()
    }

    fn mr(self) -> usize {
        match self {
            Kind::Vnni => 4,
            _ => 6,
        }
    }

    /// Words of k per packed panel of b (whole blocks), so that a panel stays in L1: 128 x 48
    /// words (24 KiB) for the 512-bit kernel, 384 x 16 (24 KiB) for the others. The longer the
    /// panel, the fewer passes over c: with 128 words a 1024 x 8960 product over k = 1536 read
    /// and wrote its 37 MB of c three times, and ran the 256-bit kernels at 0.7x their rate
    /// with 384 (one pass).
    fn panel(self) -> usize {
        if self == Kind::Vnni {
            128
        } else {
            384
        }
    }

    fn nr(self) -> usize {
        if self == Kind::Vnni {
            48
        } else {
            16
        }
    }
}

/// Whether `auto` takes the 8-bit products on this CPU: where it has AVX-512 VNNI or AVX-VNNI
/// (`vpdpbusd`: 16 or 8 lanes of four byte products an instruction). The AVX2
/// kernel is correct but slower than f32 there (`vpmaddwd` then `vpaddd` is two instructions
/// for the 16 products one FMA pair does; SmolLM2 over Q4_1 on an AVX2-only AMD EPYC trained
/// at 110.7 tokens/s in 8-bit codes against 138.4 with f32 tiles, docs/quantized.md).
pub fn faster_than_f32() -> bool {
    Kind::best().excess()
}

/// Whether `auto` takes the nibble kernels for the forward over 4-bit weights on a CPU whose
/// 8-bit products are not [`faster_than_f32`]: where one runs and the CPU has no AVX-512 (f32
/// `gemm` on AVX-512 outran them: SmolLM2 363.0 against 335.7 tokens/s, docs/quantized.md).
pub fn nibbles_by_default() -> bool {
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    Kind::nibbles().is_some() && !avx512
}

/// The multiplier taking `absmax` to 127, and the scale back (1 for an all-zero vector).
fn scales(absmax: f32) -> (f32, f32) {
    if absmax > 0.0 && absmax.is_finite() {
        (127.0 / absmax, absmax / 127.0)
    } else {
        (0.0, 1.0)
    }
}

fn absmax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// `x * inv` rounded to the nearest integer (ties to even, by the 1.5 * 2^23 trick, exact for
/// the |values| < 2^22 that occur here), clamped to [-127, 127]; NaN gives 0. Plain float
/// arithmetic, so the loops over it vectorise.
fn code(x: f32, inv: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    let y = x * inv;
    ((y + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8
}

/// Codes of `group` consecutive k values as one word: bytes (VNNI; a's side `+128`, as
/// `vpdpbusd` reads them unsigned) or i16 pairs, low first.
fn word(kind: Kind, c: &[i8], excess: bool) -> u32 {
    if kind.bytes() {
        let flip = if excess && kind.excess() {
            0x8080_8080
        } else {
            0
        };
        u32::from_le_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8]) ^ flip
    } else {
        (c[0] as i16 as u16 as u32) | (c[1] as i16 as u16 as u32) << 16
    }
}

/// [`word`] of each group of codes.
fn words_of(kind: Kind, codes: &[i8], excess: bool, out: &mut [u32]) {
    for (w, c) in out.iter_mut().zip(codes.chunks_exact(kind.group())) {
        *w = word(kind, c, excess);
    }
}

/// `c (m, n, row-major) = [c +] a (m, k) b (k, n)` in 8-bit codes (see the module), on the
/// kernel [`Kind::chosen`] (the tiles of a quantized base pack b from W's rows instead:
/// [`PackedB::from_rows`], [`mm_int8_packed`]).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm_int8(m: usize, n: usize, k: usize, c: &mut [f32], acc: bool, a: View, b: View) {
    mm_int8_with(Kind::chosen(), m, n, k, c, acc, a, b)
}

/// [`mm_int8`] on the given kernel (which this CPU must run).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm_int8_with(
    kind: Kind,
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    acc: bool,
    a: View,
    b: View,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= m * n, "int8 matmul: output too small");
    if k == 0 {
        if !acc {
            c[..m * n].iter_mut().for_each(|x| *x = 0.0);
        }
        return;
    }
    let pa = PackedA::new(kind, a, m, k);
    let pb = PackedB::new(kind, b, k, n);
    let out = Out { c, ldc: n, c0: 0 };
    mm_int8_packed(out, acc, &pa, &pb);
}

/// Columns `c0..c0 + n` of the row-major `out` (m rows of `ldc`) `= [out +] a b`, both packed
/// (the same kind, the same k).
pub(crate) fn mm_int8_packed(out: Out, acc: bool, pa: &PackedA, pb: &PackedB) {
    let (kind, m, n) = (pa.kind, pa.m, pb.n);
    assert!(
        kind == pb.kind && pa.kw == pb.kw,
        "int8 matmul: operands packed apart"
    );
    let Out { c, ldc, c0 } = out;
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c0 + n <= ldc && c.len() >= m * ldc,
        "int8 matmul: output too small"
    );
    let c = &mut c[..m * ldc];
    let (mr, nr) = (kind.mr(), kind.nr());
    let np = n.div_ceil(nr);
    for q0 in (0..pb.kw).step_by(kind.panel()) {
        let kcq = kind.panel().min(pb.kw - q0);
        let add = acc || q0 > 0;
        let blk = q0 / kind.bw(); // the panel's first block
        let excess = pb.excess.get(blk * n..).unwrap_or(&[]);
        let pass = (PASS_BYTES / (kcq * nr * 4)).max(1); // panels of b per pass
        for jp0 in (0..np).step_by(pass) {
            let jps = jp0..(jp0 + pass).min(np);
            c.par_chunks_mut(mr * ldc)
                .enumerate()
                .for_each(|(ip, crows)| {
                    let rows = crows.len() / ldc;
                    let a_panel = &pa.words[ip * mr * pa.kw + q0..];
                    let sa = &pa.scale[ip * mr * pa.nb + blk..];
                    for jp in jps.clone() {
                        let j0 = jp * nr;
                        let cols = nr.min(n - j0);
                        // nibbles: the panel's steps and offsets, block after block
                        let (sb, sbs) = if kind.is_nibbles() {
                            (
                                &pb.scale[nibbles::steps_at(jp, blk, pb.blocks(), nr)..],
                                2 * nr,
                            )
                        } else {
                            (&pb.scale[blk * n + j0..], n)
                        };
                        let tile = Tile {
                            a: a_panel,
                            lda: pa.kw,
                            b: pb.panel(q0, kcq, jp),
                            kcq,
                            bw: kind.bw(),
                            sa,
                            sas: pa.nb,
                            sb,
                            sbs,
                            excess: excess.get(j0..).unwrap_or(&[]),
                            sums: pa.sums.get(ip * mr * pa.nb + blk..).unwrap_or(&[]),
                            n,
                            rows,
                            cols,
                        };
                        micro(kind, &tile, &mut crows[c0 + j0..], ldc, add);
                    }
                });
        }
    }
}

/// One microkernel call: rows `rows` of a's panel (stride `lda` words) by `cols` columns of a
/// b panel, over `kcq` words of k: blocks of `bw` words, each with its own scales.
struct Tile<'a> {
    a: &'a [u32],
    lda: usize,
    b: &'a [u32],
    kcq: usize,
    bw: usize,
    /// a's scales: row r's for block i at `sa[r * sas + i]`
    sa: &'a [f32],
    sas: usize,
    /// b's scales: column j's for block i at `sb[i * sbs + j]` (`sbs = n`; VNNI's excess the
    /// same way); nibbles: `sbs = 2 NR`, each block's NR steps then its NR offsets
    sb: &'a [f32],
    sbs: usize,
    excess: &'a [i32],
    /// Nibbles: the sums of a's codes times a's scales (as `sa`); else empty
    sums: &'a [f32],
    n: usize,
    rows: usize,
    cols: usize,
}

impl Tile<'_> {
    fn blocks(&self) -> usize {
        self.kcq.div_ceil(self.bw)
    }
}

fn micro(kind: Kind, t: &Tile, c: &mut [f32], ldc: usize, add: bool) {
    let (mr, nr) = (kind.mr(), kind.nr());
    // past the last scale (and excess) read; nibbles read whole panels' steps and offsets
    let last = (t.blocks() - 1) * t.sbs + if kind.is_nibbles() { 2 * nr } else { t.cols };
    assert!(t.rows <= mr && t.cols <= nr && t.kcq > 0 && t.sb.len() >= last);
    assert!(t.rows == 0 || t.sa.len() >= (t.rows - 1) * t.sas + t.blocks());
    assert!(t.a.len() >= (mr - 1) * t.lda + t.kcq && t.b.len() >= nr * t.kcq);
    assert!(t.rows == 0 || c.len() >= (t.rows - 1) * ldc + t.cols);
    assert!(if kind.excess() {
        t.excess.len() >= last
    } else {
        t.excess.is_empty()
    });
    assert!(if kind.is_nibbles() {
        t.rows == 0 || t.sums.len() >= (t.rows - 1) * t.sas + t.blocks()
    } else {
        t.sums.is_empty() && t.sbs == t.n
    });
    #[cfg(target_arch = "x86_64")]
    match kind {
        // SAFETY: `kind` is one this CPU runs (Kind::best or all_here); the asserts above
        // bound every load and store of the kernels.
        Kind::Vnni => return unsafe { x86::micro_vnni(t, c, ldc, add) },
        Kind::AvxVnni => return unsafe { x86::micro_avx_vnni(t, c, ldc, add) },
        Kind::Avx2 => return unsafe { x86::micro_avx2(t, c, ldc, add) },
        Kind::Nibbles => return unsafe { x86::micro_nibbles(t, c, ldc, add) },
        Kind::NibblesVnni => return unsafe { x86::micro_nibbles_vnni(t, c, ldc, add) },
        Kind::Plain => {}
    }
    assert!(!kind.is_nibbles(), "the nibble kernels run on AVX2 only");
    for r in 0..t.rows {
        for j in 0..t.cols {
            let mut f = 0f32;
            for i in 0..t.blocks() {
                let mut s = 0i32;
                for p in i * t.bw..((i + 1) * t.bw).min(t.kcq) {
                    let (x, y) = (t.a[r * t.lda + p], t.b[p * nr + j]);
                    s += (x as i16 as i32) * (y as i16 as i32)
                        + ((x >> 16) as i16 as i32) * ((y >> 16) as i16 as i32);
                }
                f += s as f32 * t.sb[i * t.sbs + j] * t.sa[r * t.sas + i];
            }
            let o = &mut c[r * ldc + j];
            *o = if add { *o + f } else { f };
        }
    }
}

mod nibbles;
mod pack;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use nibbles::{code4, mm_nibbles_reference};

pub(crate) use pack::{PackedA, PackedB};

/// The readable twin: a quantized per row and b per column in blocks of `BLOCK` values of k,
/// as the module says; each block's code products summed in i64 and scaled, the blocks summed
/// in f64.
pub fn mm_int8_reference(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let quant = |v: Vec<f32>| -> Vec<(Vec<i64>, f64)> {
        v.chunks(BLOCK)
            .map(|blk| {
                let amax = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
                let (inv, back) = scales(amax);
                (
                    blk.iter().map(|&x| code(x, inv) as i64).collect(),
                    back as f64,
                )
            })
            .collect()
    };
    let arows: Vec<_> = (0..m)
        .map(|i| quant(a[i * k..(i + 1) * k].to_vec()))
        .collect();
    let bcols: Vec<_> = (0..n)
        .map(|j| quant((0..k).map(|p| b[p * n + j]).collect()))
        .collect();
    let mut c = vec![0f32; m * n];
    for (i, qa) in arows.iter().enumerate() {
        for (j, qb) in bcols.iter().enumerate() {
            let mut s = 0f64;
            for ((ca, sa), (cb, sb)) in qa.iter().zip(qb) {
                let dot: i64 = ca.iter().zip(cb).map(|(x, y)| x * y).sum();
                s += dot as f64 * sa * sb;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

#[cfg(test)]
mod tests;
