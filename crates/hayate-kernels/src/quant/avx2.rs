//! AVX2 integer kernels for q4 and q8 weights with int8 activations.
//!
//! - Decode (GEMV): each weight row is streamed once; per block of 32 the
//!   codes meet the int8 activations in `vpmaddubsw` (unsigned x signed
//!   bytes; q8 moves the weight's sign onto the activation) and `vpmaddwd`,
//!   then one FMA applies both scales.
//! - Prefill (GEMM): a panel of 16 rows is widened to int16 (`q - z`), in
//!   pairs of inputs, and multiplied by broadcast pairs of int16 activations
//!   with `vpmaddwd` (16 exact products per instruction, twice the f32 FMA
//!   rate), accumulating int32 per block of 32 before scaling.

use super::acts::QuantizedActs;
use super::{QuantFormat, QuantLayout, QuantMatRef, group_nibble, unpack_q4_block};
use crate::hadamard::BLOCK;
use crate::matmul::avx2::hsum;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Inputs per packed panel (a multiple of every group size). Large, so that
/// the output tile is revisited rarely: at 256 the read-modify-write of the
/// outputs between panels cost more than the integer products saved.
const KC: usize = 1024;
/// Outputs per packed panel.
const NR: usize = 16;
/// Tokens per micro-kernel call.
const MR: usize = 6;
/// Bytes ahead of the current position that the row kernels prefetch.
const PREFETCH_BYTES: usize = 1024;

#[inline]
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Σ over one block of 32: unsigned codes `q` x signed activations `x`, as 8 int32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn block_dot(q: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1))
}

/// The 32 codes of a q4 block (16 bytes at `p`), in input order.
///
/// # Safety
/// `p` points to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_q4(p: *const u8) -> __m256i {
    // SAFETY: 16 bytes (caller).
    let v = unsafe { _mm_loadu_si128(p.cast()) };
    let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    _mm256_and_si256(both, _mm256_set1_epi8(15))
}

/// `[i >> shift]` per lane: which of the groups loaded for 8 blocks each block is in.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn group_lanes(shift: u32) -> __m256i {
    _mm256_srlv_epi32(
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        _mm256_set1_epi32(shift as i32),
    )
}

/// The bf16 scales of the groups of 8 consecutive blocks, one lane per block.
///
/// # Safety
/// `scales` holds the `8 >> shift` values from `g0` on.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_scales(scales: *const u16, g0: usize, shift: u32, lanes: __m256i) -> __m256 {
    // SAFETY: reads exactly `8 >> shift` values (caller).
    let raw = unsafe {
        match shift {
            0 => _mm_loadu_si128(scales.add(g0).cast()),
            1 => _mm_loadl_epi64(scales.add(g0).cast()),
            _ => _mm_cvtsi32_si128(std::ptr::read_unaligned(scales.add(g0).cast::<i32>())),
        }
    };
    let wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16);
    _mm256_permutevar8x32_ps(_mm256_castsi256_ps(wide), lanes)
}

/// The 4-bit zero points of the groups of 8 consecutive blocks, one lane per block.
///
/// # Safety
/// `zeros` holds the `(8 >> shift) / 2` bytes from `g0 / 2` on; `g0` is even.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_zeros(zeros: *const u8, g0: usize, shift: u32, lanes: __m256i) -> __m256 {
    // SAFETY: reads exactly `(8 >> shift) / 2` bytes (caller).
    let bits = unsafe {
        let p = zeros.add(g0 / 2);
        match shift {
            0 => std::ptr::read_unaligned(p.cast::<u32>()),
            1 => u32::from(std::ptr::read_unaligned(p.cast::<u16>())),
            _ => u32::from(*p),
        }
    };
    let nibbles = _mm256_srlv_epi32(_mm256_set1_epi32(bits as i32), _mm256_slli_epi32(lanes, 2));
    _mm256_cvtepi32_ps(_mm256_and_si256(nibbles, _mm256_set1_epi32(15)))
}

/// Lane `j` of `v` in every lane.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lane(v: __m256, j: i32) -> __m256 {
    _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j))
}

/// One row dotted with `T` tokens' int8 activations. Blocks go in chunks
/// of 8 so that their scales (and q4 zero-point corrections) are combined
/// in vectors rather than one scalar at a time; leftover blocks one by one.
/// Each block's codes and each chunk's scales are loaded once for all
/// tokens, and every token's sums take the same steps whatever `T`, so a
/// token's result does not depend on how many share the pass.
///
/// # Safety
/// `r` is a row of `w`; each `xq` holds `w.cols` codes, each `sx` and
/// `sums` `w.cols / 32` values.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_row<const Q4: bool, const T: usize>(
    w: &QuantMatRef<'_>,
    r: usize,
    xq: [&[i8]; T],
    sx: [&[f32]; T],
    sums: [&[f32]; T],
) -> [f32; T] {
    let nb = w.cols / BLOCK;
    let groups = w.groups();
    let shift = (w.group / BLOCK).trailing_zeros();
    let q4 = Q4;
    let row_bytes = w.format.code_row_bytes(w.cols);
    let block_bytes = row_bytes / nb;
    // SAFETY: all offsets stay within row `r` of each array and within the
    // activation slices (caller); prefetch addresses are not dereferenced.
    unsafe {
        let codes = w.codes.as_ptr().add(r * row_bytes);
        let scales = w.scales.as_ptr().add(r * groups);
        let zeros = w.zeros.as_ptr().add(r * w.format.zero_row_bytes(groups));
        let xq = xq.map(<[i8]>::as_ptr);
        let (sx, sums) = (sx.map(<[f32]>::as_ptr), sums.map(<[f32]>::as_ptr));
        // The block's codes as `vpmaddubsw` takes them, once for all tokens.
        let codes_of = |b: usize| -> (__m256i, __m256i) {
            if q4 {
                (load_q4(codes.add(b * 16)), _mm256_setzero_si256())
            } else {
                let wv = _mm256_loadu_si256(codes.add(b * BLOCK).cast());
                (_mm256_sign_epi8(wv, wv), wv)
            }
        };
        let dot = |(q, wv): (__m256i, __m256i), t: usize, b: usize| -> __m256 {
            let x = _mm256_loadu_si256(xq[t].add(b * BLOCK).cast());
            let d = if q4 {
                block_dot(q, x)
            } else {
                // |w| x (x with w's sign) = w x, with the unsigned operand first.
                block_dot(q, _mm256_sign_epi8(x, wv))
            };
            _mm256_cvtepi32_ps(d)
        };
        let lanes = group_lanes(shift);
        let mut acc0 = [_mm256_setzero_ps(); T];
        let mut acc1 = [_mm256_setzero_ps(); T];
        let mut corr = [_mm256_setzero_ps(); T];
        let chunks = nb / 8;
        for c in 0..chunks {
            let b0 = c * 8;
            let g0 = b0 >> shift;
            _mm_prefetch::<_MM_HINT_T0>(
                codes
                    .wrapping_add((b0 + 8) * block_bytes + PREFETCH_BYTES)
                    .cast(),
            );
            let s = chunk_scales(scales, g0, shift, lanes);
            let sz = if q4 {
                _mm256_mul_ps(s, chunk_zeros(zeros, g0, shift, lanes))
            } else {
                _mm256_setzero_ps()
            };
            let both: [__m256; T] =
                std::array::from_fn(|t| _mm256_mul_ps(s, _mm256_loadu_ps(sx[t].add(b0))));
            if q4 {
                for t in 0..T {
                    corr[t] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(sums[t].add(b0)), corr[t]);
                }
            }
            for j in 0..4 {
                let (b_even, b_odd) = (b0 + 2 * j, b0 + 2 * j + 1);
                let (q_even, q_odd) = (codes_of(b_even), codes_of(b_odd));
                for t in 0..T {
                    let lane_even = lane(both[t], 2 * j as i32);
                    let lane_odd = lane(both[t], 2 * j as i32 + 1);
                    acc0[t] = _mm256_fmadd_ps(dot(q_even, t, b_even), lane_even, acc0[t]);
                    acc1[t] = _mm256_fmadd_ps(dot(q_odd, t, b_odd), lane_odd, acc1[t]);
                }
            }
        }
        let mut tail_corr = [0f32; T];
        for b in chunks * 8..nb {
            let g = b >> shift;
            let s = bf16_to_f32(*scales.add(g));
            let q = codes_of(b);
            for t in 0..T {
                acc0[t] = _mm256_fmadd_ps(dot(q, t, b), _mm256_set1_ps(s * *sx[t].add(b)), acc0[t]);
                if q4 {
                    let z = group_nibble(*zeros.add(g / 2), g);
                    tail_corr[t] += s * f32::from(z) * *sums[t].add(b);
                }
            }
        }
        std::array::from_fn(|t| {
            hsum(_mm256_add_ps(acc0[t], acc1[t])) - hsum(corr[t]) - tail_corr[t]
        })
    }
}

/// Tokens per pass of [`dot_row`] over a row: three accumulators per token
/// in AVX2's 16 registers.
const TOKENS_PER_PASS: usize = 3;

/// Decode: every row of `rows` against each of the (few) tokens.
///
/// # Safety
/// See `product::rows_product`; the CPU supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gemv_rows(
    w: QuantMatRef<'_>,
    acts: &QuantizedActs,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    assert_eq!(w.layout, QuantLayout::Rows, "row kernel on strips");
    let k = w.cols;
    let nb = k / BLOCK;
    macro_rules! pass {
        ($r:expr, $t0:expr, $T:literal) => {{
            let (r, t0) = ($r, $t0);
            let xq = std::array::from_fn(|j| &acts.codes[(t0 + j) * k..(t0 + j + 1) * k]);
            let sx = std::array::from_fn(|j| &acts.scales[(t0 + j) * nb..(t0 + j + 1) * nb]);
            let sums = std::array::from_fn(|j| &acts.sums[(t0 + j) * nb..(t0 + j + 1) * nb]);
            // SAFETY: `r` is a row of `w`; the slices cover one token each;
            // `y` covers `n_tok * w.rows` values (caller).
            unsafe {
                let out: [f32; $T] = match w.format {
                    QuantFormat::Q4 => dot_row::<true, $T>(&w, r, xq, sx, sums),
                    QuantFormat::Q8 => dot_row::<false, $T>(&w, r, xq, sx, sums),
                };
                for (j, v) in out.into_iter().enumerate() {
                    *y.add((t0 + j) * w.rows + r) = v;
                }
            }
        }};
    }
    for r in rows {
        let mut t0 = 0;
        while t0 < acts.n_tok {
            let tokens = (acts.n_tok - t0).min(TOKENS_PER_PASS);
            match tokens {
                1 => pass!(r, t0, 1),
                2 => pass!(r, t0, 2),
                _ => pass!(r, t0, 3),
            }
            t0 += tokens;
        }
    }
}

/// One thread's packed GEMM operands, reused across calls.
#[derive(Default)]
struct Packed {
    /// Weight panel: int16 pairs `[k/2][NR]` (q8) or 4 codes `[k/4][NR]` (q4).
    w: Vec<u32>,
    /// Weight scales `[block][NR]`.
    ws: Vec<f32>,
    /// q4 zero points `[block][NR]`.
    wz: Vec<f32>,
    /// Activations: int16 pairs `[token block][k/2][MR]` (q8) or 4 codes `[token block][k/4][MR]` (q4).
    x: Vec<u32>,
    /// Activation scales `[token block][block][MR]`.
    xs: Vec<f32>,
    /// Sums of the activation codes per block `[token block][block][MR]` (q4).
    xsum: Vec<f32>,
}

thread_local! {
    static PACKED: RefCell<Packed> = RefCell::new(Packed::default());
}

/// Codes `k0..k0+kc` of row `r` as stored (q4: 0..=15 unsigned, q8: signed), widened to i16.
fn row_codes(w: &QuantMatRef<'_>, r: usize, k0: usize, kc: usize, out: &mut [i16]) {
    match w.format {
        QuantFormat::Q8 => {
            let mut src = [0u8; BLOCK];
            for (b, dst) in (k0 / BLOCK..).zip(out[..kc].chunks_exact_mut(BLOCK)) {
                w.q8_codes(r, b * BLOCK, &mut src);
                for (o, &c) in dst.iter_mut().zip(&src) {
                    *o = i16::from(c as i8);
                }
            }
        }
        QuantFormat::Q4 => {
            for (b, dst) in (k0 / BLOCK..).zip(out[..kc].chunks_exact_mut(BLOCK)) {
                for (o, c) in dst.iter_mut().zip(unpack_q4_block(&w.q4_block(r, b))) {
                    *o = i16::from(c);
                }
            }
        }
    }
}

/// Packs rows `n0..n0+16` (rows from `n_end` on are zero) of inputs
/// `k0..k0+kc`, with their scales and (q4) zero points per block of 32.
fn pack_panel(w: &QuantMatRef<'_>, n0: usize, n_end: usize, k0: usize, kc: usize, p: &mut Packed) {
    let mut row = [0i16; KC];
    let q4 = w.format == QuantFormat::Q4;
    for j in 0..NR {
        let r = n0 + j;
        if r < n_end {
            row_codes(w, r, k0, kc, &mut row[..kc]);
            for b in 0..kc / BLOCK {
                let g = (k0 + b * BLOCK) / w.group;
                p.ws[b * NR + j] = w.scale(r, g);
                p.wz[b * NR + j] = w.zero(r, g) as f32;
            }
        } else {
            row[..kc].fill(0);
            for b in 0..kc / BLOCK {
                p.ws[b * NR + j] = 0.0;
                p.wz[b * NR + j] = 0.0;
            }
        }
        if q4 {
            // Four unsigned codes per 32-bit lane, for `vpmaddubsw`.
            for (i, quad) in row[..kc].chunks_exact(4).enumerate() {
                p.w[i * NR + j] = u32::from_le_bytes([
                    quad[0] as u8,
                    quad[1] as u8,
                    quad[2] as u8,
                    quad[3] as u8,
                ]);
            }
        } else {
            for (i, pair) in row[..kc].chunks_exact(2).enumerate() {
                p.w[i * NR + j] = u32::from(pair[0] as u16) | (u32::from(pair[1] as u16) << 16);
            }
        }
    }
}

/// Packs inputs `k0..k0+kc` of every token (tokens past `n_tok` are zero):
/// q4 as 4 codes per 32-bit value, q8 as int16 pairs; scales and code sums per block.
fn pack_activations(acts: &QuantizedActs, k0: usize, kc: usize, q4: bool, p: &mut Packed) {
    let (k, n_tok) = (acts.k, acts.n_tok);
    let (nb, kb) = (k / BLOCK, kc / BLOCK);
    let per = if q4 { 4 } else { 2 };
    let units = kc / per;
    for mb in 0..n_tok.div_ceil(MR) {
        let xblock = &mut p.x[mb * units * MR..(mb + 1) * units * MR];
        let sblock = &mut p.xs[mb * kb * MR..(mb + 1) * kb * MR];
        let sums = &mut p.xsum[mb * kb * MR..(mb + 1) * kb * MR];
        for i in 0..MR {
            let t = mb * MR + i;
            if t >= n_tok {
                for u in 0..units {
                    xblock[u * MR + i] = 0;
                }
                for b in 0..kb {
                    sblock[b * MR + i] = 0.0;
                    sums[b * MR + i] = 0.0;
                }
                continue;
            }
            let codes = &acts.codes[t * k + k0..t * k + k0 + kc];
            for (u, unit) in codes.chunks_exact(per).enumerate() {
                xblock[u * MR + i] = if q4 {
                    u32::from_le_bytes([unit[0] as u8, unit[1] as u8, unit[2] as u8, unit[3] as u8])
                } else {
                    u32::from(i16::from(unit[0]) as u16)
                        | (u32::from(i16::from(unit[1]) as u16) << 16)
                };
            }
            for (b, block) in codes.chunks_exact(BLOCK).enumerate() {
                sblock[b * MR + i] = acts.scales[t * nb + k0 / BLOCK + b];
                sums[b * MR + i] = block.iter().map(|&c| i32::from(c)).sum::<i32>() as f32;
            }
        }
    }
}

/// Pointers into one thread's packed operands for one micro-kernel call.
struct Tile {
    kc: usize,
    x: *const u32,
    xs: *const f32,
    xsum: *const f32,
    w: *const u32,
    ws: *const f32,
    wz: *const f32,
    c: *mut f32,
    ldc: usize,
    ncols: usize,
    accumulate: bool,
}

/// Adds the `M x 16` float results to the output tile (only `ncols` columns exist).
///
/// # Safety
/// `t.c` has `M` rows of `t.ncols` writable values `t.ldc` apart.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_tile<const M: usize>(t: &Tile, out: &[[__m256; 2]; M]) {
    // SAFETY: within the tile (caller).
    unsafe {
        for (i, out_i) in out.iter().enumerate() {
            let ci = t.c.add(i * t.ldc);
            let mut tmp = [0f32; NR];
            _mm256_storeu_ps(tmp.as_mut_ptr(), out_i[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), out_i[1]);
            for (j, &v) in tmp[..t.ncols].iter().enumerate() {
                let dst = ci.add(j);
                *dst = if t.accumulate { *dst + v } else { v };
            }
        }
    }
}

/// q8: `c[i, j] (+)= Σ_blocks s_w[j]·s_x[i]·Σ_k w[j, k]·x[i, k]` for `M` tokens
/// and 16 rows, with `vpmaddwd` on int16 pairs (exact int32 sums per block).
///
/// # Safety
/// The tile's buffers hold `kc` inputs of the panel and of `MR` tokens.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_q8<const M: usize>(t: &Tile) {
    let mut out = [[_mm256_setzero_ps(); 2]; M];
    // SAFETY: all offsets are within the packed buffers (caller).
    unsafe {
        for b in 0..t.kc / BLOCK {
            let mut acc = [[_mm256_setzero_si256(); 2]; M];
            for p in b * 16..(b + 1) * 16 {
                let w0 = _mm256_loadu_si256(t.w.add(p * NR).cast());
                let w1 = _mm256_loadu_si256(t.w.add(p * NR + 8).cast());
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let xi = _mm256_set1_epi32(*t.x.add(p * MR + i) as i32);
                    acc_i[0] = _mm256_add_epi32(acc_i[0], _mm256_madd_epi16(w0, xi));
                    acc_i[1] = _mm256_add_epi32(acc_i[1], _mm256_madd_epi16(w1, xi));
                }
            }
            let s0 = _mm256_loadu_ps(t.ws.add(b * NR));
            let s1 = _mm256_loadu_ps(t.ws.add(b * NR + 8));
            for (i, (acc_i, out_i)) in acc.iter().zip(out.iter_mut()).enumerate() {
                let sx = _mm256_set1_ps(*t.xs.add(b * MR + i));
                out_i[0] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(acc_i[0]),
                    _mm256_mul_ps(s0, sx),
                    out_i[0],
                );
                out_i[1] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(acc_i[1]),
                    _mm256_mul_ps(s1, sx),
                    out_i[1],
                );
            }
        }
        store_tile::<M>(t, &out);
    }
}

/// q4: the same product from unsigned codes with `vpmaddubsw` (32 products per
/// instruction, twice `vpmaddwd`'s rate). Each 16-bit lane adds 8 steps of two
/// products, at most 8·2·15·127 = 30480 in magnitude, so nothing saturates; the
/// zero point comes off per block as `z · Σx`, exactly, in f32.
///
/// # Safety
/// As [`kernel_q8`].
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_q4<const M: usize>(t: &Tile) {
    let mut out = [[_mm256_setzero_ps(); 2]; M];
    let ones = _mm256_set1_epi16(1);
    // SAFETY: all offsets are within the packed buffers (caller).
    unsafe {
        for b in 0..t.kc / BLOCK {
            let mut acc = [[_mm256_setzero_si256(); 2]; M];
            for p in b * 8..(b + 1) * 8 {
                let w0 = _mm256_loadu_si256(t.w.add(p * NR).cast());
                let w1 = _mm256_loadu_si256(t.w.add(p * NR + 8).cast());
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let xi = _mm256_set1_epi32(*t.x.add(p * MR + i) as i32);
                    acc_i[0] = _mm256_add_epi16(acc_i[0], _mm256_maddubs_epi16(w0, xi));
                    acc_i[1] = _mm256_add_epi16(acc_i[1], _mm256_maddubs_epi16(w1, xi));
                }
            }
            let s0 = _mm256_loadu_ps(t.ws.add(b * NR));
            let s1 = _mm256_loadu_ps(t.ws.add(b * NR + 8));
            let z0 = _mm256_loadu_ps(t.wz.add(b * NR));
            let z1 = _mm256_loadu_ps(t.wz.add(b * NR + 8));
            for (i, (acc_i, out_i)) in acc.iter().zip(out.iter_mut()).enumerate() {
                let sx = _mm256_set1_ps(*t.xs.add(b * MR + i));
                let sum = _mm256_set1_ps(*t.xsum.add(b * MR + i));
                let d0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc_i[0], ones));
                let d1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc_i[1], ones));
                let d0 = _mm256_fnmadd_ps(z0, sum, d0);
                let d1 = _mm256_fnmadd_ps(z1, sum, d1);
                out_i[0] = _mm256_fmadd_ps(d0, _mm256_mul_ps(s0, sx), out_i[0]);
                out_i[1] = _mm256_fmadd_ps(d1, _mm256_mul_ps(s1, sx), out_i[1]);
            }
        }
        store_tile::<M>(t, &out);
    }
}

/// Prefill: output columns `rows` for all tokens, panel by panel.
///
/// # Safety
/// See `product::rows_product`; the CPU supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gemm_rows(
    w: QuantMatRef<'_>,
    acts: &QuantizedActs,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    let (k, n_tok, ldc) = (w.cols, acts.n_tok, w.rows);
    let q4 = w.format == QuantFormat::Q4;
    let m_blocks = n_tok.div_ceil(MR);
    let units = if q4 { 4 } else { 2 };
    PACKED.with_borrow_mut(|p| {
        p.w.resize(KC / 2 * NR, 0);
        p.ws.resize(KC / BLOCK * NR, 0.0);
        p.wz.resize(KC / BLOCK * NR, 0.0);
        p.x.resize(m_blocks * KC / 2 * MR, 0);
        p.xs.resize(m_blocks * KC / BLOCK * MR, 0.0);
        p.xsum.resize(m_blocks * KC / BLOCK * MR, 0.0);
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            pack_activations(acts, k0, kc, q4, p);
            let mut n0 = rows.start;
            while n0 < rows.end {
                let ncols = NR.min(rows.end - n0);
                pack_panel(&w, n0, rows.end, k0, kc, p);
                for mb in 0..m_blocks {
                    let m0 = mb * MR;
                    let kb = kc / BLOCK;
                    // SAFETY: `MR.min(n_tok - m0)` tokens from `m0` lie within
                    // `y`; columns `n0..n0+ncols` within `rows` (caller); the
                    // packed buffers hold what the kernels read.
                    unsafe {
                        let tile = Tile {
                            kc,
                            x: p.x.as_ptr().add(mb * (kc / units) * MR),
                            xs: p.xs.as_ptr().add(mb * kb * MR),
                            xsum: p.xsum.as_ptr().add(mb * kb * MR),
                            w: p.w.as_ptr(),
                            ws: p.ws.as_ptr(),
                            wz: p.wz.as_ptr(),
                            c: y.add(m0 * ldc + n0),
                            ldc,
                            ncols,
                            accumulate: k0 > 0,
                        };
                        macro_rules! by_rows {
                            ($kernel:ident) => {
                                match MR.min(n_tok - m0) {
                                    6 => $kernel::<6>(&tile),
                                    5 => $kernel::<5>(&tile),
                                    4 => $kernel::<4>(&tile),
                                    3 => $kernel::<3>(&tile),
                                    2 => $kernel::<2>(&tile),
                                    _ => $kernel::<1>(&tile),
                                }
                            };
                        }
                        if q4 {
                            by_rows!(kernel_q4)
                        } else {
                            by_rows!(kernel_q8)
                        }
                    }
                }
                n0 += NR;
            }
            k0 += kc;
        }
    });
}

/// [`super::q4_trial`] eight lanes at a time, with the same operations in the
/// same order (no fused multiply-adds), so the results are identical.
///
/// # Safety
/// The CPU supports AVX2; `values.len()` is a multiple of 8.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q4_trial(values: &[f32], s: f32, z: i32) -> (f32, f32, f32) {
    let inv = _mm256_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 });
    let (zf, sv) = (_mm256_set1_ps(z as f32), _mm256_set1_ps(s));
    let magic = _mm256_set1_ps(12_582_912.0);
    let (lo, hi) = (_mm256_setzero_ps(), _mm256_set1_ps(15.0));
    let (mut err, mut num, mut den) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    for chunk in values.chunks_exact(8) {
        // SAFETY: 8 values.
        let v = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
        let r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v, inv), magic), magic);
        let d = _mm256_sub_ps(
            _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, zf), lo), hi),
            zf,
        );
        let e = _mm256_sub_ps(v, _mm256_mul_ps(d, sv));
        err = _mm256_add_ps(err, _mm256_mul_ps(e, e));
        num = _mm256_add_ps(num, _mm256_mul_ps(v, d));
        den = _mm256_add_ps(den, _mm256_mul_ps(d, d));
    }
    let in_order = |x: __m256| {
        let mut lanes = [0f32; 8];
        // SAFETY: 8 writable values.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), x) };
        lanes.iter().sum::<f32>()
    };
    (in_order(err), in_order(num), in_order(den))
}
