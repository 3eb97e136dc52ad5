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
use super::{QuantFormat, QuantMatRef, group_nibble};
use crate::hadamard::BLOCK;
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
const PREFETCH_BYTES: usize = 512;

thread_local! {
    /// Packed weight panel: `[k/2][NR][2]` int16.
    static PACK_W: RefCell<Vec<i16>> = const { RefCell::new(Vec::new()) };
    /// Packed panel scales: `[block][NR]`.
    static PACK_S: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Packed activations: `[token block][k/2][MR]` int16 pairs.
    static PACK_X: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Packed activation scales: `[token block][block][MR]`.
    static PACK_SX: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

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

/// One row dotted with one token's int8 activations. Blocks go in chunks of
/// 8 so that their scales (and q4 zero-point corrections) are combined in
/// vectors rather than one scalar at a time; leftover blocks one by one.
///
/// # Safety
/// `r` is a row of `w`; `xq` holds `w.cols` codes, `sx` and `sums`
/// `w.cols / 32` values.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_row(w: &QuantMatRef<'_>, r: usize, xq: &[i8], sx: &[f32], sums: &[f32]) -> f32 {
    let nb = w.cols / BLOCK;
    let groups = w.groups();
    let shift = (w.group / BLOCK).trailing_zeros();
    let q4 = w.format == QuantFormat::Q4;
    let row_bytes = w.format.code_row_bytes(w.cols);
    let block_bytes = row_bytes / nb;
    // SAFETY: all offsets stay within row `r` of each array and within the
    // activation slices (caller); prefetch addresses are not dereferenced.
    unsafe {
        let codes = w.codes.as_ptr().add(r * row_bytes);
        let scales = w.scales.as_ptr().add(r * groups);
        let zeros = w.zeros.as_ptr().add(r * w.format.zero_row_bytes(groups));
        let (xq, sx, sums) = (xq.as_ptr(), sx.as_ptr(), sums.as_ptr());
        let dot = |b: usize| -> __m256 {
            let x = _mm256_loadu_si256(xq.add(b * BLOCK).cast());
            let d = if q4 {
                block_dot(load_q4(codes.add(b * 16)), x)
            } else {
                // |w| x (x with w's sign) = w x, with the unsigned operand first.
                let wv = _mm256_loadu_si256(codes.add(b * BLOCK).cast());
                block_dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(x, wv))
            };
            _mm256_cvtepi32_ps(d)
        };
        let lanes = group_lanes(shift);
        let (mut acc0, mut acc1, mut corr) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
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
            let both = _mm256_mul_ps(s, _mm256_loadu_ps(sx.add(b0)));
            if q4 {
                let z = chunk_zeros(zeros, g0, shift, lanes);
                corr = _mm256_fmadd_ps(_mm256_mul_ps(s, z), _mm256_loadu_ps(sums.add(b0)), corr);
            }
            acc0 = _mm256_fmadd_ps(dot(b0), lane(both, 0), acc0);
            acc1 = _mm256_fmadd_ps(dot(b0 + 1), lane(both, 1), acc1);
            acc0 = _mm256_fmadd_ps(dot(b0 + 2), lane(both, 2), acc0);
            acc1 = _mm256_fmadd_ps(dot(b0 + 3), lane(both, 3), acc1);
            acc0 = _mm256_fmadd_ps(dot(b0 + 4), lane(both, 4), acc0);
            acc1 = _mm256_fmadd_ps(dot(b0 + 5), lane(both, 5), acc1);
            acc0 = _mm256_fmadd_ps(dot(b0 + 6), lane(both, 6), acc0);
            acc1 = _mm256_fmadd_ps(dot(b0 + 7), lane(both, 7), acc1);
        }
        let mut tail_corr = 0f32;
        for b in chunks * 8..nb {
            let g = b >> shift;
            let s = bf16_to_f32(*scales.add(g));
            acc0 = _mm256_fmadd_ps(dot(b), _mm256_set1_ps(s * *sx.add(b)), acc0);
            if q4 {
                let z = group_nibble(*zeros.add(g / 2), g);
                tail_corr += s * f32::from(z) * *sums.add(b);
            }
        }
        hsum(_mm256_add_ps(acc0, acc1)) - hsum(corr) - tail_corr
    }
}

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
    let k = w.cols;
    let nb = k / BLOCK;
    for r in rows {
        for t in 0..acts.n_tok {
            let xq = &acts.codes[t * k..(t + 1) * k];
            let sx = &acts.scales[t * nb..(t + 1) * nb];
            // SAFETY: `r` is a row of `w`; the slices cover one token; `y`
            // covers `n_tok * w.rows` values (caller).
            unsafe {
                *y.add(t * w.rows + r) = dot_row(&w, r, xq, sx, &acts.sums[t * nb..(t + 1) * nb]);
            }
        }
    }
}

/// Widens inputs `k0..k0+kc` of row `r` to `q - z` int16 values.
fn widen_row(w: &QuantMatRef<'_>, r: usize, k0: usize, kc: usize, out: &mut [i16]) {
    match w.format {
        QuantFormat::Q8 => {
            let src = &w.codes[r * w.cols + k0..r * w.cols + k0 + kc];
            for (o, &c) in out.iter_mut().zip(src) {
                *o = i16::from(c as i8);
            }
        }
        QuantFormat::Q4 => {
            let zrow = w.format.zero_row_bytes(w.groups());
            let src = &w.codes[r * w.cols / 2 + k0 / 2..r * w.cols / 2 + (k0 + kc) / 2];
            for (b, (bytes, dst)) in src
                .chunks_exact(16)
                .zip(out.chunks_exact_mut(BLOCK))
                .enumerate()
            {
                let g = (k0 + b * BLOCK) / w.group;
                let zb = w.zeros[r * zrow + g / 2];
                let z = i16::from(group_nibble(zb, g));
                let (lo, hi) = dst.split_at_mut(16);
                for ((l, h), &byte) in lo.iter_mut().zip(hi.iter_mut()).zip(bytes) {
                    *l = i16::from(byte & 15) - z;
                    *h = i16::from(byte >> 4) - z;
                }
            }
        }
    }
}

/// Packs rows `n0..n0+16` (rows from `n_end` on are zero) of inputs
/// `k0..k0+kc` as `[k/2][row][2]` int16 and their scales as `[block][row]`.
fn pack_panel(
    w: &QuantMatRef<'_>,
    n0: usize,
    n_end: usize,
    k0: usize,
    kc: usize,
    pack: &mut [i16],
    scales: &mut [f32],
) {
    let mut row = [0i16; KC];
    for j in 0..NR {
        let r = n0 + j;
        if r < n_end {
            widen_row(w, r, k0, kc, &mut row[..kc]);
            for b in 0..kc / BLOCK {
                scales[b * NR + j] = w.scale(r, (k0 + b * BLOCK) / w.group);
            }
        } else {
            row[..kc].fill(0);
            for b in 0..kc / BLOCK {
                scales[b * NR + j] = 0.0;
            }
        }
        for (p, pair) in row[..kc].chunks_exact(2).enumerate() {
            pack[(p * NR + j) * 2] = pair[0];
            pack[(p * NR + j) * 2 + 1] = pair[1];
        }
    }
}

/// Packs inputs `k0..k0+kc` of every token as int16 pairs `[block of MR][k/2][i]`
/// and their scales as `[block of MR][block][i]`; tokens past `n_tok` are zero.
fn pack_activations(acts: &QuantizedActs, k0: usize, kc: usize, xp: &mut [u32], sp: &mut [f32]) {
    let (k, n_tok) = (acts.k, acts.n_tok);
    let (nb, kb) = (k / BLOCK, kc / BLOCK);
    for mb in 0..n_tok.div_ceil(MR) {
        let xblock = &mut xp[mb * (kc / 2) * MR..(mb + 1) * (kc / 2) * MR];
        let sblock = &mut sp[mb * kb * MR..(mb + 1) * kb * MR];
        for i in 0..MR {
            let t = mb * MR + i;
            if t < n_tok {
                let codes = &acts.codes[t * k + k0..t * k + k0 + kc];
                for (p, pair) in codes.chunks_exact(2).enumerate() {
                    let lo = u32::from(i16::from(pair[0]) as u16);
                    let hi = u32::from(i16::from(pair[1]) as u16);
                    xblock[p * MR + i] = lo | (hi << 16);
                }
                for b in 0..kb {
                    sblock[b * MR + i] = acts.scales[t * nb + k0 / BLOCK + b];
                }
            } else {
                for p in 0..kc / 2 {
                    xblock[p * MR + i] = 0;
                }
                for b in 0..kb {
                    sblock[b * MR + i] = 0.0;
                }
            }
        }
    }
}

/// `c[i, j] (+)= Σ_blocks s_w[j]·s_x[i]·Σ_k w[j, k]·x[i, k]` for `M` tokens
/// and the 16 rows of a packed panel; only `ncols` columns are stored.
///
/// # Safety
/// `xp` holds `kc/2 * MR` pairs, `sxp` `kc/32 * MR` scales, `wp` `kc * 16`
/// values, `sw` `kc/32 * 16` scales; `c` has `M` rows of `ncols` writable
/// values `ldc` apart.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_kernel<const M: usize>(
    kc: usize,
    xp: *const u32,
    sxp: *const f32,
    wp: *const i16,
    sw: *const f32,
    c: *mut f32,
    ldc: usize,
    ncols: usize,
    accumulate: bool,
) {
    let mut out = [[_mm256_setzero_ps(); 2]; M];
    // SAFETY: all offsets are within the extents stated above.
    unsafe {
        for b in 0..kc / BLOCK {
            let mut acc = [[_mm256_setzero_si256(); 2]; M];
            for p in b * 16..(b + 1) * 16 {
                let w0 = _mm256_loadu_si256(wp.add(p * 2 * NR).cast());
                let w1 = _mm256_loadu_si256(wp.add(p * 2 * NR + NR).cast());
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let xi = _mm256_set1_epi32(*xp.add(p * MR + i) as i32);
                    acc_i[0] = _mm256_add_epi32(acc_i[0], _mm256_madd_epi16(w0, xi));
                    acc_i[1] = _mm256_add_epi32(acc_i[1], _mm256_madd_epi16(w1, xi));
                }
            }
            let s0 = _mm256_loadu_ps(sw.add(b * NR));
            let s1 = _mm256_loadu_ps(sw.add(b * NR + 8));
            for (i, (acc_i, out_i)) in acc.iter().zip(out.iter_mut()).enumerate() {
                let sx = _mm256_set1_ps(*sxp.add(b * MR + i));
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
        for (i, out_i) in out.iter().enumerate() {
            let ci = c.add(i * ldc);
            let mut tmp = [0f32; NR];
            _mm256_storeu_ps(tmp.as_mut_ptr(), out_i[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), out_i[1]);
            for (j, &v) in tmp[..ncols].iter().enumerate() {
                let dst = ci.add(j);
                *dst = if accumulate { *dst + v } else { v };
            }
        }
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
    let m_blocks = n_tok.div_ceil(MR);
    PACK_W.with_borrow_mut(|pack_w| {
        PACK_S.with_borrow_mut(|pack_s| {
            PACK_X.with_borrow_mut(|pack_x| {
                PACK_SX.with_borrow_mut(|pack_sx| {
                    pack_w.resize(KC * NR, 0);
                    pack_s.resize(KC / BLOCK * NR, 0.0);
                    pack_x.resize(m_blocks * KC / 2 * MR, 0);
                    pack_sx.resize(m_blocks * KC / BLOCK * MR, 0.0);
                    let mut k0 = 0;
                    while k0 < k {
                        let kc = KC.min(k - k0);
                        pack_activations(acts, k0, kc, pack_x, pack_sx);
                        let mut n0 = rows.start;
                        while n0 < rows.end {
                            let ncols = NR.min(rows.end - n0);
                            pack_panel(&w, n0, rows.end, k0, kc, pack_w, pack_s);
                            for mb in 0..m_blocks {
                                let m0 = mb * MR;
                                let m = MR.min(n_tok - m0);
                                // SAFETY: `m` tokens from `m0` lie within `y`;
                                // columns `n0..n0+ncols` within `rows` (caller);
                                // the packed buffers hold what the kernel reads.
                                unsafe {
                                    let xp = pack_x.as_ptr().add(mb * (kc / 2) * MR);
                                    let sxp = pack_sx.as_ptr().add(mb * (kc / BLOCK) * MR);
                                    let (wp, sw) = (pack_w.as_ptr(), pack_s.as_ptr());
                                    let c = y.add(m0 * ldc + n0);
                                    let acc = k0 > 0;
                                    match m {
                                        6 => micro_kernel::<6>(
                                            kc, xp, sxp, wp, sw, c, ldc, ncols, acc,
                                        ),
                                        5 => micro_kernel::<5>(
                                            kc, xp, sxp, wp, sw, c, ldc, ncols, acc,
                                        ),
                                        4 => micro_kernel::<4>(
                                            kc, xp, sxp, wp, sw, c, ldc, ncols, acc,
                                        ),
                                        3 => micro_kernel::<3>(
                                            kc, xp, sxp, wp, sw, c, ldc, ncols, acc,
                                        ),
                                        2 => micro_kernel::<2>(
                                            kc, xp, sxp, wp, sw, c, ldc, ncols, acc,
                                        ),
                                        _ => micro_kernel::<1>(
                                            kc, xp, sxp, wp, sw, c, ldc, ncols, acc,
                                        ),
                                    }
                                }
                            }
                            n0 += NR;
                        }
                        k0 += kc;
                    }
                })
            })
        })
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
