//! The tile products over a quantized W (`n` rows of `fmt.cols` values): W decoded a tile at a
//! time (f32 rows, or straight into the bf16 kernel's packed k-pairs), never whole; the forward
//! `x W^T` in tiles of y's columns, the input gradient `g W` in tiles of W's rows (or, in bf16
//! and nibbles modes over GGUF's blocks, of dx's columns).

use super::product::Mode;
use super::{dequantize_par, dequantize_rows, QFormat};
use crate::bf16::{Left, Out};
use crate::cpu::{mm, rows, View};
use crate::int8::{mm_int8_packed, Kind, PackedA, PackedB};
use rayon::prelude::*;

/// Rows of W decoded per tile: about 8 MiB of f32, at least 128 rows, in whole panels of the
/// bf16 kernel's 48 columns (a part-filled panel in every tile of the forward computed padding).
/// Each tile's forward product passes over all of x and each tile's input-gradient product over
/// all of dx, so thin tiles of wide rows (a down projection's 8960 values) would cost more in
/// those passes than in the products: 29-row tiles made Qwen2.5-1.5B's steps 1.6x as long. (In
/// bf16 mode, where a tile is 4 MiB of packed pairs, twice the rows measured the same.)
fn tile_rows(k: usize) -> usize {
    if cfg!(test) {
        // the unit tests' small weights still span several tiles (the same code path)
        return ((1 << 15) / k.max(1)).clamp(16, 2048);
    }
    (((1 << 21) / k.max(1)).clamp(128, 2048) + 24) / 48 * 48
}

/// Tiles of W decoded for a product: f32, or straight into the bf16 kernel's packed k-pairs
/// or the 8-bit kernel's words.
struct Tiles {
    f32s: Vec<f32>,
    mode: Mode,
    /// the forward's (rows of x, rows of the tile) product before it is copied into place
    part: Vec<f32>,
    /// bf16 and int8 modes: the tile decoded straight into the kernel's packed words
    packed: Vec<u32>,
}

thread_local! {
    /// Tile buffers kept between products on this thread: fresh (rows, cols) buffers on every
    /// product would each be zeroed page by page by the kernel.
    static SPARE: std::cell::Cell<Option<Tiles>> = const { std::cell::Cell::new(None) };
}

impl Tiles {
    /// Buffers for `rows` rows of `k` values, taken from this thread's spare set where there is one.
    fn new(rows: usize, k: usize, mode: Mode) -> Self {
        let mut t = SPARE.with(|s| s.take()).unwrap_or(Tiles {
            f32s: Vec::new(),
            mode,
            part: Vec::new(),
            packed: Vec::new(),
        });
        t.mode = mode;
        if mode.f32_tiles() && t.f32s.len() < rows * k {
            t.f32s.resize(rows * k, 0.0);
        }
        t
    }

    /// bf16 mode: `out (m, n) = [out +] a (m, k) T` for the tile `T` of `r` rows of `cols`
    /// values that `row(i, out)` decodes (`transposed`: T^T, the forward), each row decoded
    /// once straight into the kernel's packed form.
    #[allow(clippy::too_many_arguments)]
    fn packed_product(
        &mut self,
        r: usize,
        cols: usize,
        row: impl Fn(usize, &mut [f32]) + Sync,
        transposed: bool,
        m: usize,
        out: Out,
        acc: bool,
        a: Left,
    ) {
        let words = std::mem::take(&mut self.packed);
        let b = crate::bf16::PackedB::from_rows(r, cols, transposed, words, row);
        let kernel = crate::amx::Bf16Kernel::chosen();
        crate::bf16::mm_bf16_into(kernel, m, out, acc, 1.0, a, &b, true);
        self.packed = b.into_words();
    }

    /// [`Tiles::packed_product`] of whole rows of `blocks`.
    #[allow(clippy::too_many_arguments)]
    fn packed_rows(
        &mut self,
        fmt: QFormat,
        blocks: &[u8],
        r: usize,
        transposed: bool,
        m: usize,
        out: Out,
        acc: bool,
        a: Left,
    ) {
        let rb = fmt.row_bytes();
        let row =
            |i: usize, out: &mut [f32]| dequantize_rows(fmt, &blocks[i * rb..(i + 1) * rb], out);
        self.packed_product(r, fmt.cols, row, transposed, m, out, acc, a);
    }

    /// int8 mode: `out = [out +] a T` for the tile `T` of `r` whole rows of `blocks`
    /// (`transposed`: T^T, the forward), each row read once straight into the kernel's words:
    /// decoded and coded in 8 bits, or, for a's nibble kinds (`int8::nibbles`), W's own 4-bit
    /// codes in the forward and its columns' blocks coded again in 4 bits in the input gradient.
    #[allow(clippy::too_many_arguments)]
    fn int8_rows(
        &mut self,
        fmt: QFormat,
        blocks: &[u8],
        r: usize,
        transposed: bool,
        out: Out,
        acc: bool,
        a: &PackedA,
    ) {
        let rb = fmt.row_bytes();
        let bytes = |i: usize| &blocks[i * rb..(i + 1) * rb];
        let words = std::mem::take(&mut self.packed);
        let b = if a.kind.is_nibbles() && !transposed {
            let row = |i: usize, out: &mut [f32]| dequantize_rows(fmt, bytes(i), out);
            PackedB::from_rows_coded(a.kind, r, fmt.cols, words, row)
        } else if a.kind.is_nibbles() {
            let row = |i: usize, codes: &mut [u8], step: &mut [f32], lo: &mut [f32]| {
                fmt.q.nibbles(fmt.cols, bytes(i), codes, step, lo)
            };
            PackedB::from_codes(a.kind, r, fmt.cols, words, row)
        } else {
            let row = |i: usize, out: &mut [f32]| dequantize_rows(fmt, bytes(i), out);
            PackedB::from_rows(a.kind, r, fmt.cols, transposed, words, row)
        };
        mm_int8_packed(out, acc, a, &b);
        self.packed = b.into_words();
    }

    /// Hand the buffers back for the next product on this thread.
    fn done(self) {
        SPARE.with(|s| s.set(Some(self)));
    }

    /// Decode `r` rows of blocks into the f32 tile.
    fn decode(&mut self, fmt: QFormat, blocks: &[u8], r: usize) {
        dequantize_par(fmt, blocks, &mut self.f32s[..r * fmt.cols]);
    }

    /// `c (m, n) = [c +] a (m, k) T` for the tile `T` of `r` rows seen as `(k, n)` with strides
    /// (`rs`, `cs`): `rs = 1, cs = cols` is the tile transposed (forward), `rs = cols, cs = 1`
    /// the tile itself (input gradient).
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        m: usize,
        n: usize,
        k: usize,
        c: &mut [f32],
        acc: bool,
        a: View,
        rs: usize,
        cs: usize,
        len: usize,
    ) {
        let f = View {
            x: &self.f32s[..len],
            rs,
            cs,
        };
        // bf16 tiles go through `packed_product`, 8-bit ones through `int8_rows`
        debug_assert!(self.mode.f32_tiles());
        mm(m, n, k, c, acc, 1.0, a, f, true)
    }
}

/// `y (m, n) = x (m, k) W^T` in f32 throughout, into row-major `y` (overwritten).
pub(crate) fn forward_into(
    x: &[f32],
    m: usize,
    fmt: QFormat,
    w: &[u8],
    n: usize,
    y: &mut [f32],
    mode: Mode,
) {
    let (k, rb) = (fmt.cols, fmt.row_bytes());
    if crate::skinny::takes(m) {
        // few rows: each task decodes a few rows of W and dots them with every row of x
        let per = 8;
        let cols: Vec<Vec<f32>> = w
            .par_chunks(per * rb)
            .map_init(
                || vec![0f32; per * k],
                |wt, b| {
                    let r = b.len() / rb;
                    dequantize_rows(fmt, b, &mut wt[..r * k]);
                    crate::skinny::xwt(x, &wt[..r * k], m, r, k)
                },
            )
            .collect();
        for (t, c) in cols.iter().enumerate() {
            let r = c.len() / m;
            for i in 0..m {
                y[i * n + t * per..i * n + t * per + r].copy_from_slice(&c[i * r..(i + 1) * r]);
            }
        }
        return;
    }
    let tr = tile_rows(k);
    let mut tile = Tiles::new(tr, k, mode);
    if mode == Mode::Bf16 {
        // x packed once for every tile; each tile's product written in place into y
        let kernel = crate::amx::Bf16Kernel::chosen();
        let xa = crate::bf16::PackedA::new(kernel, rows(x, k).into(), m, k, true);
        for o0 in (0..n).step_by(tr) {
            let r = tr.min(n - o0);
            let blocks = &w[o0 * rb..(o0 + r) * rb];
            let out = Out {
                c: y,
                ldc: n,
                c0: o0,
            };
            tile.packed_rows(fmt, blocks, r, true, m, out, false, Left::Packed(&xa));
        }
        tile.done();
        return;
    }
    let codes = mode.nibbles(fmt);
    if codes.is_some() || mode == Mode::Int8 {
        // x quantized once for every tile; each tile's product (on W's 4-bit codes where it
        // runs on them) written in place into y
        let xa = PackedA::new(codes.unwrap_or(Kind::chosen()), rows(x, k), m, k);
        for o0 in (0..n).step_by(tr) {
            let r = tr.min(n - o0);
            let blocks = &w[o0 * rb..(o0 + r) * rb];
            let out = Out {
                c: y,
                ldc: n,
                c0: o0,
            };
            tile.int8_rows(fmt, blocks, r, true, out, false, &xa);
        }
        tile.done();
        return;
    }
    let mut part = std::mem::take(&mut tile.part);
    if part.len() < m * tr {
        part.resize(m * tr, 0.0);
    }
    for o0 in (0..n).step_by(tr) {
        let r = tr.min(n - o0);
        let blocks = &w[o0 * rb..(o0 + r) * rb];
        // part (m, r) = x (m, k) tile^T (k, r)
        tile.decode(fmt, blocks, r);
        tile.product(m, r, k, &mut part[..m * r], false, rows(x, k), 1, k, r * k);
        y.par_chunks_mut(n)
            .zip(part.par_chunks(r))
            .for_each(|(y, p)| y[o0..o0 + r].copy_from_slice(p));
    }
    tile.part = part;
    tile.done();
}

/// `dx (m, k) = g (m, n) W`, W given as `n` quantized rows.
pub(super) fn input_grad(
    g: &[f32],
    m: usize,
    fmt: QFormat,
    w: &[u8],
    n: usize,
    mode: Mode,
) -> Vec<f32> {
    let mut dx = vec![0f32; m * fmt.cols];
    input_grad_into(g, m, fmt, w, n, &mut dx, mode);
    dx
}

/// `dx (m, k) = g (m, n) W` into row-major `dx` (overwritten): a sum over tiles of W's rows, or
/// in bf16 and nibbles modes over GGUF's blocks tiles of dx's columns
/// ([`input_grad_by_columns`]).
pub(crate) fn input_grad_into(
    g: &[f32],
    m: usize,
    fmt: QFormat,
    w: &[u8],
    n: usize,
    dx: &mut [f32],
    mode: Mode,
) {
    // nibbles: W's columns coded again in 4 bits per block of 32 rows
    let codes = (mode == Mode::Nibbles).then(Kind::nibbles).flatten();
    if mode == Mode::Bf16 || codes.is_some() {
        if let (Some(bb), Some(tc)) = (
            fmt.q.block_bytes(),
            tile_cols(n, fmt.cols, fmt.q.block_size()),
        ) {
            return input_grad_by_columns(g, m, fmt, w, n, dx, bb, tc, codes);
        }
    }
    let (k, rb) = (fmt.cols, fmt.row_bytes());
    // nibbles: tiles of whole blocks of 32 rows
    let tr = match codes {
        Some(_) => (tile_rows(k) / 32 * 32).max(32),
        None => tile_rows(k),
    };
    let mut tile = Tiles::new(tr, k, mode);
    for o0 in (0..n).step_by(tr) {
        let r = tr.min(n - o0);
        let blocks = &w[o0 * rb..(o0 + r) * rb];
        // dx += g[:, o0..o0+r] (m, r) tile (r, k)
        let gv = View {
            x: &g[o0..],
            rs: n,
            cs: 1,
        };
        if mode == Mode::Bf16 {
            let out = Out {
                c: dx,
                ldc: k,
                c0: 0,
            };
            tile.packed_rows(fmt, blocks, r, false, m, out, o0 > 0, Left::View(gv.into()));
        } else if mode == Mode::Int8 || codes.is_some() {
            let ga = PackedA::new(codes.unwrap_or(Kind::chosen()), gv, m, r);
            let out = Out {
                c: dx,
                ldc: k,
                c0: 0,
            };
            tile.int8_rows(fmt, blocks, r, false, out, o0 > 0, &ga);
        } else {
            tile.decode(fmt, blocks, r);
            tile.product(m, k, r, dx, o0 > 0, gv, k, 1, r * k);
        }
    }
    tile.done();
}

/// Columns of dx per tile of [`input_grad_by_columns`] (whole blocks of `bs`, about 4 MiB of
/// packed pairs, at least 256 wide), or None where tiles of W's rows do as well: W fits one
/// row tile, or a tile 256 columns wide would pack into more than 8 MiB (an output head's
/// vocabulary of rows, whose input gradient is narrow). Under test one block: several tiles.
fn tile_cols(n: usize, k: usize, bs: usize) -> Option<usize> {
    if cfg!(test) {
        return Some(bs);
    }
    let tc = ((1 << 21) / n.max(1)).max(256).div_ceil(bs) * bs;
    (n > tile_rows(k) && n * tc <= 1 << 22).then_some(tc)
}

/// [`input_grad_into`] in bf16 or nibbles mode (`codes`: the nibble kernel) over a format
/// whose blocks decode alone (`bb` bytes each): `dx` in tiles of its columns, tile `c0..c1` =
/// g (m, n) W[:, c0..c1], decoded from each row's blocks of those columns; g packed once for
/// every tile, each tile's columns written once. (Tiles of W's rows add each tile's product
/// into all of dx: for Qwen2.5-1.5B's down projection, seven passes over a (rows, 8960) f32
/// gradient.)
#[allow(clippy::too_many_arguments)]
fn input_grad_by_columns(
    g: &[f32],
    m: usize,
    fmt: QFormat,
    w: &[u8],
    n: usize,
    dx: &mut [f32],
    bb: usize,
    tc: usize,
    codes: Option<Kind>,
) {
    let (k, rb, bs) = (fmt.cols, fmt.row_bytes(), fmt.q.block_size());
    let row = |c0: usize, c: usize| {
        let (b0, b1) = (c0 / bs * bb, (c0 + c) / bs * bb);
        move |i: usize, out: &mut [f32]| fmt.q.decode(c, &w[i * rb + b0..i * rb + b1], out)
    };
    let mode = codes.map_or(Mode::Bf16, |_| Mode::Nibbles);
    let mut tile = Tiles::new(0, 0, mode);
    if let Some(kind) = codes {
        let ga = PackedA::new(kind, rows(g, n), m, n);
        for c0 in (0..k).step_by(tc) {
            let c = tc.min(k - c0);
            let words = std::mem::take(&mut tile.packed);
            let b = PackedB::from_rows_coded(kind, n, c, words, row(c0, c));
            mm_int8_packed(Out { c: dx, ldc: k, c0 }, false, &ga, &b);
            tile.packed = b.into_words();
        }
        return tile.done();
    }
    let kernel = crate::amx::Bf16Kernel::chosen();
    let ga = crate::bf16::PackedA::new(kernel, rows(g, n).into(), m, n, true);
    for c0 in (0..k).step_by(tc) {
        let c = tc.min(k - c0);
        let out = Out { c: dx, ldc: k, c0 };
        tile.packed_product(n, c, row(c0, c), false, m, out, false, Left::Packed(&ga));
    }
    tile.done();
}
