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
//! Decode and short passes (GEMV, up to [`GEMV_MAX_TOKENS`] tokens) over q4
//! in strips ([`gemv_strips`]: one 64-byte load feeds 16 rows) or over the
//! stored rows, 4 (q4) or 2 (q8) blocks per 64-byte load:
//! - q4: the low and high nibbles meet activations laid out to match (the
//!   first and second halves of each block's inputs), two `vpdpbusd` per
//!   token; the zero points come off per row as `Σ_g s_w·z·(s_x·Σ x)_g`.
//! - q8: codes shifted to unsigned by 128, one `vpdpbusd` per token from an
//!   accumulator that starts at `-128 · Σ x`.
//! - the int32 lanes are scaled by `s_w · s_x` per block, with the bf16
//!   scales spread over the lanes by one `vpshufb`; up to 4 rows share each
//!   load of the activations, and their horizontal sums are folded together.

use super::acts::QuantizedActs;
use super::{QuantFormat, QuantLayout, QuantMatRef, STRIP, unpack_q4_block};
use crate::hadamard::BLOCK;
use crate::matmul::avx512::hsums;
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
    /// The [`QuantizedActs::id`] the activation fields were packed from,
    /// every `KC` block of them: each thread packs a product's activations
    /// once, not once per chunk of rows it takes.
    acts_id: Option<u64>,
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
            for (b, dst) in (k0 / BLOCK..).zip(row[..kc].chunks_exact_mut(BLOCK)) {
                dst.copy_from_slice(&unpack_q4_block(&w.q4_block(r, b)));
            }
        } else {
            w.q8_codes(r, k0, &mut row[..kc]);
            row[..kc].iter_mut().for_each(|c| *c ^= 0x80);
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
fn pack_activations(acts: &QuantizedActs, k0: usize, kc: usize, out: PackedActs<'_>) {
    let (k, n_tok) = (acts.k, acts.n_tok);
    let (nb, kb, units) = (k / BLOCK, kc / BLOCK, kc / 4);
    for mb in 0..n_tok.div_ceil(MR) {
        let xblock = &mut out.x[mb * units * MR..(mb + 1) * units * MR];
        let scales = &mut out.xs[mb * kb * MR..(mb + 1) * kb * MR];
        let sums = &mut out.xsum[mb * kb * MR..(mb + 1) * kb * MR];
        let offsets = &mut out.xoff[mb * kb * MR..(mb + 1) * kb * MR];
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
            for b in 0..kb {
                let at = t * nb + k0 / BLOCK + b;
                scales[b * MR + i] = acts.scales[at];
                sums[b * MR + i] = acts.sums[at];
                offsets[b * MR + i] = -128 * acts.totals[at];
            }
        }
    }
}

/// One `KC` block's region of the packed activations.
struct PackedActs<'a> {
    x: &'a mut [u32],
    xs: &'a mut [f32],
    xsum: &'a mut [f32],
    xoff: &'a mut [i32],
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
    // Each `KC` block of packed activations takes a region of this many.
    let (x_stride, s_stride) = (m_blocks * KC / 4 * MR, m_blocks * KC / BLOCK * MR);
    PACKED.with_borrow_mut(|p| {
        p.w.resize(KC / 4 * NR, 0);
        p.ws.resize(KC / BLOCK * NR, 0.0);
        p.wz.resize(KC / BLOCK * NR, 0.0);
        if p.acts_id != Some(acts.id) {
            let regions = k.div_ceil(KC);
            p.x.resize(regions * x_stride, 0);
            p.xs.resize(regions * s_stride, 0.0);
            p.xsum.resize(regions * s_stride, 0.0);
            p.xoff.resize(regions * s_stride, 0);
            for (i, k0) in (0..k).step_by(KC).enumerate() {
                let (xr, sr) = (
                    i * x_stride..(i + 1) * x_stride,
                    i * s_stride..(i + 1) * s_stride,
                );
                let out = PackedActs {
                    x: &mut p.x[xr],
                    xs: &mut p.xs[sr.clone()],
                    xsum: &mut p.xsum[sr.clone()],
                    xoff: &mut p.xoff[sr],
                };
                pack_activations(acts, k0, KC.min(k - k0), out);
            }
            p.acts_id = Some(acts.id);
        }
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let kb = kc / BLOCK;
            let (xa, sa) = (k0 / KC * x_stride, k0 / KC * s_stride);
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
                            x: p.x.as_ptr().add(xa + mb * (kc / 4) * MR),
                            xs: p.xs.as_ptr().add(sa + mb * kb * MR),
                            xsum: p.xsum.as_ptr().add(sa + mb * kb * MR),
                            xoff: p.xoff.as_ptr().add(sa + mb * kb * MR),
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

/// Blocks of 32 inputs per decode chunk: one 64-byte load of codes.
const fn blocks_per_chunk(q4: bool) -> usize {
    if q4 { 4 } else { 2 }
}

/// Most tokens one pass over a row serves (one f32 accumulator each).
const GEMV_TOKENS: usize = 8;

/// Up to this many tokens the row kernels run rather than the GEMM: passes
/// of a few tokens over each row (which stays in L1 between them) cost less
/// than the GEMM's repacking of every weight panel per call. Measured on the
/// Qwen3-0.6B shape, q4, 2 threads: 16 tokens 148 vs 99 tok/s, 32 tokens 193
/// vs 146, 64 tokens 173 vs 195.
pub const GEMV_MAX_TOKENS: usize = 32;

/// One thread's decode activations, laid out as the weight lanes read them.
#[derive(Default)]
struct DecodeActs {
    /// [`QuantizedActs::id`] of the activations these were prepared from.
    id: u64,
    /// Whether they were prepared for q4 weights.
    q4: bool,
    /// The weights' group size they were prepared for.
    group: usize,
    /// Inputs per token after padding to whole chunks (q4).
    stride: usize,
    /// q4 codes per token, chunk by chunk: the low halves (inputs 0..16) of
    /// the chunk's 4 blocks, then their high halves, matching the low and
    /// high nibbles of the weights. q8 reads `QuantizedActs::codes` as they are.
    x: Vec<i8>,
    /// `s_x` of the block each of a chunk's 16 int32 lanes covers.
    sx: Vec<f32>,
    /// q8: `-128 · Σ x` of block `j` in lane `8j` of its chunk, 0 elsewhere
    /// (the codes are read shifted by 128; this takes the shift off).
    off: Vec<i32>,
    /// q4: `s_x · Σ x` per group of the weights.
    sums: Vec<f32>,
}

thread_local! {
    static DECODE: RefCell<DecodeActs> = RefCell::new(DecodeActs::default());
}

impl DecodeActs {
    /// Lays out every token of `acts` for weights of `format` in groups of `group`.
    fn prepare(&mut self, acts: &QuantizedActs, q4: bool, group: usize) {
        let (k, nb) = (acts.k, acts.k / BLOCK);
        let bpc = blocks_per_chunk(q4);
        let chunks = nb.div_ceil(bpc);
        let stride = chunks * bpc * BLOCK;
        let groups = k / group;
        let per_group = group / BLOCK;
        (self.id, self.q4, self.group) = (acts.id, q4, group);
        self.stride = stride;
        self.x.clear();
        if q4 {
            self.x.resize(acts.n_tok * stride, 0);
        }
        self.sx.clear();
        self.sx.resize(acts.n_tok * chunks * 16, 0.0);
        self.off.clear();
        self.sums.clear();
        if q4 {
            self.sums.resize(acts.n_tok * groups, 0.0);
        } else {
            self.off.resize(acts.n_tok * chunks * 16, 0);
        }
        let lanes_per_block = 16 / bpc;
        for t in 0..acts.n_tok {
            let codes = &acts.codes[t * k..(t + 1) * k];
            for b in 0..nb {
                if q4 {
                    let src = &codes[b * BLOCK..(b + 1) * BLOCK];
                    let at = t * stride + (b / 4) * 128 + (b % 4) * 16;
                    self.x[at..at + 16].copy_from_slice(&src[..16]);
                    self.x[at + 64..at + 80].copy_from_slice(&src[16..]);
                }
                let lane0 = t * chunks * 16 + (b / bpc) * 16 + (b % bpc) * lanes_per_block;
                self.sx[lane0..lane0 + lanes_per_block].fill(acts.scales[t * nb + b]);
                if q4 {
                    self.sums[t * groups + b / per_group] += acts.sums[t * nb + b];
                } else {
                    self.off[lane0] = -128 * acts.totals[t * nb + b];
                }
            }
        }
    }
}

/// `vpshufb` control that places, in each 32-bit lane of a chunk, the bf16
/// scale of the block that lane covers as the high half of an f32 (low half
/// zero), reading scales broadcast to every 128-bit lane from the chunk's
/// first group on.
const fn scale_shuffle(q4: bool, shift: u32) -> [i8; 64] {
    let bpc = blocks_per_chunk(q4);
    let mut out = [0i8; 64];
    let mut p = 0;
    while p < 64 {
        let block = (p / 16) * bpc / 4;
        let i = (block >> shift) as i8;
        out[p] = match p % 4 {
            0 | 1 => -128,
            2 => 2 * i,
            _ => 2 * i + 1,
        };
        p += 1;
    }
    out
}

/// The scales of chunk `c`'s blocks, one f32 per int32 lane.
///
/// # Safety
/// The row's scales from the chunk's first group on hold the groups the chunk
/// spans (`max(1, bpc >> shift)` values); the CPU supports AVX-512 BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn chunk_scales<const Q4: bool, const SHIFT: u32>(
    scales: *const u16,
    c: usize,
    pattern: __m512i,
) -> __m512 {
    let g0 = (c * blocks_per_chunk(Q4)) >> SHIFT;
    let count = (blocks_per_chunk(Q4) >> SHIFT).max(1);
    // SAFETY: reads `count` values from `g0` on (caller).
    let raw = unsafe {
        let p = scales.add(g0);
        match count {
            4 => _mm512_set1_epi64(std::ptr::read_unaligned(p.cast::<i64>())),
            2 => _mm512_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>())),
            _ => _mm512_set1_epi16(std::ptr::read_unaligned(p.cast::<i16>())),
        }
    };
    _mm512_castsi512_ps(_mm512_shuffle_epi8(raw, pattern))
}

/// [`chunk_scales`] for a last, partial chunk of `blocks` blocks.
///
/// # Safety
/// As [`chunk_scales`], for the groups those blocks span.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tail_scales<const Q4: bool, const SHIFT: u32>(
    scales: *const u16,
    c: usize,
    blocks: usize,
    pattern: __m512i,
) -> __m512 {
    let first = c * blocks_per_chunk(Q4);
    let g0 = first >> SHIFT;
    let count = ((first + blocks - 1) >> SHIFT) - g0 + 1;
    // SAFETY: the mask reads exactly `count` values from `g0` on (caller).
    let raw = unsafe { _mm_maskz_loadu_epi16(((1u32 << count) - 1) as u8, scales.add(g0).cast()) };
    _mm512_castsi512_ps(_mm512_shuffle_epi8(_mm512_broadcast_i32x4(raw), pattern))
}

/// One thread's view of the decode activations of `T` tokens.
struct TokenPtrs {
    x: *const i8,
    sx: *const f32,
    off: *const i32,
    sums: *const f32,
    /// Codes per token.
    stride: usize,
    /// Lanes per token (`16 · chunks`).
    lanes: usize,
    /// Groups per token.
    groups: usize,
}

/// Rows `r0..r0+R` of a q4 matrix against `T` tokens. Per chunk of 4 blocks
/// and row: one load of codes, split into low and high nibbles, two
/// `vpdpbusd` per token, and the int32 lanes scaled by `s_w · s_x` into f32;
/// each token's activations are loaded once per chunk for all `R` rows. The
/// zero points come off at the end, group by group, as `s_w · z · (s_x · Σ x)`.
/// Returns `out[r][t]`.
///
/// # Safety
/// Rows `r0..r0+R` belong to `w`; `a` holds `T` tokens prepared for `w`; the
/// CPU supports AVX-512 F/BW/VL/VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_rows<const R: usize, const T: usize, const SHIFT: u32>(
    w: &QuantMatRef<'_>,
    r0: usize,
    a: &TokenPtrs,
) -> [[f32; T]; R] {
    let nb = w.cols / BLOCK;
    let groups = w.groups();
    let (full, rest) = (nb / 4, nb % 4);
    let shuffle = const { scale_shuffle(true, SHIFT) };
    let nibble = _mm512_set1_epi8(15);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut corr = [[_mm512_setzero_ps(); T]; R];
    // SAFETY: every offset stays within rows `r0..r0+R` of the arrays and
    // within the prepared tokens (caller); prefetch addresses are not
    // dereferenced.
    unsafe {
        let pattern = _mm512_loadu_si512(shuffle.as_ptr().cast());
        let row_bytes = w.cols / 2;
        let zero_bytes = groups.div_ceil(2);
        let codes = w.codes.as_ptr().add(r0 * row_bytes);
        let scales = w.scales.as_ptr().add(r0 * groups);
        let zeros = w.zeros.as_ptr().add(r0 * zero_bytes);
        // One chunk `c` of every row; `$load(r)` gives row `r`'s codes and scales.
        macro_rules! step {
            ($c:expr, $load:expr) => {{
                let c = $c;
                let x: [(__m512i, __m512i, __m512); T] = std::array::from_fn(|t| {
                    let p = a.x.add(t * a.stride + c * 128);
                    (
                        _mm512_loadu_si512(p.cast()),
                        _mm512_loadu_si512(p.add(64).cast()),
                        _mm512_loadu_ps(a.sx.add(t * a.lanes + c * 16)),
                    )
                });
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let (v, sw): (__m512i, __m512) = $load(r);
                    let lo = _mm512_and_si512(v, nibble);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                    for (acc_t, &(xl, xh, sx)) in acc_r.iter_mut().zip(&x) {
                        let d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl);
                        let d = _mm512_dpbusd_epi32(d, hi, xh);
                        let f = _mm512_mul_ps(sw, sx);
                        *acc_t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), f, *acc_t);
                    }
                }
            }};
        }
        let ahead = pass_ahead(R * row_bytes);
        for c in 0..full {
            step!(c, |r: usize| {
                let p = codes.add(r * row_bytes + c * 64);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead).cast());
                (
                    _mm512_loadu_si512(p.cast()),
                    chunk_scales::<true, SHIFT>(scales.add(r * groups), c, pattern),
                )
            });
        }
        if rest > 0 {
            let mask = (1u64 << (16 * rest)) - 1;
            step!(full, |r: usize| {
                (
                    _mm512_maskz_loadu_epi8(mask, codes.add(r * row_bytes + full * 64).cast()),
                    tail_scales::<true, SHIFT>(scales.add(r * groups), full, rest, pattern),
                )
            });
        }
        // Σ_g s_g · z_g · (s_x · Σ x)_g, 16 groups at a time.
        let dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let nibble_shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
        let mut g = 0;
        while g < groups {
            let n = (groups - g).min(16);
            let mask = ((1u32 << n) - 1) as u16;
            let zmask = ((1u32 << n.div_ceil(2)) - 1) as u16;
            let sums: [__m512; T] =
                std::array::from_fn(|t| _mm512_maskz_loadu_ps(mask, a.sums.add(t * a.groups + g)));
            for (r, corr_r) in corr.iter_mut().enumerate() {
                let s = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                    mask,
                    scales.add(r * groups + g).cast(),
                )));
                let zb = _mm_maskz_loadu_epi8(zmask, zeros.add(r * zero_bytes + g / 2).cast());
                let z = _mm512_and_si512(
                    _mm512_srlv_epi32(
                        _mm512_cvtepu8_epi32(_mm_shuffle_epi8(zb, dup)),
                        nibble_shift,
                    ),
                    _mm512_set1_epi32(15),
                );
                let sz = _mm512_mul_ps(_mm512_castsi512_ps(s), _mm512_cvtepi32_ps(z));
                for (corr_t, &sum) in corr_r.iter_mut().zip(&sums) {
                    *corr_t = _mm512_fmadd_ps(sz, sum, *corr_t);
                }
            }
            g += 16;
        }
    }
    let mut out = [[0f32; T]; R];
    for ((out_r, acc_r), corr_r) in out.iter_mut().zip(&acc).zip(&corr) {
        let diff: [__m512; T] = std::array::from_fn(|t| _mm512_sub_ps(acc_r[t], corr_r[t]));
        *out_r = hsums(diff);
    }
    out
}

/// Rows `r0..r0+R` of a q8 matrix against `T` tokens: per chunk of 2 blocks
/// and row one load of codes, shifted to unsigned by 128, one `vpdpbusd` per
/// token starting from `-128 · Σ x` (so the int32 sums are exact), scaled
/// into f32. Returns `out[r][t]`.
///
/// # Safety
/// As [`q4_rows`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_rows<const R: usize, const T: usize, const SHIFT: u32>(
    w: &QuantMatRef<'_>,
    r0: usize,
    a: &TokenPtrs,
) -> [[f32; T]; R] {
    let nb = w.cols / BLOCK;
    let groups = w.groups();
    let (full, rest) = (nb / 2, nb % 2);
    let shuffle = const { scale_shuffle(false, SHIFT) };
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    // SAFETY: as in `q4_rows`.
    unsafe {
        let pattern = _mm512_loadu_si512(shuffle.as_ptr().cast());
        let codes = w.codes.as_ptr().add(r0 * w.cols);
        let scales = w.scales.as_ptr().add(r0 * groups);
        // One chunk `c` of every row (activations loaded under `$x_mask`);
        // `$load(r)` gives row `r`'s codes and scales.
        macro_rules! step {
            ($c:expr, $x_mask:expr, $load:expr) => {{
                let c = $c;
                let x: [(__m512i, __m512i, __m512); T] = std::array::from_fn(|t| {
                    let lane = t * a.lanes + c * 16;
                    (
                        _mm512_maskz_loadu_epi8($x_mask, a.x.add(t * a.stride + c * 64).cast()),
                        _mm512_loadu_si512(a.off.add(lane).cast()),
                        _mm512_loadu_ps(a.sx.add(lane)),
                    )
                });
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let (v, sw): (__m512i, __m512) = $load(r);
                    let u = _mm512_xor_si512(v, flip);
                    for (acc_t, &(xv, off, sx)) in acc_r.iter_mut().zip(&x) {
                        let d = _mm512_dpbusd_epi32(off, u, xv);
                        let f = _mm512_mul_ps(sw, sx);
                        *acc_t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), f, *acc_t);
                    }
                }
            }};
        }
        let ahead = pass_ahead(R * w.cols);
        for c in 0..full {
            step!(c, u64::MAX, |r: usize| {
                let p = codes.add(r * w.cols + c * 64);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead).cast());
                (
                    _mm512_loadu_si512(p.cast()),
                    chunk_scales::<false, SHIFT>(scales.add(r * groups), c, pattern),
                )
            });
        }
        if rest > 0 {
            // The missing block reads as code 0x80 (0 once shifted) against zero activations.
            let half = (1u64 << 32) - 1;
            step!(full, half, |r: usize| {
                (
                    _mm512_maskz_loadu_epi8(half, codes.add(r * w.cols + full * 64).cast()),
                    tail_scales::<false, SHIFT>(scales.add(r * groups), full, rest, pattern),
                )
            });
        }
    }
    let mut out = [[0f32; T]; R];
    for (out_r, &acc_r) in out.iter_mut().zip(&acc) {
        *out_r = hsums(acc_r);
    }
    out
}

/// Expands `$run!($args.., T, SHIFT)` with the pass's token count `$n`
/// (1..=8) and the group size's `log2(G / 32)` as constants, for the decode
/// kernels' const generics.
macro_rules! with_pass_consts {
    ($run:ident!($($arg:ident),*), $n:expr, $group:expr) => {
        match $n {
            1 => with_pass_consts!(@group $run!($($arg),*), 1, $group),
            2 => with_pass_consts!(@group $run!($($arg),*), 2, $group),
            3 => with_pass_consts!(@group $run!($($arg),*), 3, $group),
            4 => with_pass_consts!(@group $run!($($arg),*), 4, $group),
            5 => with_pass_consts!(@group $run!($($arg),*), 5, $group),
            6 => with_pass_consts!(@group $run!($($arg),*), 6, $group),
            7 => with_pass_consts!(@group $run!($($arg),*), 7, $group),
            _ => with_pass_consts!(@group $run!($($arg),*), 8, $group),
        }
    };
    (@group $run:ident!($($arg:ident),*), $t:literal, $group:expr) => {
        match $group {
            32 => $run!($($arg,)* $t, 0),
            64 => $run!($($arg,)* $t, 1),
            128 => $run!($($arg,)* $t, 2),
            g => unreachable!("group size {g}"),
        }
    };
}

/// Bytes ahead of the current position that the decode kernels prefetch (at least).
const PREFETCH_BYTES: usize = 4096;

/// How far ahead a row kernel whose passes cover `pass_bytes` of code bytes
/// prefetches: the same columns of a later pass, the first at least
/// [`PREFETCH_BYTES`] ahead. A fixed distance lands inside the current
/// pass's own rows when they are long, where it fetches nothing new.
fn pass_ahead(pass_bytes: usize) -> usize {
    PREFETCH_BYTES.div_ceil(pass_bytes.max(1)) * pass_bytes
}

/// One thread's activations laid out for the strip kernels: per pass of
/// up to [`GEMV_TOKENS`] tokens and per block of 32 inputs, one record of
/// the pass's tokens' 32 codes each, then their Σ codes (i32), then their
/// scales (f32). One pointer per block then reaches every token at a fixed
/// offset. With a pointer per token, the compiler addressed the broadcasts
/// as base plus scaled index, which splits every `vpdpbusd` with a memory
/// operand into two micro-ops (2.6 vs 4.0 billion per second here): a
/// 5-token pass ran at half the dot-product ports' rate.
#[derive(Default)]
struct StripActs {
    /// `QuantizedActs::id` of the activations these were laid out from.
    id: u64,
    records: Vec<u8>,
}

thread_local! {
    static STRIP_ACTS: RefCell<StripActs> = RefCell::new(StripActs::default());
}

/// Bytes per token in a block's record: codes, Σ codes, scale.
const RECORD_BYTES: usize = BLOCK + 8;

impl StripActs {
    /// Lays out every token of `acts` (prepared with int8 codes).
    fn prepare(&mut self, acts: &QuantizedActs) {
        let (n_tok, k, nb) = (acts.n_tok, acts.k, acts.k / BLOCK);
        self.id = acts.id;
        self.records.resize(n_tok * nb * RECORD_BYTES, 0);
        let mut t0 = 0;
        while t0 < n_tok {
            let n = GEMV_TOKENS.min(n_tok - t0);
            for b in 0..nb {
                let record =
                    &mut self.records[(t0 * nb + b * n) * RECORD_BYTES..][..n * RECORD_BYTES];
                let (codes, rest) = record.split_at_mut(n * BLOCK);
                let (totals, scales) = rest.split_at_mut(n * 4);
                for t in 0..n {
                    let src = t0 + t;
                    let from = &acts.codes[src * k + b * BLOCK..][..BLOCK];
                    // SAFETY: i8 and u8 have one layout; `from` is borrowed for the copy.
                    let from =
                        unsafe { std::slice::from_raw_parts(from.as_ptr().cast::<u8>(), BLOCK) };
                    codes[t * BLOCK..][..BLOCK].copy_from_slice(from);
                    totals[4 * t..][..4].copy_from_slice(&acts.totals[src * nb + b].to_ne_bytes());
                    scales[4 * t..][..4].copy_from_slice(&acts.scales[src * nb + b].to_ne_bytes());
                }
            }
            t0 += n;
        }
    }
}

/// The `T` tokens of one pass as [`StripActs`] holds them.
#[derive(Clone, Copy)]
struct StripTokens<const T: usize> {
    /// The pass's first record.
    records: *const u8,
}

impl<const T: usize> StripTokens<T> {
    /// The pass of `T` tokens from `t0` (where a pass starts) of `a`.
    fn new(a: &StripActs, t0: usize, nb: usize) -> Self {
        StripTokens {
            records: a.records.as_ptr().wrapping_add(t0 * nb * RECORD_BYTES),
        }
    }

    /// The same tokens at block `b`. The pointer is passed through an
    /// empty `asm!` so that the compiler addresses the block's reads from
    /// it by constant offsets, not as base plus scaled index (see [`StripActs`]).
    #[inline]
    fn block(self, b: usize) -> Self {
        let mut p = self.records.wrapping_add(b * T * RECORD_BYTES);
        // SAFETY: an empty template: it only hides where `p` came from.
        unsafe {
            std::arch::asm!("/* {0} */", inout(reg) p, options(pure, readonly, nostack, preserves_flags))
        };
        StripTokens { records: p }
    }

    /// Token `t`'s codes `i..i+4` of this block, broadcast to every lane.
    ///
    /// # Safety
    /// This block lies within the pass's records; `t < T`, `i + 4 <= 32`; AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn quad(self, t: usize, i: usize) -> __m512i {
        // SAFETY: within the block's record (caller).
        unsafe {
            let p = self.records.add(t * BLOCK + i);
            _mm512_set1_epi32(p.cast::<i32>().read_unaligned())
        }
    }

    /// Σ of token `t`'s codes in this block.
    ///
    /// # Safety
    /// As [`StripTokens::quad`].
    #[inline]
    unsafe fn total(self, t: usize) -> i32 {
        // SAFETY: within the block's record (caller).
        unsafe {
            self.records
                .add(T * BLOCK + 4 * t)
                .cast::<i32>()
                .read_unaligned()
        }
    }

    /// `acc[t] += d[t] · s_w · s_x(t)` for every token: this block's int32
    /// lanes scaled by the rows' scales `sw` and the token's.
    ///
    /// # Safety
    /// As [`StripTokens::quad`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scale(self, acc: &mut [__m512; T], d: &[__m512i; T], sw: __m512) {
        for (t, acc_t) in acc.iter_mut().enumerate() {
            // SAFETY: within the block's record (caller).
            let sx = unsafe {
                self.records
                    .add(T * (BLOCK + 4) + 4 * t)
                    .cast::<f32>()
                    .read_unaligned()
            };
            let f = _mm512_mul_ps(sw, _mm512_set1_ps(sx));
            *acc_t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[t]), f, *acc_t);
        }
    }
}

/// A strip's 16 bf16 scales at `p`, as f32 lanes.
///
/// # Safety
/// `p` holds 16 values; AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn strip_scales(p: *const u16) -> __m512 {
    // SAFETY: 16 values at `p` (caller).
    let bits = _mm512_cvtepu16_epi32(unsafe { _mm256_loadu_si256(p.cast()) });
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))
}

/// Prefetches the `lines` cache lines that start [`PREFETCH_BYTES`] past `p`.
#[inline]
#[target_feature(enable = "avx512f")]
fn prefetch_ahead(p: *const u8, lines: usize) {
    // Prefetch addresses are not dereferenced: no safety condition.
    for line in 0..lines {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES + 64 * line).cast());
    }
}

/// One strip of a q4 matrix in [`QuantLayout::Strips`] (16 rows) against
/// the `T` tokens of `pass`: per block, the strip's 4 code vectors are split into
/// low and high nibbles once for all tokens; each token's int32 lanes (one
/// per row) start at `-z·Σx` (one `vpmaddwd`), take 8 `vpdpbusd` against
/// broadcast quads of its codes, and are scaled by `s_w·s_x` once per row
/// and block. Returns 16 outputs per token.
///
/// # Safety
/// `strip` lies within `w` (strips layout), `pass` holds `T` tokens of
/// `w.cols / 32` blocks (laid out from int8 codes); the CPU supports
/// AVX-512 F/BW/VL/VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_strip<const T: usize, const SHIFT: u32>(
    w: &QuantMatRef<'_>,
    strip: usize,
    pass: StripTokens<T>,
) -> [__m512; T] {
    let (nb, groups) = (w.cols / BLOCK, w.groups());
    let nibble = _mm512_set1_epi8(0x0f);
    let dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let nibble_shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    let mut acc = [_mm512_setzero_ps(); T];
    // SAFETY: every read lies within the strip's codes, scales and zero
    // points and within the tokens' codes, scales and totals (caller);
    // prefetch addresses are not dereferenced.
    unsafe {
        let codes = w.codes.as_ptr().add(strip * nb * STRIP * 16);
        let scales = w.scales.as_ptr().add(strip * groups * STRIP);
        let zeros = w.zeros.as_ptr().add(strip * groups * STRIP / 2);
        let quad = |t: usize, b: usize, i: usize| pass.block(b).quad(t, i);
        // Scales and −z (in each lane's low half, 0 in the high one) of block `b`'s group.
        let group = |b: usize| {
            let g = b >> SHIFT;
            let sw = strip_scales(scales.add(g * STRIP));
            let zb = _mm_loadl_epi64(zeros.add(g * STRIP / 2).cast());
            let wide = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(zb, dup));
            let zero =
                _mm512_and_si512(_mm512_srlv_epi32(wide, nibble_shift), _mm512_set1_epi32(15));
            let z = _mm512_and_si512(
                _mm512_sub_epi32(_mm512_setzero_si512(), zero),
                _mm512_set1_epi32(0xffff),
            );
            (sw, z)
        };
        // With Σx (|Σx| < 2¹⁵) broadcast, one vpmaddwd gives −z·Σx exactly.
        let start = |z: __m512i, b: usize| -> [__m512i; T] {
            std::array::from_fn(|t| _mm512_madd_epi16(z, _mm512_set1_epi32(pass.block(b).total(t))))
        };
        let prefetch = |b: usize| prefetch_ahead(codes.add(b * STRIP * 16), 4);
        let nibbles = |b: usize, j: usize| {
            let v = _mm512_loadu_si512(codes.add(b * STRIP * 16 + 64 * j).cast());
            (
                _mm512_and_si512(v, nibble),
                _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble),
            )
        };
        // With 5 or 6 tokens, two blocks at a time: their 2T chains of
        // products are enough to keep both ports busy. Fewer tokens split
        // each block's chain in two instead (more tokens would spill).
        let pairs = if (5..=6).contains(&T) { nb / 2 } else { 0 };
        for pair in 0..pairs {
            let b = 2 * pair;
            let (sw0, z0) = group(b);
            let (sw1, z1) = if SHIFT == 0 { group(b + 1) } else { (sw0, z0) };
            prefetch(b);
            prefetch(b + 1);
            let (mut d0, mut d1) = (start(z0, b), start(z1, b + 1));
            for j in 0..4 {
                let (l0, h0) = nibbles(b, j);
                let (l1, h1) = nibbles(b + 1, j);
                for t in 0..T {
                    d0[t] = _mm512_dpbusd_epi32(d0[t], l0, quad(t, b, 4 * j));
                    d1[t] = _mm512_dpbusd_epi32(d1[t], l1, quad(t, b + 1, 4 * j));
                }
                for t in 0..T {
                    d0[t] = _mm512_dpbusd_epi32(d0[t], h0, quad(t, b, 16 + 4 * j));
                    d1[t] = _mm512_dpbusd_epi32(d1[t], h1, quad(t, b + 1, 16 + 4 * j));
                }
            }
            pass.block(b).scale(&mut acc, &d0, sw0);
            pass.block(b + 1).scale(&mut acc, &d1, sw1);
        }
        for b in 2 * pairs..nb {
            let (sw, z) = group(b);
            prefetch(b);
            let mut d = start(z, b);
            let mut e: [__m512i; T] = [_mm512_setzero_si512(); T];
            for j in 0..4 {
                let (lo, hi) = nibbles(b, j);
                for t in 0..T {
                    d[t] = _mm512_dpbusd_epi32(d[t], lo, quad(t, b, 4 * j));
                    e[t] = _mm512_dpbusd_epi32(e[t], hi, quad(t, b, 16 + 4 * j));
                }
            }
            let sum: [__m512i; T] = std::array::from_fn(|t| _mm512_add_epi32(d[t], e[t]));
            pass.block(b).scale(&mut acc, &sum, sw);
        }
    }
    acc
}

/// One strip of a q8 matrix in [`QuantLayout::Strips`] (16 rows, codes
/// stored plus 128) against the `T` tokens of `pass`: per block, each token's
/// int32 lanes (one per row) start at `-128·Σx`, take 8 `vpdpbusd` of the
/// strip's 8 code vectors against broadcast quads of its codes (in two
/// chains up to 6 tokens), and are scaled by `s_w·s_x` once per row and
/// block. Returns 16 outputs per token.
///
/// # Safety
/// As [`q4_strip`], for a q8 matrix.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_strip<const T: usize, const SHIFT: u32>(
    w: &QuantMatRef<'_>,
    strip: usize,
    pass: StripTokens<T>,
) -> [__m512; T] {
    let (nb, groups) = (w.cols / BLOCK, w.groups());
    // Two chains per token while the registers hold them.
    let split = T <= 6;
    let mut acc = [_mm512_setzero_ps(); T];
    // SAFETY: every read lies within the strip's codes and scales and
    // within the tokens' codes, scales and totals (caller); prefetch
    // addresses are not dereferenced.
    unsafe {
        let codes = w.codes.as_ptr().add(strip * nb * STRIP * BLOCK);
        let scales = w.scales.as_ptr().add(strip * groups * STRIP);
        for b in 0..nb {
            let tokens = pass.block(b);
            let p = codes.add(b * STRIP * BLOCK);
            prefetch_ahead(p, 8);
            // |Σx| ≤ 32·127, so −128·Σx fits easily.
            let mut d: [__m512i; T] =
                std::array::from_fn(|t| _mm512_set1_epi32(-128 * tokens.total(t)));
            let mut e = [_mm512_setzero_si512(); T];
            for j in 0..8 {
                let v = _mm512_loadu_si512(p.add(64 * j).cast());
                for t in 0..T {
                    if split && j % 2 == 1 {
                        e[t] = _mm512_dpbusd_epi32(e[t], v, tokens.quad(t, 4 * j));
                    } else {
                        d[t] = _mm512_dpbusd_epi32(d[t], v, tokens.quad(t, 4 * j));
                    }
                }
            }
            if split {
                for (d_t, e_t) in d.iter_mut().zip(&e) {
                    *d_t = _mm512_add_epi32(*d_t, *e_t);
                }
            }
            tokens.scale(&mut acc, &d, strip_scales(scales.add((b >> SHIFT) * STRIP)));
        }
    }
    acc
}

/// Decode and short passes over a matrix in strips: every strip of `rows`
/// against each token, up to [`GEMV_TOKENS`] tokens per pass.
///
/// A strip cut by the ends of `rows` (a thread's chunk of a fused product
/// whose earlier matrices are not whole strips) is computed whole and
/// stored only within `rows`.
///
/// # Safety
/// See `product::rows_product`; `w` is in [`QuantLayout::Strips`]; the CPU
/// supports AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemv_strips(
    w: QuantMatRef<'_>,
    acts: &QuantizedActs,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    assert!(
        w.layout == QuantLayout::Strips && rows.end <= w.rows,
        "strip kernel on rows {rows:?} of a {:?} matrix of {} rows",
        w.layout,
        w.rows
    );
    // Lanes of strip `s` inside `rows`.
    let lanes = |s: usize| -> __mmask16 {
        let (lo, hi) = (rows.start.max(s * STRIP), rows.end.min((s + 1) * STRIP));
        (((1u32 << (hi - lo)) - 1) << (lo - s * STRIP)) as __mmask16
    };
    assert_eq!(acts.k, w.cols, "activations for another matrix");
    STRIP_ACTS.with_borrow_mut(|laid| {
        if laid.id != acts.id {
            laid.prepare(acts);
        }
        // The kernels read the records through raw pointers: check their extent.
        assert!(
            laid.records.len() >= acts.n_tok * (w.cols / BLOCK) * RECORD_BYTES,
            "strip activations not laid out"
        );
        let nb = w.cols / BLOCK;
        // Blocks of strips small enough to stay in L2 while every pass of
        // up to GEMV_TOKENS tokens runs over them, so that more tokens than
        // one pass read the weights from memory once. Each (row, token) is
        // computed alike whatever the block.
        let code_bits = match w.format {
            QuantFormat::Q4 => 4,
            QuantFormat::Q8 => 8,
        };
        let strip_bytes = STRIP * w.cols * code_bits / 8;
        let per_block = (STRIP_BLOCK_BYTES / strip_bytes.max(1)).max(1);
        let all = rows.start / STRIP..rows.end.div_ceil(STRIP);
        for first in all.clone().step_by(per_block) {
            let strips = first..(first + per_block).min(all.end);
            let mut t0 = 0;
            while t0 < acts.n_tok {
                let n = GEMV_TOKENS.min(acts.n_tok - t0);
                macro_rules! run {
                    ($strip_kernel:ident, $t:literal, $shift:literal) => {{
                        let pass = StripTokens::<$t>::new(laid, t0, nb);
                        for strip in strips.clone() {
                            let mask = lanes(strip);
                            // SAFETY: the strip lies within `w` (whole strips); the
                            // pass's tokens lie within `laid` (prepared from `acts`,
                            // `nb` blocks each); `y` holds `n_tok` rows of `w.rows`
                            // outputs (caller), written only at `rows`.
                            unsafe {
                                let out = $strip_kernel::<$t, $shift>(&w, strip, pass);
                                for (t, v) in out.into_iter().enumerate() {
                                    let dst = y.add((t0 + t) * w.rows + strip * STRIP);
                                    _mm512_mask_storeu_ps(dst, mask, v);
                                }
                            }
                        }
                    }};
                }
                match w.format {
                    QuantFormat::Q4 => with_pass_consts!(run!(q4_strip), n, w.group),
                    QuantFormat::Q8 => with_pass_consts!(run!(q8_strip), n, w.group),
                }
                t0 += n;
            }
        }
    });
}

/// Bytes of weights a block of strips of [`gemv_strips`] spans.
const STRIP_BLOCK_BYTES: usize = 256 << 10;

/// Decode: every row of `rows` against each of the (few) tokens, up to
/// [`GEMV_TOKENS`] tokens per pass over a row.
///
/// # Safety
/// See `product::rows_product`; the CPU supports AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemv_rows(
    w: QuantMatRef<'_>,
    acts: &QuantizedActs,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    assert_eq!(w.layout, QuantLayout::Rows, "row kernel on strips");
    let q4 = w.format == QuantFormat::Q4;
    DECODE.with_borrow_mut(|d| {
        if (d.id, d.q4, d.group) != (acts.id, q4, w.group) {
            d.prepare(acts, q4, w.group);
        }
        let chunks = (w.cols / BLOCK).div_ceil(blocks_per_chunk(q4));
        let mut t0 = 0;
        while t0 < acts.n_tok {
            let n = GEMV_TOKENS.min(acts.n_tok - t0);
            let groups = w.groups();
            // SAFETY: tokens `t0..t0+n` were prepared; the pointers stay
            // within `d`'s buffers (empty ones are never read).
            let a = unsafe {
                TokenPtrs {
                    x: if q4 {
                        d.x.as_ptr().add(t0 * d.stride)
                    } else {
                        acts.codes.as_ptr().add(t0 * acts.k)
                    },
                    sx: d.sx.as_ptr().add(t0 * chunks * 16),
                    off: d.off.as_ptr().wrapping_add(t0 * chunks * 16),
                    sums: d.sums.as_ptr().wrapping_add(t0 * groups),
                    stride: if q4 { d.stride } else { acts.k },
                    lanes: chunks * 16,
                    groups,
                }
            };
            // Rows per pass: as many as the registers hold for `T` tokens
            // (past that, the inputs are read from L1 by the dot products).
            // Every row of a pass shares the inputs' loads; one row per pass
            // made a 5-token pass cost 1.9x a decode step, two 1.5x.
            macro_rules! run {
                ($rows:ident, $t:literal, $shift:literal) => {{
                    const R: usize = if $t <= 2 {
                        4
                    } else if $t <= 4 {
                        3
                    } else {
                        2
                    };
                    let mut r = rows.start;
                    while r < rows.end {
                        // SAFETY: the rows lie within `rows`, rows of `w`; the
                        // tokens are prepared; `y` holds `n_tok` rows of
                        // `w.rows` outputs (caller).
                        unsafe {
                            let store = |r: usize, out: &[[f32; $t]]| {
                                for (i, row) in out.iter().enumerate() {
                                    for (t, &v) in row.iter().enumerate() {
                                        *y.add((t0 + t) * w.rows + r + i) = v;
                                    }
                                }
                            };
                            if r + R <= rows.end {
                                store(r, &$rows::<R, $t, $shift>(&w, r, &a));
                                r += R;
                            } else {
                                store(r, &$rows::<1, $t, $shift>(&w, r, &a));
                                r += 1;
                            }
                        }
                    }
                }};
            }
            if q4 {
                with_pass_consts!(run!(q4_rows), n, w.group)
            } else {
                with_pass_consts!(run!(q8_rows), n, w.group)
            }
            t0 += n;
        }
    });
}
