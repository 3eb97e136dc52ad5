//! AVX-512 VNNI kernels for q4 and q8 weights with int8 activations.
//!
//! Prefill (GEMM): a panel of 32 rows is repacked as unsigned bytes, four
//! consecutive inputs per 32-bit lane, so that one `vpdpbusd` multiplies 16
//! rows by 4 inputs of a broadcast token and adds the 64 exact products into
//! int32 lanes (four times what AVX2's `vpmaddubsw` + `vpmaddwd` retire per
//! instruction). q4 codes are already unsigned; q8 codes are stored shifted
//! by 128, and the shift comes off exactly in the integer domain, as an
//! accumulator that starts at `-128 · Σ x` of the block. Per block of 32 the
//! int32 sums are scaled by `s_w · s_x` in f32 and q4's zero point comes off
//! as `s_w · z · (s_x · Σ x)`, the same terms the scalar reference adds.
//!
//! Decode keeps the AVX2 row kernels (see [`super::avx2`]).

use super::acts::QuantizedActs;
use super::{QuantFormat, QuantMatRef, unpack_q4_block};
use crate::hadamard::BLOCK;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Inputs per packed panel (a multiple of every group size).
const KC: usize = 1024;
/// Outputs per packed panel: two 16-lane vectors.
const NR: usize = 32;
/// Tokens per micro-kernel call: 6 x 2 int32 and 6 x 2 f32 accumulators
/// leave 8 of the 32 vector registers for weights, scales and broadcasts.
const MR: usize = 6;
/// Steps of 4 inputs per block of 32.
const STEPS: usize = BLOCK / 4;

/// One thread's packed GEMM operands, reused across calls.
#[derive(Default)]
struct Packed {
    /// Weight panel: 4 unsigned codes per lane, `[k/4][NR]`.
    w: Vec<u32>,
    /// Weight scales `[block][NR]`.
    ws: Vec<f32>,
    /// `s_w · z` for q4 `[block][NR]`.
    wz: Vec<f32>,
    /// Activations: 4 signed codes per lane, `[token block][k/4][MR]`.
    x: Vec<u32>,
    /// Activation scales `[token block][block][MR]`.
    xs: Vec<f32>,
    /// `s_x · Σ codes` per block (q4) `[token block][block][MR]`.
    xsum: Vec<f32>,
    /// `-128 · Σ codes` per block (q8) `[token block][block][MR]`.
    xoff: Vec<i32>,
}

thread_local! {
    static PACKED: RefCell<Packed> = RefCell::new(Packed::default());
}

/// Packs rows `n0..n0+NR` (rows from `n_end` on are zero) of inputs
/// `k0..k0+kc` as unsigned bytes, with scales and (q4) `s_w · z` per block.
fn pack_panel(w: &QuantMatRef<'_>, n0: usize, n_end: usize, k0: usize, kc: usize, p: &mut Packed) {
    let q4 = w.format == QuantFormat::Q4;
    let mut row = [0u8; KC];
    for j in 0..NR {
        let r = n0 + j;
        if r >= n_end {
            for i in 0..kc / 4 {
                p.w[i * NR + j] = 0;
            }
            for b in 0..kc / BLOCK {
                p.ws[b * NR + j] = 0.0;
                p.wz[b * NR + j] = 0.0;
            }
            continue;
        }
        if q4 {
            let src = &w.codes[r * w.cols / 2 + k0 / 2..r * w.cols / 2 + (k0 + kc) / 2];
            for (bytes, dst) in src.chunks_exact(16).zip(row.chunks_exact_mut(BLOCK)) {
                dst.copy_from_slice(&unpack_q4_block(bytes));
            }
        } else {
            let src = &w.codes[r * w.cols + k0..r * w.cols + k0 + kc];
            for (o, &c) in row.iter_mut().zip(src) {
                *o = c ^ 0x80;
            }
        }
        for (i, quad) in row[..kc].chunks_exact(4).enumerate() {
            p.w[i * NR + j] = u32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]]);
        }
        for b in 0..kc / BLOCK {
            let g = (k0 + b * BLOCK) / w.group;
            let s = w.scale(r, g);
            p.ws[b * NR + j] = s;
            p.wz[b * NR + j] = s * w.zero(r, g) as f32;
        }
    }
}

/// Packs inputs `k0..k0+kc` of every token (tokens past `n_tok` are zero):
/// 4 codes per lane, scales and the per-block sums each format needs.
fn pack_activations(acts: &QuantizedActs, k0: usize, kc: usize, p: &mut Packed) {
    let (k, n_tok) = (acts.k, acts.n_tok);
    let (nb, kb, units) = (k / BLOCK, kc / BLOCK, kc / 4);
    for mb in 0..n_tok.div_ceil(MR) {
        let xblock = &mut p.x[mb * units * MR..(mb + 1) * units * MR];
        let scales = &mut p.xs[mb * kb * MR..(mb + 1) * kb * MR];
        let sums = &mut p.xsum[mb * kb * MR..(mb + 1) * kb * MR];
        let offsets = &mut p.xoff[mb * kb * MR..(mb + 1) * kb * MR];
        for i in 0..MR {
            let t = mb * MR + i;
            if t >= n_tok {
                for u in 0..units {
                    xblock[u * MR + i] = 0;
                }
                for b in 0..kb {
                    scales[b * MR + i] = 0.0;
                    sums[b * MR + i] = 0.0;
                    offsets[b * MR + i] = 0;
                }
                continue;
            }
            let codes = &acts.codes[t * k + k0..t * k + k0 + kc];
            for (u, quad) in codes.chunks_exact(4).enumerate() {
                xblock[u * MR + i] = u32::from_le_bytes([
                    quad[0] as u8,
                    quad[1] as u8,
                    quad[2] as u8,
                    quad[3] as u8,
                ]);
            }
            for (b, block) in codes.chunks_exact(BLOCK).enumerate() {
                let total: i32 = block.iter().map(|&c| i32::from(c)).sum();
                scales[b * MR + i] = acts.scales[t * nb + k0 / BLOCK + b];
                sums[b * MR + i] = acts.sums[t * nb + k0 / BLOCK + b];
                offsets[b * MR + i] = -128 * total;
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
    xoff: *const i32,
    w: *const u32,
    ws: *const f32,
    wz: *const f32,
    c: *mut f32,
    ldc: usize,
    ncols: usize,
    accumulate: bool,
}

/// `c[i, j] (+)= Σ_blocks s_w[j]·s_x[i]·Σ_k (u[j, k] - z[j])·x[i, k]` for
/// `M` tokens and the panel's 32 rows.
///
/// # Safety
/// The tile's buffers hold `kc` inputs of the panel and of `MR` tokens; `c`
/// has `M` rows of `ncols` writable values `ldc` apart; the CPU supports
/// AVX-512 F/BW/VL/VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn kernel<const M: usize, const Q4: bool>(t: &Tile) {
    let mut out = [[_mm512_setzero_ps(); 2]; M];
    // SAFETY: all offsets are within the packed buffers and the tile (caller).
    unsafe {
        for b in 0..t.kc / BLOCK {
            let mut acc = [[_mm512_setzero_si512(); 2]; M];
            if !Q4 {
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let o = _mm512_set1_epi32(*t.xoff.add(b * MR + i));
                    *acc_i = [o, o];
                }
            }
            for p in b * STEPS..(b + 1) * STEPS {
                let w0 = _mm512_loadu_si512(t.w.add(p * NR).cast());
                let w1 = _mm512_loadu_si512(t.w.add(p * NR + 16).cast());
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let xi = _mm512_set1_epi32(*t.x.add(p * MR + i) as i32);
                    acc_i[0] = _mm512_dpbusd_epi32(acc_i[0], w0, xi);
                    acc_i[1] = _mm512_dpbusd_epi32(acc_i[1], w1, xi);
                }
            }
            let s0 = _mm512_loadu_ps(t.ws.add(b * NR));
            let s1 = _mm512_loadu_ps(t.ws.add(b * NR + 16));
            for (i, (acc_i, out_i)) in acc.iter().zip(out.iter_mut()).enumerate() {
                let sx = _mm512_set1_ps(*t.xs.add(b * MR + i));
                out_i[0] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(acc_i[0]),
                    _mm512_mul_ps(s0, sx),
                    out_i[0],
                );
                out_i[1] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(acc_i[1]),
                    _mm512_mul_ps(s1, sx),
                    out_i[1],
                );
            }
            if Q4 {
                let z0 = _mm512_loadu_ps(t.wz.add(b * NR));
                let z1 = _mm512_loadu_ps(t.wz.add(b * NR + 16));
                for (i, out_i) in out.iter_mut().enumerate() {
                    let sum = _mm512_set1_ps(*t.xsum.add(b * MR + i));
                    out_i[0] = _mm512_fnmadd_ps(z0, sum, out_i[0]);
                    out_i[1] = _mm512_fnmadd_ps(z1, sum, out_i[1]);
                }
            }
        }
        let lo = t.ncols.min(16);
        let masks = [
            ((1u32 << lo) - 1) as u16,
            ((1u32 << (t.ncols - lo)) - 1) as u16,
        ];
        for (i, out_i) in out.iter().enumerate() {
            let ci = t.c.add(i * t.ldc);
            for (h, (&mask, &v)) in masks.iter().zip(out_i).enumerate() {
                let dst = ci.add(16 * h);
                let v = if t.accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), v)
                } else {
                    v
                };
                _mm512_mask_storeu_ps(dst, mask, v);
            }
        }
    }
}

/// Prefill: output columns `rows` for all tokens, panel by panel.
///
/// # Safety
/// See `product::rows_product`; the CPU supports AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemm_rows(
    w: QuantMatRef<'_>,
    acts: &QuantizedActs,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    let (k, n_tok, ldc) = (w.cols, acts.n_tok, w.rows);
    let q4 = w.format == QuantFormat::Q4;
    let m_blocks = n_tok.div_ceil(MR);
    PACKED.with_borrow_mut(|p| {
        p.w.resize(KC / 4 * NR, 0);
        p.ws.resize(KC / BLOCK * NR, 0.0);
        p.wz.resize(KC / BLOCK * NR, 0.0);
        p.x.resize(m_blocks * KC / 4 * MR, 0);
        p.xs.resize(m_blocks * KC / BLOCK * MR, 0.0);
        p.xsum.resize(m_blocks * KC / BLOCK * MR, 0.0);
        p.xoff.resize(m_blocks * KC / BLOCK * MR, 0);
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let kb = kc / BLOCK;
            pack_activations(acts, k0, kc, p);
            let mut n0 = rows.start;
            while n0 < rows.end {
                let ncols = NR.min(rows.end - n0);
                pack_panel(&w, n0, rows.end, k0, kc, p);
                for mb in 0..m_blocks {
                    let m0 = mb * MR;
                    // SAFETY: `MR.min(n_tok - m0)` tokens from `m0` lie within
                    // `y`; columns `n0..n0+ncols` within `rows` (caller); the
                    // packed buffers hold what the kernel reads.
                    unsafe {
                        let tile = Tile {
                            kc,
                            x: p.x.as_ptr().add(mb * (kc / 4) * MR),
                            xs: p.xs.as_ptr().add(mb * kb * MR),
                            xsum: p.xsum.as_ptr().add(mb * kb * MR),
                            xoff: p.xoff.as_ptr().add(mb * kb * MR),
                            w: p.w.as_ptr(),
                            ws: p.ws.as_ptr(),
                            wz: p.wz.as_ptr(),
                            c: y.add(m0 * ldc + n0),
                            ldc,
                            ncols,
                            accumulate: k0 > 0,
                        };
                        macro_rules! by_tokens {
                            ($q4:literal) => {
                                match MR.min(n_tok - m0) {
                                    6 => kernel::<6, $q4>(&tile),
                                    5 => kernel::<5, $q4>(&tile),
                                    4 => kernel::<4, $q4>(&tile),
                                    3 => kernel::<3, $q4>(&tile),
                                    2 => kernel::<2, $q4>(&tile),
                                    _ => kernel::<1, $q4>(&tile),
                                }
                            };
                        }
                        if q4 {
                            by_tokens!(true)
                        } else {
                            by_tokens!(false)
                        }
                    }
                }
                n0 += NR;
            }
            k0 += kc;
        }
    });
}
