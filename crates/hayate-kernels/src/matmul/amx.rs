//! bf16 weights times f32 activations on the AMX tile unit (prefill).
//!
//! `y[t][r] = Σ_k x[t][k] · W[r][k]` as tile products `C += A · B`:
//! - A: 16 tokens x 32 inputs of the activations in bf16, straight from
//!   [`SplitActs`]. Each activation is split into three bf16,
//!   `x = hi + mid + lo + ε` with `|ε| ≤ 2⁻²⁴·|x|`, and all three are
//!   multiplied, so the product has f32 accuracy (one bf16 keeps 8 bits of
//!   every input, two keep 16: measured on the fixtures, that is ten times
//!   the error of f32 products in the logits);
//! - B: 32 inputs x 16 outputs of the weights, in the pair order the tile
//!   unit reads (`B[i][2j + p] = W[r0 + j][k0 + 2i + p]`), packed per call
//!   from the stored rows by 16x16 transposes of 32-bit pairs;
//! - C: 16 tokens x 16 outputs in f32, stored straight into `y`.
//!
//! Products of bf16 pairs are exact in f32 and are summed in f32 (the tile
//! unit rounds to nearest even and flushes denormals), so the only error
//! beyond an f32 dot product's is `ε`.
//!
//! Tiles: `tmm0..tmm3` hold C for 2 x 2 blocks (32 tokens x 32 outputs),
//! `tmm4`/`tmm5` the parts of one token block's activations in turn,
//! `tmm6`/`tmm7` the weights of two output blocks; each 32-input step loads
//! 8 tiles for 12 tile products.
//!
//! Short passes (8 to 16 tokens, [`short_rows`]) swap the roles, so that
//! nothing of the weights is packed: A is 16 weight rows read straight from
//! the stored matrix, B the activations' three parts in pairs
//! ([`PairActs`]), C 16 outputs x 16 tokens, transposed into `y`.

use crate::pool::{DisjointMut, split_range};
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Inputs per tile product (32 bf16 = 64 bytes per tile row).
pub const K_STEP: usize = 32;
/// Tokens per A tile and outputs per B tile.
const BLOCK: usize = 16;
/// bf16 parts each activation is split into.
const PARTS: usize = 3;
/// Bytes of weights packed at once per thread (the panel stays in L2 while
/// every token block passes over it).
const PANEL_BYTES: usize = 512 << 10;

thread_local! {
    /// Per-thread packed weight panel, in tile order.
    static PANEL: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Activations split for the tile unit, as whole A tiles of 16 tokens x 32
/// inputs (1 KiB each, so a tile load reads one contiguous stream): for
/// token block `b`, step `s`, the hi, mid and lo tiles (see
/// [`tile_offset`]). Tokens are padded to 16 and inputs to [`K_STEP`] with
/// zeros.
#[derive(Clone, Copy)]
pub struct SplitActs {
    ptr: *const u16,
    n_tok: usize,
    n_pad: usize,
    kp: usize,
}

// SAFETY: a read-only view of a buffer that outlives the product it serves.
unsafe impl Sync for SplitActs {}

/// Where input `i` of token `t` lies among split activations of `steps`
/// 32-input steps: in the tile of part `part` (0 hi, 1 mid, 2 lo).
#[inline]
fn tile_offset(steps: usize, part: usize, t: usize, i: usize) -> usize {
    (((t / BLOCK * steps + i / K_STEP) * PARTS + part) * BLOCK + t % BLOCK) * K_STEP + i % K_STEP
}

/// How many bf16 values the split of `n_tok x k` activations takes.
pub fn split_len(n_tok: usize, k: usize) -> usize {
    PARTS * n_tok.next_multiple_of(BLOCK) * k.next_multiple_of(K_STEP)
}

/// Splits `x` (`n_tok x k`) into `buf` (resized to [`split_len`]) on the
/// pool, each thread taking whole blocks of 16 tokens (contiguous in `buf`).
///
/// # Safety
/// The CPU supports AVX-512 F/BW; `x` holds `n_tok * k` values.
pub unsafe fn split_activations(
    pool: &crate::ThreadPool,
    x: &[f32],
    n_tok: usize,
    k: usize,
    buf: &mut Vec<u16>,
) -> SplitActs {
    let (n_pad, kp) = (n_tok.next_multiple_of(BLOCK), k.next_multiple_of(K_STEP));
    buf.resize(split_len(n_tok, k), 0);
    let per_block = PARTS * BLOCK * kp;
    let shared = DisjointMut::new(buf);
    pool.run(&|tid, n_threads| {
        for b in split_range(n_pad / BLOCK, n_threads, tid, 1) {
            // SAFETY: each block of tokens goes to one thread only.
            let tiles = unsafe { shared.piece(b * per_block, per_block) };
            for i in 0..BLOCK {
                let t = b * BLOCK + i;
                let row = (t < n_tok).then(|| &x[t * k..(t + 1) * k]);
                // SAFETY: AVX-512 F/BW (caller).
                unsafe { split_token(row, i, tiles) };
            }
        }
    });
    SplitActs {
        ptr: buf.as_ptr(),
        n_tok,
        n_pad,
        kp,
    }
}

/// Rounds f32 lanes to the nearest bf16 (ties to even), as their bit patterns
/// in the low half of each 32-bit lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn round_bf16(v: __m512) -> __m512i {
    let bits = _mm512_castps_si512(v);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd);
    _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias))
}

/// Splits the activations of token `i` of a block (zeros if `None`) into
/// its rows of the block's hi, mid and lo `tiles` (zeros past the row).
///
/// # Safety
/// The CPU supports AVX-512 F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_token(x: Option<&[f32]>, i: usize, tiles: &mut [u16]) {
    let kp = tiles.len() / (PARTS * BLOCK);
    assert!(i < BLOCK && kp.is_multiple_of(K_STEP) && x.is_none_or(|x| x.len() <= kp));
    let steps = kp / K_STEP;
    let k = x.map_or(0, <[f32]>::len);
    let src = x.map_or(std::ptr::null(), <[f32]>::as_ptr);
    for k0 in (0..kp).step_by(16) {
        let mask = if k0 + 16 <= k {
            0xffff
        } else if k0 < k {
            (1u16 << (k - k0)) - 1
        } else {
            0
        };
        // SAFETY: the mask keeps the load within the row (no lane is read
        // when it is 0); each store of 16 values at `tile_offset` stays
        // within the block's tiles (`i < 16`, `k0 + 16 <= kp`, asserted).
        unsafe {
            let mut rest = _mm512_maskz_loadu_ps(mask, src.wrapping_add(k0));
            for part in 0..PARTS {
                let bits = round_bf16(rest);
                rest = _mm512_sub_ps(rest, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits)));
                let dst = tiles.as_mut_ptr().add(tile_offset(steps, part, i, k0));
                _mm256_storeu_si256(dst.cast(), _mm512_cvtepi32_epi16(bits));
            }
        }
    }
}

/// Transposes 16 vectors of 16 32-bit lanes in place: `out[j]` lane `i` =
/// `rows[i]` lane `j`.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: &mut [__m512i; 16]) {
    // Within each 128-bit lane L of group g (rows 4g..4g+4), `u[4g + c]`
    // holds column 4L + c of those rows.
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let [a, b, c, d] = [r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]];
        let (t0, t1) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let (t2, t3) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
        u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
    }
    // Column 4L + c is lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
    for c in 0..4 {
        let [u0, u1, u2, u3] = [u[c], u[4 + c], u[8 + c], u[12 + c]];
        let p0 = _mm512_shuffle_i32x4::<0x44>(u0, u1);
        let p1 = _mm512_shuffle_i32x4::<0xee>(u0, u1);
        let p2 = _mm512_shuffle_i32x4::<0x44>(u2, u3);
        let p3 = _mm512_shuffle_i32x4::<0xee>(u2, u3);
        r[c] = _mm512_shuffle_i32x4::<0x88>(p0, p2);
        r[4 + c] = _mm512_shuffle_i32x4::<0xdd>(p0, p2);
        r[8 + c] = _mm512_shuffle_i32x4::<0x88>(p1, p3);
        r[12 + c] = _mm512_shuffle_i32x4::<0xdd>(p1, p3);
    }
}

/// Packs output rows `r0..r_end` (padded with zeros to whole blocks of 16)
/// of `w` (`k` inputs per row) into `panel`: block `j`, step `s` at
/// `(j * steps + s) * 256`, each a B tile.
///
/// # Safety
/// `w` holds rows `r0..r_end` of `k` values; `panel` has room for
/// `blocks * steps * 256` values; AVX-512 F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_panel(
    w: *const u16,
    k: usize,
    r0: usize,
    r_end: usize,
    steps: usize,
    panel: *mut u32,
) {
    let blocks = (r_end - r0).div_ceil(BLOCK);
    for j in 0..blocks {
        for s in 0..steps {
            let k0 = s * K_STEP;
            let mask = if k0 + K_STEP <= k {
                u32::MAX
            } else {
                (1u32 << (k - k0)) - 1
            };
            let mut rows = [_mm512_setzero_si512(); 16];
            for (n, row) in rows.iter_mut().enumerate() {
                let r = r0 + j * BLOCK + n;
                if r < r_end {
                    // SAFETY: the mask keeps the load within row `r`.
                    *row = unsafe { _mm512_maskz_loadu_epi16(mask, w.add(r * k + k0).cast()) };
                }
            }
            transpose16(&mut rows);
            for (i, row) in rows.iter().enumerate() {
                // SAFETY: within the panel (caller).
                unsafe {
                    _mm512_storeu_si512(panel.add((j * steps + s) * 256 + i * 16).cast(), *row)
                };
            }
        }
    }
}

/// The tile layout every tile takes here: 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

macro_rules! tile_load {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"),
            p = in(reg) $p, s = in(reg) $stride, options(nostack))
    };
}
macro_rules! tile_store {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t),
            p = in(reg) $p, s = in(reg) $stride, options(nostack))
    };
}
macro_rules! tile_zero {
    ($t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nostack))
    };
}
macro_rules! tile_dot {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nostack)
        )
    };
}

/// Computes output columns `rows` of `y` (`acts.n_tok x ldc`) for the bf16
/// weights `w` (`ldc x k`, row-major) on this thread.
///
/// # Safety
/// The CPU and OS support AMX-BF16 and AVX-512 F/BW ([`crate::Isa::has_amx`]);
/// `acts` was split from `k` inputs and its buffer is alive; `w` holds
/// `ldc * k` values; `y` points to `acts.n_tok * ldc` writable values;
/// `rows` lies within `0..ldc`, and no other thread writes those columns.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn gemm_rows(
    w: &[u16],
    k: usize,
    ldc: usize,
    acts: SplitActs,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    debug_assert_eq!(acts.kp, k.next_multiple_of(K_STEP));
    let steps = acts.kp / K_STEP;
    let panel_rows = (PANEL_BYTES / (acts.kp * 2)).max(2 * BLOCK) / (2 * BLOCK) * (2 * BLOCK);
    PANEL.with_borrow_mut(|panel| {
        panel.resize(panel_rows * acts.kp / 2, 0);
        // SAFETY: the tile unit is enabled (caller); the configuration is valid.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack)) };
        let mut p0 = rows.start;
        while p0 < rows.end {
            let p_end = rows.end.min(p0 + panel_rows);
            // SAFETY: rows `p0..p_end` of `w` exist (caller); the panel holds them.
            unsafe { pack_panel(w.as_ptr(), k, p0, p_end, steps, panel.as_mut_ptr()) };
            let blocks = (p_end - p0).div_ceil(BLOCK);
            for t0 in (0..acts.n_pad).step_by(2 * BLOCK) {
                let two_t = t0 + BLOCK < acts.n_pad;
                for j in (0..blocks).step_by(2) {
                    let two_r = j + 1 < blocks;
                    // SAFETY: token blocks `t0..` and weight blocks `j..` lie
                    // within `acts` and the panel; outputs within `y` (caller).
                    unsafe {
                        let b = panel.as_ptr().add(j * steps * 256);
                        block(acts, b, steps, two_t, two_r, t0);
                        store_block(acts, y, ldc, t0, p0 + j * BLOCK, p_end, two_t, two_r);
                    }
                }
            }
            p0 = p_end;
        }
        // SAFETY: releases the tile state this call configured.
        unsafe { asm!("tilerelease", options(nostack)) };
    });
}

/// Accumulates C tiles 0..3 for token blocks `t0`, `t0 + 16` (if `two_t`)
/// and weight blocks at `b` and the next (if `two_r`) over all `steps`.
///
/// # Safety
/// The tiles are configured; everything read lies within `acts` and the panel.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block(acts: SplitActs, b: *const u32, steps: usize, two_t: bool, two_r: bool, t0: usize) {
    const TILE: usize = BLOCK * K_STEP;
    // One token block's three parts against both weight tiles, into C tiles
    // `$c0`/`$c1`; the parts alternate between tmm4 and tmm5 so that each
    // load goes to the register the products just before it do not read.
    macro_rules! token_block {
        ($a:expr, $c0:literal, $c1:literal, $first:literal, $second:literal) => {
            tile_load!($first, $a, 64usize);
            tile_load!($second, $a.add(TILE), 64usize);
            tile_dot!($c0, $first, "6");
            if two_r {
                tile_dot!($c1, $first, "7");
            }
            tile_dot!($c0, $second, "6");
            if two_r {
                tile_dot!($c1, $second, "7");
            }
            tile_load!($first, $a.add(2 * TILE), 64usize);
            tile_dot!($c0, $first, "6");
            if two_r {
                tile_dot!($c1, $first, "7");
            }
        };
    }
    // SAFETY: see the function's contract.
    unsafe {
        let a0 = acts.ptr.add(tile_offset(steps, 0, t0, 0));
        let a1 = acts.ptr.add(tile_offset(
            steps,
            0,
            (t0 + BLOCK).min(acts.n_pad - BLOCK),
            0,
        ));
        let b1 = b.add(steps * 256);
        tile_zero!("0");
        tile_zero!("1");
        tile_zero!("2");
        tile_zero!("3");
        for s in 0..steps {
            let a = PARTS * TILE * s;
            tile_load!("6", b.add(s * 256), 64usize);
            if two_r {
                tile_load!("7", b1.add(s * 256), 64usize);
            }
            token_block!(a0.add(a), "0", "1", "4", "5");
            if two_t {
                token_block!(a1.add(a), "2", "3", "5", "4");
            }
        }
    }
}

/// Stores C tiles 0..3 (see [`block`]) into `y`: whole tiles directly,
/// tiles past the last token or output row through a scratch tile.
///
/// # Safety
/// The tiles hold a finished [`block`]; `y` as in [`gemm_rows`].
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_block(
    acts: SplitActs,
    y: *mut f32,
    ldc: usize,
    t0: usize,
    r0: usize,
    r_end: usize,
    two_t: bool,
    two_r: bool,
) {
    let mut scratch = [0f32; 256];
    let stride = ldc * 4;
    for (i, jj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        if (i == 1 && !two_t) || (jj == 1 && !two_r) {
            continue;
        }
        let (t, r) = (t0 + i * BLOCK, r0 + jj * BLOCK);
        let (n_t, n_r) = (
            BLOCK.min(acts.n_tok.saturating_sub(t)),
            BLOCK.min(r_end - r),
        );
        if n_t == 0 {
            continue;
        }
        let whole = n_t == BLOCK && n_r == BLOCK;
        let dst = if whole {
            // SAFETY: the whole tile lies within `y` (checked above).
            unsafe { y.add(t * ldc + r) }
        } else {
            scratch.as_mut_ptr()
        };
        let s = if whole { stride } else { 64 };
        // SAFETY: `dst` has 16 rows of 16 values `s` bytes apart.
        unsafe {
            match (i, jj) {
                (0, 0) => tile_store!("0", dst, s),
                (0, _) => tile_store!("1", dst, s),
                (_, 0) => tile_store!("2", dst, s),
                _ => tile_store!("3", dst, s),
            }
        }
        if !whole {
            for ti in 0..n_t {
                // SAFETY: token `t + ti` and outputs `r..r + n_r` lie within `y`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        scratch.as_ptr().add(ti * BLOCK),
                        y.add((t + ti) * ldc + r),
                        n_r,
                    )
                };
            }
        }
    }
}

/// Activations of a short pass (8 to 16 tokens) laid out as B tiles for
/// [`short_rows`]: for step `s` and part `p` (hi, mid, lo), a tile whose row
/// `i` holds, for each token `t`, inputs `32s + 2i` and `32s + 2i + 1` as a
/// bf16 pair (`[s][p][i][t]`, 1 KiB per tile); tokens past `n_tok` are zero.
#[derive(Clone, Copy)]
pub struct PairActs {
    ptr: *const u32,
    n_tok: usize,
}

// SAFETY: a read-only view of a buffer that outlives the product it serves.
unsafe impl Sync for PairActs {}

/// Lays out `n_tok` (at most 16) tokens of `k` inputs (a multiple of
/// [`K_STEP`]) for [`short_rows`] in `buf` (resized).
///
/// # Safety
/// The CPU supports AVX-512 F/BW; `x` holds `n_tok * k` values.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn pair_activations(x: &[f32], n_tok: usize, k: usize, buf: &mut Vec<u32>) -> PairActs {
    debug_assert!(n_tok <= BLOCK && k.is_multiple_of(K_STEP));
    let steps = k / K_STEP;
    buf.resize(steps * PARTS * 256, 0);
    for s in 0..steps {
        let mut parts = [[_mm512_setzero_si512(); 16]; PARTS];
        for t in 0..n_tok {
            // SAFETY: token `t`'s inputs `32s..32s + 32` lie within `x`.
            let (mut lo, mut hi) = unsafe {
                let p = x.as_ptr().add(t * k + s * K_STEP);
                (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
            };
            for part in parts.iter_mut() {
                let (bl, bh) = (round_bf16(lo), round_bf16(hi));
                lo = _mm512_sub_ps(lo, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bl)));
                hi = _mm512_sub_ps(hi, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bh)));
                // 32 bf16 in input order: 32-bit lane j holds inputs 2j and 2j + 1.
                let pairs = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm512_cvtepi32_epi16(bl)),
                    _mm512_cvtepi32_epi16(bh),
                );
                part[t] = pairs;
            }
        }
        for (p, part) in parts.iter_mut().enumerate() {
            transpose16(part);
            for (i, row) in part.iter().enumerate() {
                // SAFETY: tile `(s, p)` lies within `buf` (resized above).
                unsafe {
                    let dst = buf.as_mut_ptr().add((s * PARTS + p) * 256 + i * 16);
                    _mm512_storeu_si512(dst.cast(), *row);
                }
            }
        }
    }
    PairActs {
        ptr: buf.as_ptr(),
        n_tok,
    }
}

/// Computes output columns `rows` of `y` (`acts.n_tok x ldc`) for the bf16
/// weights `w` (`ldc x k`, `k` a multiple of [`K_STEP`]) on this thread,
/// with the weights as A tiles read straight from `w` (16 rows of 64 bytes,
/// `2k` bytes apart: nothing is packed, so a pass of a few tokens streams
/// the weights once, as decoding does). Only whole blocks of 16 rows are
/// computed; returns the first row left (the caller runs the rest).
///
/// # Safety
/// As [`gemm_rows`], with `acts` laid out from `k` inputs.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn short_rows(
    w: &[u16],
    k: usize,
    ldc: usize,
    acts: PairActs,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) -> usize {
    let steps = k / K_STEP;
    let a_stride = 2 * k;
    let mut scratch = [0f32; 256];
    let mut r = rows.start;
    // SAFETY: the tile unit is enabled (caller); every tile read lies within
    // `w` (whole blocks of rows within `rows`) or `acts`; outputs within `y`.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack));
        while r + BLOCK <= rows.end {
            let blocks = ((rows.end - r) / BLOCK).min(3);
            let a = w.as_ptr().add(r * k);
            tile_zero!("0");
            tile_zero!("1");
            tile_zero!("2");
            for s in 0..steps {
                let b = acts.ptr.add(s * PARTS * 256);
                tile_load!("5", b, 64usize);
                tile_load!("6", b.add(256), 64usize);
                tile_load!("7", b.add(512), 64usize);
                let a0 = a.add(s * K_STEP);
                tile_load!("3", a0, a_stride);
                tile_dot!("0", "3", "5");
                tile_dot!("0", "3", "6");
                tile_dot!("0", "3", "7");
                if blocks > 1 {
                    tile_load!("4", a0.add(BLOCK * k), a_stride);
                    tile_dot!("1", "4", "5");
                    tile_dot!("1", "4", "6");
                    tile_dot!("1", "4", "7");
                }
                if blocks > 2 {
                    tile_load!("3", a0.add(2 * BLOCK * k), a_stride);
                    tile_dot!("2", "3", "5");
                    tile_dot!("2", "3", "6");
                    tile_dot!("2", "3", "7");
                }
            }
            for j in 0..blocks {
                let dst = scratch.as_mut_ptr();
                match j {
                    0 => tile_store!("0", dst, 64usize),
                    1 => tile_store!("1", dst, 64usize),
                    _ => tile_store!("2", dst, 64usize),
                }
                // C row `i` is output row `r + 16j + i`, lane `t` token `t`.
                for i in 0..BLOCK {
                    for t in 0..acts.n_tok {
                        *y.add(t * ldc + r + j * BLOCK + i) = scratch[i * BLOCK + t];
                    }
                }
            }
            r += blocks * BLOCK;
        }
        asm!("tilerelease", options(nostack));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_swaps_rows_and_lanes() {
        if !crate::Isa::Amx.is_supported() {
            return;
        }
        let m: Vec<u32> = (0..256).collect();
        let mut got = [0u32; 256];
        // SAFETY: AVX-512 F (implied by AMX, checked); 256 values each way.
        unsafe {
            let mut r: [__m512i; 16] =
                std::array::from_fn(|i| _mm512_loadu_si512(m.as_ptr().add(16 * i).cast()));
            transpose16(&mut r);
            for (i, v) in r.iter().enumerate() {
                _mm512_storeu_si512(got.as_mut_ptr().add(16 * i).cast(), *v);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[16 * j + i], m[16 * i + j], "row {i} lane {j}");
            }
        }
    }

    #[test]
    fn split_activations_sum_to_the_inputs_within_two_to_the_minus_24() {
        if !crate::Isa::Amx.is_supported() {
            return;
        }
        let pool = crate::ThreadPool::new(2).unwrap();
        let (n_tok, k) = (3, 37);
        let x: Vec<f32> = (0..n_tok * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
            .collect();
        let mut buf = Vec::new();
        // SAFETY: AVX-512 F/BW (implied by AMX, checked); `x` holds n_tok * k.
        let acts = unsafe { split_activations(&pool, &x, n_tok, k, &mut buf) };
        let (n_pad, kp) = (acts.n_pad, acts.kp);
        assert_eq!((n_pad, kp, buf.len()), (16, 64, PARTS * 16 * 64));
        let widen = |b: u16| f32::from_bits((b as u32) << 16) as f64;
        for t in 0..n_pad {
            for i in 0..kp {
                let parts: [u16; PARTS] = std::array::from_fn(|p| buf[tile_offset(2, p, t, i)]);
                if t >= n_tok || i >= k {
                    assert_eq!(parts, [0; PARTS], "padding at {t},{i}");
                    continue;
                }
                let v = x[t * k + i];
                assert_eq!(
                    parts[0],
                    half::bf16::from_f32(v).to_bits(),
                    "hi is v rounded"
                );
                let err = (parts.iter().map(|&p| widen(p)).sum::<f64>() - v as f64).abs();
                assert!(err <= v.abs() as f64 * 2f64.powi(-24), "{v}: {err}");
            }
        }
    }
}
