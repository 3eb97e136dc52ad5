//! Products of activations with weight matrices: `y[t, r] = Σ_k W[r, k] · x[t, k]`.
//!
//! Two shapes of work, two strategies:
//! - few tokens (decode, `n_tok <= GEMV_MAX_TOKENS`): memory-bound, so each
//!   weight row is streamed once in its stored dtype and widened in registers;
//! - many tokens (prefill): compute-bound, so panels of the weight matrix are
//!   widened into a small f32 buffer (`KC` inputs x `NR` outputs) that stays in
//!   L1 and is reused by a register-blocked micro-kernel for every token.
//!
//! Work is split across the pool by output rows, in multiples of 16, each
//! thread taking its own contiguous share (see [`ChunkQueue`]).

use crate::cpu::Isa;
use crate::pool::{ChunkQueue, ThreadPool};
use crate::weights::{MatRef, WeightSlice};
use std::cell::RefCell;

#[cfg(target_arch = "x86_64")]
mod amx;

/// Up to this many tokens the streaming (GEMV) path is used.
pub const GEMV_MAX_TOKENS: usize = 4;
/// The same for bf16 weights on AVX-512, whose row kernel serves up to 8
/// tokens per pass over a row (which stays in L1 between passes).
pub const GEMV_MAX_TOKENS_BF16: usize = 16;

/// Most tokens the row kernels take for `w` on `isa`.
fn gemv_max_tokens(isa: Isa, w: MatRef<'_>) -> usize {
    match w.data {
        WeightSlice::Bf16(_) if isa.has_avx512() => GEMV_MAX_TOKENS_BF16,
        _ => GEMV_MAX_TOKENS,
    }
}
/// Inputs per packed panel.
const KC: usize = 256;
/// Outputs per packed panel.
const NR: usize = 16;
/// Tokens per micro-kernel call.
const MR: usize = 6;
/// Most products one [`matmul_many`] call fuses.
pub const MAX_FUSED: usize = 4;
/// Fewest output rows a thread takes at once (see [`ChunkQueue`]).
const MIN_CHUNK_ROWS: usize = 32;

thread_local! {
    /// Per-thread buffer for a packed weight panel (GEMM) or a widened row (scalar).
    static PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread buffer for the packed activations of one `KC` block (GEMM).
    static PACK_X: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's buffer for inputs reordered for the bf16 row
    /// kernels, read by every thread of the product.
    static REORDERED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's buffer for activations split for the tile unit,
    /// read by every thread of the product.
    #[cfg(target_arch = "x86_64")]
    static SPLIT: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// The same for the activations of a short pass on the tile unit.
    #[cfg(target_arch = "x86_64")]
    static PAIRS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// One thread's share of a product on the tile unit: weights, output rows, output.
type TileProduct<'a> = dyn Fn(MatRef<'_>, std::ops::Range<usize>, *mut f32) + Sync + 'a;

/// Whether [`matmul_many`] runs `w` on the AMX tile unit, as a GEMM or a
/// short pass.
fn uses_tiles(isa: Isa, w: MatRef<'_>, n_tok: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        uses_amx(isa, w, n_tok) || uses_amx_short(isa, w, n_tok)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, w, n_tok);
        false
    }
}

/// Whether [`matmul_many`] runs `w` on the AMX tile unit as a GEMM: bf16
/// weights, more tokens than the row kernels take.
#[cfg(target_arch = "x86_64")]
fn uses_amx(isa: Isa, w: MatRef<'_>, n_tok: usize) -> bool {
    matches!(w.data, WeightSlice::Bf16(_)) && isa.has_amx() && n_tok > gemv_max_tokens(isa, w)
}

/// The elements of `w`, which the tile paths take only when they are bf16.
#[cfg(target_arch = "x86_64")]
fn bf16_data(w: MatRef<'_>) -> &[u16] {
    match w.data {
        WeightSlice::Bf16(data) => data,
        _ => unreachable!("only bf16 weights run on the tiles"),
    }
}

/// Fewest tokens a short pass runs on the tile unit with. Fewer take the
/// row kernels, which stream the weights faster: the tile loads read 16
/// rows at once and keep fewer lines in flight (Qwen3-0.6B shape, 2
/// threads: a 2-token pass took 0.8x the row kernels' speed, 6 tokens the
/// same, 8 tokens 1.3x, 12 and 16 tokens 1.4-1.7x).
#[cfg(target_arch = "x86_64")]
const AMX_SHORT_MIN_TOKENS: usize = 8;

/// Whether [`matmul_many`] runs a short pass of `w` on the tile unit: bf16
/// weights with whole 32-input steps, and too few tokens for the GEMM.
#[cfg(target_arch = "x86_64")]
fn uses_amx_short(isa: Isa, w: MatRef<'_>, n_tok: usize) -> bool {
    matches!(w.data, WeightSlice::Bf16(_))
        && isa.has_amx()
        && (AMX_SHORT_MIN_TOKENS..=GEMV_MAX_TOKENS_BF16).contains(&n_tok)
        && w.cols.is_multiple_of(amx::K_STEP)
}

/// How a product may order its sums over the tokens of a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProductMode {
    /// The fastest kernels for the number of tokens: row kernels for a
    /// few, packed GEMMs or the tile unit for many.
    #[default]
    Fast,
    /// Every token's outputs bit-identical to those of a product over that
    /// token alone: the kernels a one-token call takes, whatever the number
    /// of tokens. Speculative verification needs it (a drafted token's
    /// logits must equal one-token decoding's, or a near-tie could resolve
    /// differently), as does batched decoding.
    TokenExact,
}

impl ProductMode {
    /// The number of tokens kernels are chosen for, for a call over `n_tok`.
    pub(crate) fn dispatch_tokens(self, n_tok: usize) -> usize {
        match self {
            ProductMode::Fast => n_tok,
            ProductMode::TokenExact => n_tok.min(1),
        }
    }
}

/// One matrix of a fused product: all jobs of a [`matmul_many`] call read the
/// same input and write their own output (`n_tok x w.rows`, row-major).
pub struct MatmulJob<'a> {
    /// The weights, `rows` outputs x `cols` inputs.
    pub w: MatRef<'a>,
    /// The output, `n_tok * w.rows` values.
    pub y: &'a mut [f32],
}

/// `y = x · Wᵀ` for `n_tok` rows of `x` (each `w.cols` long), on the pool.
pub fn matmul(pool: &ThreadPool, isa: Isa, w: MatRef<'_>, x: &[f32], n_tok: usize, y: &mut [f32]) {
    matmul_many(pool, isa, &mut [MatmulJob { w, y }], x, n_tok);
}

/// [`matmul_many_in`] with the fastest kernels ([`ProductMode::Fast`]).
pub fn matmul_many(
    pool: &ThreadPool,
    isa: Isa,
    jobs: &mut [MatmulJob<'_>],
    x: &[f32],
    n_tok: usize,
) {
    matmul_many_in(pool, isa, ProductMode::Fast, jobs, x, n_tok);
}

struct OutPtr(*mut f32);
// SAFETY: threads write disjoint output columns (row ranges of W), see `matmul_many`.
unsafe impl Sync for OutPtr {}

/// Several products that share their input, split across the pool as one
/// piece of work (e.g. the q, k and v projections), on the kernels `mode`
/// allows.
///
/// Panics if the shapes disagree: that is a bug in the caller, never input.
pub fn matmul_many_in(
    pool: &ThreadPool,
    isa: Isa,
    mode: ProductMode,
    jobs: &mut [MatmulJob<'_>],
    x: &[f32],
    n_tok: usize,
) {
    let Some(first) = jobs.first() else { return };
    if n_tok == 0 {
        return;
    }
    let k = first.w.cols;
    assert!(crate::holds(x.len(), n_tok, k), "matmul input too short");
    for job in jobs.iter() {
        assert_eq!(job.w.cols, k, "fused matmul inputs differ");
        assert!(
            crate::holds(job.y.len(), n_tok, job.w.rows),
            "matmul output too short"
        );
    }
    assert!(
        jobs.len() <= MAX_FUSED,
        "at most {MAX_FUSED} fused products"
    );
    // A fixed array rather than a Vec: this runs in the decode loop.
    let mut slots: [Option<(MatRef<'_>, OutPtr)>; MAX_FUSED] = [const { None }; MAX_FUSED];
    for (slot, job) in slots.iter_mut().zip(jobs.iter_mut()) {
        *slot = Some((job.w, OutPtr(job.y.as_mut_ptr())));
    }
    let targets = &slots[..jobs.len()];
    let total_rows: usize = targets.iter().flatten().map(|(w, _)| w.rows).sum();
    let queue = ChunkQueue::new(total_rows, pool.n_threads(), NR, MIN_CHUNK_ROWS);
    let any_bf16 = targets
        .iter()
        .flatten()
        .any(|(w, _)| matches!(w.data, WeightSlice::Bf16(_)));
    REORDERED.with_borrow_mut(|buf| {
        // Reordered once here rather than by every thread for every chunk:
        // per chunk, reordering took 48% of a 5-token product over a
        // 384x1024 bf16 matrix (1 thread, weights in L2).
        let plan = mode.dispatch_tokens(n_tok);
        let inputs = match bf16_layout(isa, plan).filter(|_| any_bf16) {
            Some(layout) => RowInputs::reorder(layout, x, n_tok, k, buf),
            None => RowInputs::plain(x),
        };
        let tokens = Tokens { n: n_tok, plan };
        products_of(pool, isa, targets, inputs, tokens, k, &queue);
    });
}

/// The tokens of a product: how many, and how many the kernels are chosen
/// for ([`ProductMode::dispatch_tokens`]).
#[derive(Clone, Copy)]
struct Tokens {
    n: usize,
    plan: usize,
}

/// The body of [`matmul_many_in`] once the inputs are laid out: every job's
/// rows through the tile unit where it takes them, else the SIMD kernels.
fn products_of(
    pool: &ThreadPool,
    isa: Isa,
    targets: &[Option<(MatRef<'_>, OutPtr)>],
    inputs: RowInputs<'_>,
    tokens: Tokens,
    k: usize,
    queue: &ChunkQueue,
) {
    let (x, n_tok, plan) = (inputs.x, tokens.n, tokens.plan);
    let products = |tiles: &TileProduct<'_>| {
        pool.run(&|tid, _| {
            while let Some(mine) = queue.next_chunk(tid) {
                let mut base = 0;
                for (w, y) in targets.iter().flatten() {
                    let start = mine.start.max(base);
                    let end = mine.end.min(base + w.rows);
                    if start < end {
                        let rows = start - base..end - base;
                        if uses_tiles(isa, *w, plan) {
                            tiles(*w, rows, y.0)
                        } else {
                            // SAFETY: shapes were checked above; each thread writes
                            // only columns `rows` of this output (its chunk).
                            unsafe { rows_of(isa, *w, inputs, tokens, rows, y.0) }
                        }
                    }
                    base += w.rows;
                }
            }
        });
    };
    #[cfg(target_arch = "x86_64")]
    {
        let any = |takes: fn(Isa, MatRef<'_>, usize) -> bool| {
            targets.iter().flatten().any(|(w, _)| takes(isa, *w, plan))
        };
        if any(uses_amx_short) {
            return PAIRS.with_borrow_mut(|buf| {
                // SAFETY: AMX implies AVX-512 F/BW; `x` holds `n_tok * k` values
                // (checked), `n_tok <= 16` and `k` is whole steps (`uses_amx_short`).
                let acts = unsafe { amx::pair_activations(x, n_tok, k, buf) };
                products(&|w, rows, y| {
                    // SAFETY: the CPU and OS support AMX; `acts` was laid out from
                    // these inputs and `buf` outlives the product; `rows` is this
                    // thread's chunk of `w`; shapes were checked above. The rows
                    // left (fewer than 16) take the row kernels.
                    unsafe {
                        let rest = amx::short_rows(bf16_data(w), k, w.rows, acts, rows.clone(), y);
                        rows_of(isa, w, inputs, tokens, rest..rows.end, y)
                    }
                })
            });
        }
        if any(uses_amx) {
            return SPLIT.with_borrow_mut(|buf| {
                // SAFETY: AMX implies AVX-512 F/BW; `x` holds `n_tok * k` values (checked).
                let acts = unsafe { amx::split_activations(pool, x, n_tok, k, buf) };
                products(&|w, rows, y| {
                    // SAFETY: the CPU and OS support AMX (`uses_amx`); `acts` was
                    // split from these inputs and `buf` outlives the product;
                    // `rows` is this thread's chunk of `w`; shapes were checked above.
                    unsafe { amx::gemm_rows(bf16_data(w), k, w.rows, acts, rows, y) }
                })
            });
        }
    }
    products(&|_, _, _| unreachable!("no product runs on the tiles"));
}

/// Computes output columns `rows` of `y` (`n_tok x w.rows`) on this thread.
///
/// # Safety
/// `x` holds `n_tok * w.cols` values, `y` points to `n_tok * w.rows` writable
/// values, `rows` lies within `0..w.rows`, and no other thread writes those columns.
pub unsafe fn matmul_rows(
    isa: Isa,
    w: MatRef<'_>,
    x: &[f32],
    n_tok: usize,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    let layout = bf16_layout(isa, n_tok).filter(|_| matches!(w.data, WeightSlice::Bf16(_)));
    REORDERED.with_borrow_mut(|buf| {
        let inputs = match layout {
            Some(layout) => RowInputs::reorder(layout, x, n_tok, w.cols, buf),
            None => RowInputs::plain(x),
        };
        let tokens = Tokens {
            n: n_tok,
            plan: n_tok,
        };
        // SAFETY: forwarded contract; the inputs were laid out for `isa`.
        unsafe { rows_of(isa, w, inputs, tokens, rows, y) }
    })
}

/// How the bf16 row kernels on `isa` take their inputs for `n_tok` tokens;
/// `None` where no row kernel reads them reordered (the scalar reference,
/// the GEMMs).
fn bf16_layout(isa: Isa, n_tok: usize) -> Option<Bf16Layout> {
    match isa {
        Isa::Scalar => None,
        _ if isa.has_avx512() && n_tok <= GEMV_MAX_TOKENS_BF16 => Some(Bf16Layout::Halves32),
        _ if isa.has_avx2() && n_tok <= GEMV_MAX_TOKENS => Some(Bf16Layout::Halves16),
        _ => None,
    }
}

/// An order of each token's inputs that lets a bf16 row kernel widen its
/// weights without shuffles (see `avx2::deinterleave` and `avx512::deinterleave32`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bf16Layout {
    /// Per 16 inputs the 8 even-indexed, then the 8 odd-indexed; the tail in order.
    Halves16,
    /// Per 32 inputs the 16 even-indexed, then the 16 odd-indexed; the last
    /// 32 padded with zeros.
    Halves32,
}

impl Bf16Layout {
    /// Values per token in this layout for `k` inputs.
    fn stride(self, k: usize) -> usize {
        match self {
            Bf16Layout::Halves16 => k,
            Bf16Layout::Halves32 => k.div_ceil(32) * 32,
        }
    }
}

/// The inputs of a product as the row kernels read them: as given, and
/// reordered for bf16 weights where some job has them.
#[derive(Clone, Copy)]
struct RowInputs<'a> {
    /// `n_tok` tokens of `k` inputs.
    x: &'a [f32],
    /// `x` in `layout`, `layout.stride(k)` values per token; empty without bf16 weights.
    reordered: &'a [f32],
    layout: Option<Bf16Layout>,
}

impl<'a> RowInputs<'a> {
    fn plain(x: &'a [f32]) -> Self {
        RowInputs {
            x,
            reordered: &[],
            layout: None,
        }
    }

    /// `x` (`n_tok` tokens of `k` inputs) with its copy in `layout` made in `buf`.
    fn reorder(
        layout: Bf16Layout,
        x: &'a [f32],
        n_tok: usize,
        k: usize,
        buf: &'a mut Vec<f32>,
    ) -> Self {
        let stride = layout.stride(k);
        buf.resize(n_tok * stride, 0.0);
        for (src, dst) in x
            .chunks_exact(k.max(1))
            .zip(buf.chunks_exact_mut(stride.max(1)))
        {
            match layout {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: this layout is chosen only where the CPU has AVX-512 (`bf16_layout`).
                Bf16Layout::Halves32 => unsafe { avx512::deinterleave32(src, dst) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: this layout is chosen only where the CPU has AVX2.
                Bf16Layout::Halves16 => unsafe { avx2::deinterleave(src, dst) },
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!("no SIMD row kernels on this architecture"),
            }
        }
        RowInputs {
            x,
            reordered: buf,
            layout: Some(layout),
        }
    }

    /// Token `t`'s reordered inputs, `layout` asserted to be what the kernel reads.
    fn token(&self, layout: Bf16Layout, t: usize, k: usize) -> &'a [f32] {
        assert_eq!(
            self.layout,
            Some(layout),
            "bf16 inputs laid out for another kernel"
        );
        let stride = layout.stride(k);
        &self.reordered[t * stride..(t + 1) * stride]
    }
}

/// [`matmul_rows`] with the inputs already laid out.
///
/// # Safety
/// As for [`matmul_rows`], with `inputs.x` as its `x`.
unsafe fn rows_of(
    isa: Isa,
    w: MatRef<'_>,
    inputs: RowInputs<'_>,
    tokens: Tokens,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    let (x, n_tok, plan) = (inputs.x, tokens.n, tokens.plan);
    match isa {
        Isa::Scalar => {
            // SAFETY: forwarded contract.
            unsafe { scalar::matmul_rows(w, x, n_tok, rows, y) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 | Isa::Amx => {
            assert!(isa.has_avx2(), "AVX2 kernel on a CPU without AVX2");
            // SAFETY: forwarded contract; the CPU supports the features (checked
            // above, AVX-512 where that kernel runs).
            unsafe {
                if isa.has_avx512() && plan <= gemv_max_tokens(isa, w) {
                    avx512::gemv_rows(w, inputs, n_tok, rows, y)
                } else if plan <= GEMV_MAX_TOKENS {
                    avx2::gemv_rows(w, inputs, n_tok, rows, y)
                } else if isa.has_avx512() {
                    avx512::gemm_rows(w, x, n_tok, rows, y)
                } else {
                    avx2::gemm_rows(w, x, n_tok, rows, y)
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 | Isa::Avx512 | Isa::Amx => {
            unreachable!("AVX2 is never reported on this architecture")
        }
    }
}

/// Widens a panel of `nr` weight rows starting at `n0` (rows past `n_end` are
/// zero) and inputs `k0..k0+kc` into `pack`, laid out `[k][j]`.
#[allow(clippy::too_many_arguments)]
fn pack_panel(
    w: MatRef<'_>,
    n0: usize,
    n_end: usize,
    k0: usize,
    kc: usize,
    nr: usize,
    pack: &mut [f32],
) {
    let mut row = [0f32; KC];
    for j in 0..nr {
        let r = n0 + j;
        if r < n_end {
            w.data.widen_into(r * w.cols + k0, &mut row[..kc]);
        } else {
            row[..kc].fill(0.0);
        }
        for (k, &v) in row[..kc].iter().enumerate() {
            pack[k * nr + j] = v;
        }
    }
}

/// Packs inputs `k0..k0+kc` of all `n_tok` activation rows (each `k` long)
/// into blocks of `mr` rows laid out `[block][k][row]`, so the micro-kernel
/// reads its broadcasts from one sequential stream. Rows past `n_tok` are zero.
#[allow(clippy::too_many_arguments)]
fn pack_activations(
    x: &[f32],
    k: usize,
    n_tok: usize,
    k0: usize,
    kc: usize,
    mr: usize,
    out: &mut [f32],
) {
    for (mb, block) in out
        .chunks_exact_mut(kc * mr)
        .take(n_tok.div_ceil(mr))
        .enumerate()
    {
        for i in 0..mr {
            let row = mb * mr + i;
            if row < n_tok {
                let src = &x[row * k + k0..row * k + k0 + kc];
                for (kk, &v) in src.iter().enumerate() {
                    block[kk * mr + i] = v;
                }
            } else {
                for kk in 0..kc {
                    block[kk * mr + i] = 0.0;
                }
            }
        }
    }
}

/// The portable reference.
mod scalar {
    use super::*;

    /// # Safety
    /// See [`super::matmul_rows`].
    pub unsafe fn matmul_rows(
        w: MatRef<'_>,
        x: &[f32],
        n_tok: usize,
        rows: std::ops::Range<usize>,
        y: *mut f32,
    ) {
        PACK.with_borrow_mut(|row| {
            row.resize(w.cols, 0.0);
            for r in rows {
                w.widen_row(r, row);
                for t in 0..n_tok {
                    let xt = &x[t * w.cols..(t + 1) * w.cols];
                    let sum: f32 = row.iter().zip(xt).map(|(a, b)| a * b).sum();
                    // SAFETY: caller guarantees `y` covers `n_tok * w.rows` values.
                    unsafe { *y.add(t * w.rows + r) = sum };
                }
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// The sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        // SAFETY: caller guarantees 8 readable values.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        // SAFETY: caller guarantees 8 readable values.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
    }

    /// Bytes ahead of the current position that the row kernels prefetch:
    /// one sequential stream per thread with explicit prefetch measured
    /// fastest here (several interleaved rows confuse the hardware prefetcher).
    const PREFETCH_BYTES: usize = 1024;

    /// Reorders `x` for [`dot_row_bf16`] into `out` (as long): in each block
    /// of 16, the 8 even-indexed values, then the 8 odd-indexed ones. The
    /// tail (past the last full block) is left in order.
    ///
    /// # Safety
    /// The CPU supports AVX2.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn deinterleave(x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), out.len(), "reordered inputs");
        let body = x.len() - x.len() % 16;
        for (src, dst) in x[..body].chunks_exact(16).zip(out.chunks_exact_mut(16)) {
            // SAFETY: both blocks hold 16 values.
            unsafe {
                let (a, b) = (
                    _mm256_loadu_ps(src.as_ptr()),
                    _mm256_loadu_ps(src.as_ptr().add(8)),
                );
                // Per 128-bit half [a0 a2 b0 b2 | a4 a6 b4 b6], then the
                // 64-bit pairs in order: [a0 a2 a4 a6 b0 b2 b4 b6].
                let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
                let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
                let order = |v: __m256| {
                    _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
                };
                _mm256_storeu_ps(dst.as_mut_ptr(), order(even));
                _mm256_storeu_ps(dst.as_mut_ptr().add(8), order(odd));
            }
        }
        out[body..].copy_from_slice(&x[body..]);
    }

    /// Generates the dot products of one weight row of a stored dtype with
    /// `T` f32 vectors: each weight vector is loaded once for all tokens, and
    /// every token's sums take the same steps whatever `T`, so a token's
    /// result does not depend on how many share the pass.
    macro_rules! dot_row_tokens {
        ($name:ident, $t:ty, $load:ident) => {
            /// # Safety
            /// `w` points to `k` values; each of `x` to `k` values.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name<const T: usize>(
                w: *const $t,
                k: usize,
                x: [*const f32; T],
            ) -> [f32; T] {
                let ahead = PREFETCH_BYTES / std::mem::size_of::<$t>();
                let mut acc0 = [_mm256_setzero_ps(); T];
                let mut acc1 = [_mm256_setzero_ps(); T];
                let body = k - k % 16;
                let mut i = 0;
                // SAFETY: every index read is below `k`; the prefetch address
                // is computed without dereferencing and may lie past the row.
                unsafe {
                    while i < body {
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(i + ahead).cast());
                        let (w0, w1) = ($load(w.add(i)), $load(w.add(i + 8)));
                        for t in 0..T {
                            acc0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t].add(i)), acc0[t]);
                            acc1[t] =
                                _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[t].add(i + 8)), acc1[t]);
                        }
                        i += 16;
                    }
                    let mut wt = [0 as $t; 16];
                    std::ptr::copy_nonoverlapping(w.add(body), wt.as_mut_ptr(), k - body);
                    let (w0, w1) = ($load(wt.as_ptr()), $load(wt.as_ptr().add(8)));
                    std::array::from_fn(|t| {
                        let mut xt = [0f32; 16];
                        std::ptr::copy_nonoverlapping(x[t].add(body), xt.as_mut_ptr(), k - body);
                        let a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt.as_ptr()), acc0[t]);
                        let a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt.as_ptr().add(8)), acc1[t]);
                        hsum(_mm256_add_ps(a0, a1))
                    })
                }
            }
        };
    }

    dot_row_tokens!(dot_tokens_f32, f32, load_f32);
    dot_row_tokens!(dot_tokens_f16, u16, load_f16);

    /// Dot products of one bf16 row with `T` vectors reordered by
    /// [`deinterleave`]. A 32-bit lane of 16 loaded bf16 values holds an
    /// even- and an odd-indexed value: shifting left by 16 widens the even
    /// one, masking the low half widens the odd one, so no shuffles are
    /// needed; every 16 weights are widened once for all tokens, and each
    /// token's sums take the same steps whatever `T`.
    ///
    /// # Safety
    /// `w` points to `k` values; each of `xd` to `k` values.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_tokens_bf16<const T: usize>(
        w: *const u16,
        k: usize,
        xd: [*const f32; T],
    ) -> [f32; T] {
        let ahead = PREFETCH_BYTES / 2;
        let mask = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let mut even = [_mm256_setzero_ps(); T];
        let mut odd = [_mm256_setzero_ps(); T];
        let body = k - k % 16;
        let mut i = 0;
        // SAFETY: every index read is below `k`; the prefetch address is
        // computed without dereferencing and may lie past the row.
        unsafe {
            while i < body {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(i + ahead).cast());
                let v = _mm256_loadu_si256(w.add(i).cast());
                let e = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                let o = _mm256_castsi256_ps(_mm256_and_si256(v, mask));
                for t in 0..T {
                    even[t] = _mm256_fmadd_ps(e, _mm256_loadu_ps(xd[t].add(i)), even[t]);
                    odd[t] = _mm256_fmadd_ps(o, _mm256_loadu_ps(xd[t].add(i + 8)), odd[t]);
                }
                i += 16;
            }
            std::array::from_fn(|t| {
                let mut out = hsum(_mm256_add_ps(even[t], odd[t]));
                for j in body..k {
                    out += f32::from_bits((*w.add(j) as u32) << 16) * *xd[t].add(j);
                }
                out
            })
        }
    }

    /// Tokens per pass of the multi-token row kernels: two accumulators
    /// per token, in AVX2's 16 registers.
    const TOKENS_PER_PASS: usize = 4;

    /// # Safety
    /// See [`super::matmul_rows`]; the CPU supports AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_rows(
        w: MatRef<'_>,
        inputs: RowInputs<'_>,
        n_tok: usize,
        rows: std::ops::Range<usize>,
        y: *mut f32,
    ) {
        let (k, n, x) = (w.cols, w.rows, inputs.x);
        // One row against tokens `t0..t0 + T`, each token's sum exactly the
        // one-token kernel's.
        macro_rules! pass {
            ($r:expr, $t0:expr, $T:literal) => {{
                let (r, t0) = ($r, $t0);
                // SAFETY: rows lie within the matrix, tokens within `x`, the
                // reordered inputs and `y` (caller); each token holds `k` values.
                unsafe {
                    let out: [f32; $T] = match w.data {
                        WeightSlice::Bf16(s) => {
                            let xd = std::array::from_fn(|j| {
                                inputs.token(Bf16Layout::Halves16, t0 + j, k).as_ptr()
                            });
                            dot_tokens_bf16::<$T>(s.as_ptr().add(r * k), k, xd)
                        }
                        WeightSlice::F32(s) => {
                            let xp = std::array::from_fn(|j| x.as_ptr().add((t0 + j) * k));
                            dot_tokens_f32::<$T>(s.as_ptr().add(r * k), k, xp)
                        }
                        WeightSlice::F16(s) => {
                            let xp = std::array::from_fn(|j| x.as_ptr().add((t0 + j) * k));
                            dot_tokens_f16::<$T>(s.as_ptr().add(r * k), k, xp)
                        }
                    };
                    for (j, v) in out.into_iter().enumerate() {
                        *y.add((t0 + j) * n + r) = v;
                    }
                }
            }};
        }
        for r in rows {
            let mut t0 = 0;
            while t0 < n_tok {
                let tokens = (n_tok - t0).min(TOKENS_PER_PASS);
                match tokens {
                    1 => pass!(r, t0, 1),
                    2 => pass!(r, t0, 2),
                    3 => pass!(r, t0, 3),
                    _ => pass!(r, t0, 4),
                }
                t0 += tokens;
            }
        }
    }

    /// `c[i, j] (+)= Σ_k a[i, k] · b[k, j]` for `M` rows of a packed
    /// activation block `a` (`a[k * MR + i]`) and the 16 columns of a packed
    /// weight panel `b` (`b[k * 16 + j]`); only the first `ncols` columns are stored.
    ///
    /// # Safety
    /// `a` holds `kc * MR` values, `b` holds `kc * 16` values, `c` has `M`
    /// rows of `ncols` writable values `ldc` apart.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro_kernel<const M: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        ncols: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        // SAFETY: all offsets are within the extents stated above.
        unsafe {
            for k in 0..kc {
                let b0 = _mm256_loadu_ps(b.add(k * NR));
                let b1 = _mm256_loadu_ps(b.add(k * NR + 8));
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let ai = _mm256_broadcast_ss(&*a.add(k * MR + i));
                    acc_i[0] = _mm256_fmadd_ps(ai, b0, acc_i[0]);
                    acc_i[1] = _mm256_fmadd_ps(ai, b1, acc_i[1]);
                }
            }
            for (i, acc_i) in acc.iter().enumerate() {
                let ci = c.add(i * ldc);
                if ncols == NR {
                    let (mut v0, mut v1) = (acc_i[0], acc_i[1]);
                    if accumulate {
                        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(ci));
                        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(ci.add(8)));
                    }
                    _mm256_storeu_ps(ci, v0);
                    _mm256_storeu_ps(ci.add(8), v1);
                } else {
                    let mut tmp = [0f32; NR];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), acc_i[0]);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc_i[1]);
                    for (j, &v) in tmp[..ncols].iter().enumerate() {
                        let dst = ci.add(j);
                        *dst = if accumulate { *dst + v } else { v };
                    }
                }
            }
        }
    }

    /// # Safety
    /// See [`super::matmul_rows`]; the CPU supports AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm_rows(
        w: MatRef<'_>,
        x: &[f32],
        n_tok: usize,
        rows: std::ops::Range<usize>,
        y: *mut f32,
    ) {
        let k = w.cols;
        let ldc = w.rows;
        let m_blocks = n_tok.div_ceil(MR);
        PACK.with_borrow_mut(|pack| {
            PACK_X.with_borrow_mut(|pack_x| {
                pack.resize(KC * NR, 0.0);
                pack_x.resize(m_blocks * KC * MR, 0.0);
                let mut k0 = 0;
                while k0 < k {
                    let kc = KC.min(k - k0);
                    pack_activations(x, k, n_tok, k0, kc, MR, pack_x);
                    let mut n0 = rows.start;
                    while n0 < rows.end {
                        let ncols = NR.min(rows.end - n0);
                        pack_panel(w, n0, rows.end, k0, kc, NR, pack);
                        for mb in 0..m_blocks {
                            let m0 = mb * MR;
                            let m = MR.min(n_tok - m0);
                            // SAFETY: `m` rows from `m0` lie within `y`; columns
                            // `n0..n0+ncols` lie within `rows` (caller); the packed
                            // buffers hold `kc * MR` and `kc * NR` values.
                            unsafe {
                                let a = pack_x.as_ptr().add(mb * kc * MR);
                                let c = y.add(m0 * ldc + n0);
                                let b = pack.as_ptr();
                                let acc = k0 > 0;
                                match m {
                                    6 => micro_kernel::<6>(kc, a, b, c, ldc, ncols, acc),
                                    5 => micro_kernel::<5>(kc, a, b, c, ldc, ncols, acc),
                                    4 => micro_kernel::<4>(kc, a, b, c, ldc, ncols, acc),
                                    3 => micro_kernel::<3>(kc, a, b, c, ldc, ncols, acc),
                                    2 => micro_kernel::<2>(kc, a, b, c, ldc, ncols, acc),
                                    _ => micro_kernel::<1>(kc, a, b, c, ldc, ncols, acc),
                                }
                            }
                        }
                        n0 += NR;
                    }
                    k0 += kc;
                }
            })
        });
    }
}

/// The AVX-512 GEMM: 8 tokens x 32 outputs per micro-kernel call, twice the
/// AVX2 tile's width. Each output is the same chain of fused multiply-adds
/// over the same `KC` chunks as on AVX2, so both give the same bits.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Horizontal sums of `N` vectors. Four at a time they are folded into one
    /// vector by shuffles (14 instructions for 4 sums instead of 4 × 10).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn hsums<const N: usize>(v: [__m512; N]) -> [f32; N] {
        let mut out = [0f32; N];
        let mut i = 0;
        while i + 4 <= N {
            let (a, b, c, d) = (v[i], v[i + 1], v[i + 2], v[i + 3]);
            // 128-bit quarters: [a0+a2, a1+a3, b0+b2, b1+b3], then one quarter per vector.
            let ab = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            );
            let cd = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(c, d),
                _mm512_shuffle_f32x4::<0xEE>(c, d),
            );
            let q = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(ab, cd),
                _mm512_shuffle_f32x4::<0xDD>(ab, cd),
            );
            // Within each quarter, every lane ends up with the quarter's sum.
            let q = _mm512_add_ps(q, _mm512_shuffle_ps::<0b10_11_00_01>(q, q));
            let q = _mm512_add_ps(q, _mm512_shuffle_ps::<0b01_00_11_10>(q, q));
            let sums = _mm512_castps512_ps128(_mm512_permutexvar_ps(
                _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                q,
            ));
            let mut four = [0f32; 4];
            // SAFETY: 4 floats.
            unsafe { _mm_storeu_ps(four.as_mut_ptr(), sums) };
            out[i..i + 4].copy_from_slice(&four);
            i += 4;
        }
        while i < N {
            out[i] = hsum(v[i]);
            i += 1;
        }
        out
    }

    /// The horizontal sum of `v`, adding the same pairs in the same order as
    /// [`hsums`] does four at a time, so a row's sum has the same bits
    /// whether it was one of four or alone (`_mm512_reduce_add_ps` pairs
    /// the lanes of a quarter differently).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn hsum(v: __m512) -> f32 {
        // Quarters 0 and 1: q0+q2 and q1+q3; then quarter 0: their sum.
        let h = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b00_00_11_10>(v, v));
        let q = _mm512_add_ps(h, _mm512_shuffle_f32x4::<0b00_00_00_01>(h, h));
        let q = _mm512_add_ps(q, _mm512_shuffle_ps::<0b10_11_00_01>(q, q));
        let q = _mm512_add_ps(q, _mm512_shuffle_ps::<0b01_00_11_10>(q, q));
        _mm512_cvtss_f32(q)
    }

    /// Rows per pass of the bf16 row kernel for `T` tokens: as many as the
    /// 32 registers hold (one accumulator per row and token, two input
    /// vectors per token). Each row shares the inputs' loads: with one row
    /// per pass a 5-token pass over a 3072-input row re-read 60 KiB of
    /// inputs from L2 for every 6 KiB row.
    const fn bf16_rows_per_pass(t: usize) -> usize {
        if t <= 4 {
            4
        } else if t <= 6 {
            3
        } else {
            2
        }
    }

    /// Lays out one token's inputs for [`bf16_steps`] in `out` (`x` rounded
    /// up to 32 values): per 32 inputs, the 16 even-indexed ones, then the
    /// 16 odd ones; the last 32 padded with zeros.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn deinterleave32(x: &[f32], out: &mut [f32]) {
        assert_eq!(out.len(), x.len().div_ceil(32) * 32, "reordered inputs");
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let body = x.len() - x.len() % 32;
        for (src, dst) in x[..body].chunks_exact(32).zip(out.chunks_exact_mut(32)) {
            // SAFETY: both blocks hold 32 values.
            unsafe {
                let (a, b) = (
                    _mm512_loadu_ps(src.as_ptr()),
                    _mm512_loadu_ps(src.as_ptr().add(16)),
                );
                _mm512_storeu_ps(dst.as_mut_ptr(), _mm512_permutex2var_ps(a, even, b));
                _mm512_storeu_ps(dst.as_mut_ptr().add(16), _mm512_permutex2var_ps(a, odd, b));
            }
        }
        let tail = &mut out[body..];
        tail.fill(0.0);
        for (j, &v) in x[body..].iter().enumerate() {
            tail[(j % 2) * 16 + j / 2] = v;
        }
    }

    /// Most bytes of reordered inputs a pass streams over whole rows; with
    /// more, [`bf16_token_rows`] runs its passes over chunks of [`CHUNK_STEPS`]
    /// steps, so the inputs stay in L1 (48 KiB here) while the weights
    /// stream past them: a 5-token pass over 3072-input rows (60 KiB of
    /// inputs) otherwise re-read them from L2 for every pass of rows.
    const WHOLE_ROW_INPUT_BYTES: usize = 24 * 1024;
    /// Steps of 32 inputs per chunk when the inputs are chunked.
    const CHUNK_STEPS: usize = 32;
    /// Passes of rows that take their turn over one chunk of the inputs.
    const GROUP_PASSES: usize = 8;

    /// Accumulates steps `steps` (of 32 inputs; `k / 32` means the masked
    /// tail step) of rows `r0..r0+R` of a bf16 matrix against `T` tokens
    /// laid out by [`deinterleave32`], into `acc`. A 32-bit lane of 32
    /// loaded bf16 values holds an even- and an odd-indexed value: a shift
    /// widens the even one, a mask the odd one; each token's inputs are
    /// loaded once for all `R` rows. Each row prefetches the element
    /// `ahead` elements past the one it reads: where the rows of the next
    /// pass read the same step.
    ///
    /// Every accumulator takes its steps in order whatever the chunking,
    /// so a row's sums do not depend on the number of tokens or chunks.
    ///
    /// # Safety
    /// Rows `r0..r0+R` lie within `w` (`k` values each, at `w`); the steps
    /// lie within `0..=k / 32`; `xd` holds `T` tokens of `padded` values;
    /// the CPU supports AVX-512 F/BW.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn bf16_steps<const R: usize, const T: usize>(
        w: *const u16,
        k: usize,
        r0: usize,
        steps: std::ops::Range<usize>,
        ahead: isize,
        xd: *const f32,
        padded: usize,
        acc: &mut [[__m512; T]; R],
    ) {
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let (full, rest) = (k / 32, k % 32);
        let mut a = *acc;
        // SAFETY: every read lies within the rows and the tokens (caller);
        // prefetch addresses are not dereferenced.
        unsafe {
            let rows: [*const u16; R] = std::array::from_fn(|r| w.add((r0 + r) * k));
            macro_rules! step {
                ($c:expr, $load:expr) => {{
                    let c = $c;
                    let x: [(__m512, __m512); T] = std::array::from_fn(|t| {
                        let p = xd.add(t * padded + c * 32);
                        (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                    });
                    for (acc_r, &row) in a.iter_mut().zip(&rows) {
                        let v: __m512i = $load(row);
                        let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                        let odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
                        for (acc_t, &(xe, xo)) in acc_r.iter_mut().zip(&x) {
                            *acc_t = _mm512_fmadd_ps(odd, xo, _mm512_fmadd_ps(even, xe, *acc_t));
                        }
                    }
                }};
            }
            for c in steps.start..steps.end.min(full) {
                step!(c, |row: *const u16| {
                    let p = row.add(c * 32);
                    // The same inputs of the next pass's rows, whatever the
                    // row length (a fixed 4 KiB fell inside this pass's own
                    // rows once they were 2 KiB or longer).
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_offset(ahead).cast());
                    _mm512_loadu_si512(p.cast())
                });
            }
            if rest > 0 && steps.end > full {
                let mask = (1u32 << rest) - 1;
                step!(full, |row: *const u16| {
                    _mm512_maskz_loadu_epi16(mask, row.add(full * 32).cast())
                });
            }
        }
        *acc = a;
    }

    /// Rows `rows` of a bf16 matrix against `T` tokens laid out by
    /// [`deinterleave32`] (`padded` values apart from `xd`), written to
    /// tokens `0..T` of `y` (`n` outputs per token): passes of `R` rows
    /// (single rows for a tail), over chunks of the inputs where they
    /// would not stay in L1.
    ///
    /// # Safety
    /// `rows` lies within `w` (`n` rows of `k`); `xd` holds `T` tokens of
    /// `padded` values; `y` has `T` rows of `n` writable values; the CPU
    /// supports AVX-512 F/BW.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn bf16_token_rows<const R: usize, const T: usize>(
        w: *const u16,
        k: usize,
        n: usize,
        rows: std::ops::Range<usize>,
        xd: *const f32,
        padded: usize,
        y: *mut f32,
    ) {
        // Whole steps plus the masked tail step, if any.
        let steps = padded / 32;
        let chunk = if T * padded * 4 <= WHOLE_ROW_INPUT_BYTES {
            steps
        } else {
            CHUNK_STEPS
        };
        let put = |row: usize, out: [f32; T]| {
            for (t, v) in out.into_iter().enumerate() {
                // SAFETY: `row < n` and `t < T` (caller's extent of `y`).
                unsafe { *y.add(t * n + row) = v };
            }
        };
        let mut acc = [[[_mm512_setzero_ps(); T]; R]; GROUP_PASSES];
        let mut r = rows.start;
        while r + R <= rows.end {
            let passes = ((rows.end - r) / R).min(GROUP_PASSES);
            acc[..passes].fill([[_mm512_setzero_ps(); T]; R]);
            let mut c0 = 0;
            while c0 < steps {
                let c1 = (c0 + chunk).min(steps);
                for (p, acc_p) in acc[..passes].iter_mut().enumerate() {
                    let row0 = r + p * R;
                    // Where the next pass starts: the next rows at this
                    // chunk, else the group's first rows at the next chunk,
                    // else the next group.
                    let (next_row, next_step) = if p + 1 < passes {
                        (row0 + R, c0)
                    } else if c1 < steps {
                        (r, c1)
                    } else {
                        (r + passes * R, 0)
                    };
                    let ahead =
                        (next_row * k + next_step * 32) as isize - (row0 * k + c0 * 32) as isize;
                    // SAFETY: rows `row0..row0+R` lie within `rows`; the
                    // steps within the row (caller).
                    unsafe { bf16_steps::<R, T>(w, k, row0, c0..c1, ahead, xd, padded, acc_p) };
                }
                c0 = c1;
            }
            for (p, acc_p) in acc[..passes].iter().enumerate() {
                for (i, &acc_r) in acc_p.iter().enumerate() {
                    put(r + p * R + i, hsums(acc_r));
                }
            }
            r += passes * R;
        }
        for row in r..rows.end {
            let mut one = [[_mm512_setzero_ps(); T]; 1];
            // SAFETY: `row` lies within `rows` (caller).
            unsafe { bf16_steps::<1, T>(w, k, row, 0..steps, k as isize, xd, padded, &mut one) };
            put(row, hsums(one[0]));
        }
    }

    /// Decode and short passes over bf16 weights (up to [`GEMV_MAX_TOKENS_BF16`]
    /// tokens, in passes of up to 8 over each row); other dtypes take the
    /// AVX2 row kernels.
    ///
    /// # Safety
    /// See [`super::matmul_rows`]; the CPU supports AVX-512 F/BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn gemv_rows(
        w: MatRef<'_>,
        inputs: RowInputs<'_>,
        n_tok: usize,
        rows: std::ops::Range<usize>,
        y: *mut f32,
    ) {
        let WeightSlice::Bf16(s) = w.data else {
            // SAFETY: forwarded contract; AVX-512 implies AVX2, FMA and F16C here.
            return unsafe { super::avx2::gemv_rows(w, inputs, n_tok, rows, y) };
        };
        let (k, n) = (w.cols, w.rows);
        let padded = Bf16Layout::Halves32.stride(k);
        // The tokens are `padded` apart in one buffer: check its extent once.
        let xd = inputs.token(Bf16Layout::Halves32, 0, k).as_ptr();
        assert!(inputs.reordered.len() >= n_tok * padded, "reordered inputs");
        // Blocks of rows small enough to stay in L2 while every pass of
        // up to 8 tokens runs over them: more tokens than one pass read the
        // weights from memory once, not once per pass. Each (row, token)
        // is computed alike whatever the block.
        let block_rows = (BLOCK_BYTES / (2 * k)).max(1);
        let mut r0 = rows.start;
        while r0 < rows.end {
            let block = r0..(r0 + block_rows).min(rows.end);
            let mut t0 = 0;
            while t0 < n_tok {
                let tokens = (n_tok - t0).min(8);
                macro_rules! run {
                    ($t:literal) => {{
                        const R: usize = bf16_rows_per_pass($t);
                        // SAFETY: `block` lies within `rows`, within `w`;
                        // tokens `t0..t0+$t` lie within the inputs (checked)
                        // and `y` (caller).
                        unsafe {
                            bf16_token_rows::<R, $t>(
                                s.as_ptr(),
                                k,
                                n,
                                block.clone(),
                                xd.add(t0 * padded),
                                padded,
                                y.add(t0 * n),
                            )
                        }
                    }};
                }
                match tokens {
                    1 => run!(1),
                    2 => run!(2),
                    3 => run!(3),
                    4 => run!(4),
                    5 => run!(5),
                    6 => run!(6),
                    7 => run!(7),
                    _ => run!(8),
                }
                t0 += tokens;
            }
            r0 = block.end;
        }
    }

    /// Bytes of weights a block of rows of [`gemv_rows`] spans.
    const BLOCK_BYTES: usize = 256 << 10;

    /// Outputs per packed panel: two 16-lane vectors.
    const NR: usize = 32;
    /// Tokens per micro-kernel call (16 accumulators).
    const MR: usize = 8;

    /// `c (+)= a · b` for `M` tokens of the packed activations `a`
    /// (`a[k * MR + i]`) and the 32-output panel `b` (`b[k * 32 + j]`);
    /// only the first `ncols` outputs are stored.
    ///
    /// # Safety
    /// `a` holds `kc * MR` values, `b` `kc * 32`, and `c` has `M` rows of
    /// `ncols` writable values `ldc` apart; the CPU supports AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro_kernel<const M: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        ncols: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        // SAFETY: all offsets are within the extents stated above.
        unsafe {
            for k in 0..kc {
                let b0 = _mm512_loadu_ps(b.add(k * NR));
                let b1 = _mm512_loadu_ps(b.add(k * NR + 16));
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*a.add(k * MR + i));
                    acc_i[0] = _mm512_fmadd_ps(ai, b0, acc_i[0]);
                    acc_i[1] = _mm512_fmadd_ps(ai, b1, acc_i[1]);
                }
            }
            let lo = ncols.min(16);
            let masks = [
                ((1u32 << lo) - 1) as u16,
                ((1u32 << (ncols - lo)) - 1) as u16,
            ];
            for (i, acc_i) in acc.iter().enumerate() {
                for (h, (&mask, &v)) in masks.iter().zip(acc_i).enumerate() {
                    let dst = c.add(i * ldc + 16 * h);
                    let v = if accumulate {
                        _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst))
                    } else {
                        v
                    };
                    _mm512_mask_storeu_ps(dst, mask, v);
                }
            }
        }
    }

    /// # Safety
    /// See [`super::matmul_rows`]; the CPU supports AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gemm_rows(
        w: MatRef<'_>,
        x: &[f32],
        n_tok: usize,
        rows: std::ops::Range<usize>,
        y: *mut f32,
    ) {
        let (k, ldc) = (w.cols, w.rows);
        let m_blocks = n_tok.div_ceil(MR);
        PACK.with_borrow_mut(|pack| {
            PACK_X.with_borrow_mut(|pack_x| {
                pack.resize(KC * NR, 0.0);
                pack_x.resize(m_blocks * KC * MR, 0.0);
                let mut k0 = 0;
                while k0 < k {
                    let kc = KC.min(k - k0);
                    pack_activations(x, k, n_tok, k0, kc, MR, pack_x);
                    let mut n0 = rows.start;
                    while n0 < rows.end {
                        let ncols = NR.min(rows.end - n0);
                        pack_panel(w, n0, rows.end, k0, kc, NR, pack);
                        for mb in 0..m_blocks {
                            let m0 = mb * MR;
                            // SAFETY: `MR.min(n_tok - m0)` rows from `m0` lie
                            // within `y`; columns `n0..n0+ncols` within `rows`
                            // (caller); the packed buffers hold what is read.
                            unsafe {
                                let a = pack_x.as_ptr().add(mb * kc * MR);
                                let c = y.add(m0 * ldc + n0);
                                let b = pack.as_ptr();
                                let acc = k0 > 0;
                                match MR.min(n_tok - m0) {
                                    8 => micro_kernel::<8>(kc, a, b, c, ldc, ncols, acc),
                                    7 => micro_kernel::<7>(kc, a, b, c, ldc, ncols, acc),
                                    6 => micro_kernel::<6>(kc, a, b, c, ldc, ncols, acc),
                                    5 => micro_kernel::<5>(kc, a, b, c, ldc, ncols, acc),
                                    4 => micro_kernel::<4>(kc, a, b, c, ldc, ncols, acc),
                                    3 => micro_kernel::<3>(kc, a, b, c, ldc, ncols, acc),
                                    2 => micro_kernel::<2>(kc, a, b, c, ldc, ncols, acc),
                                    _ => micro_kernel::<1>(kc, a, b, c, ldc, ncols, acc),
                                }
                            }
                        }
                        n0 += NR;
                    }
                    k0 += kc;
                }
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Exact f64 product of the widened weights, the ground truth for all paths.
    fn reference(w: MatRef<'_>, x: &[f32], n_tok: usize) -> Vec<f32> {
        let mut y = vec![0f32; n_tok * w.rows];
        for t in 0..n_tok {
            for r in 0..w.rows {
                let s: f64 = (0..w.cols)
                    .map(|k| w.data.get(r * w.cols + k) as f64 * x[t * w.cols + k] as f64)
                    .sum();
                y[t * w.rows + r] = s as f32;
            }
        }
        y
    }

    #[test]
    fn every_supported_path_matches_the_reference_for_every_dtype() {
        let pools = [ThreadPool::new(1).unwrap(), ThreadPool::new(3).unwrap()];
        let mut seed = 7;
        // Shapes with ragged edges in every dimension.
        // Whole 32-input steps with 1-3 blocks of 16 rows and a tail of rows
        // (the tile unit's short passes), and ragged edges in every dimension.
        for &(rows, cols) in &[
            (1, 1),
            (5, 7),
            (16, 16),
            (37, 300),
            (64, 513),
            (130, 1000),
            (99, 96),
        ] {
            let wf: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let wb: Vec<u16> = wf.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
            let wh: Vec<u16> = wf.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
            for data in [
                WeightSlice::F32(&wf),
                WeightSlice::Bf16(&wb),
                WeightSlice::F16(&wh),
            ] {
                let w = MatRef::new(data, rows, cols).unwrap();
                // Above 4 tokens (16 for bf16 on AVX-512, in passes of up to
                // 8) the GEMM runs, in tiles of 6 (AVX2) or 8 (AVX-512)
                // tokens, or 16 (AMX, bf16, in pairs of tiles): these counts
                // reach tails of every length.
                for n_tok in (0..=24).chain([29, 31, 47]) {
                    let x: Vec<f32> = (0..n_tok * cols).map(|_| lcg(&mut seed)).collect();
                    let want = reference(w, &x, n_tok);
                    if Isa::Avx512.is_supported() && n_tok > gemv_max_tokens(Isa::Avx512, w) {
                        // The GEMMs: the same FMA chains over the same chunks, the same bits.
                        let (mut wide, mut narrow) =
                            (vec![0f32; n_tok * rows], vec![0f32; n_tok * rows]);
                        matmul(&pools[1], Isa::Avx512, w, &x, n_tok, &mut wide);
                        matmul(&pools[1], Isa::Avx2, w, &x, n_tok, &mut narrow);
                        assert_eq!(wide, narrow, "AVX-512 vs AVX2 {rows}x{cols} n_tok={n_tok}");
                    }
                    #[cfg(target_arch = "x86_64")]
                    if cols == 96 && matches!(data, WeightSlice::Bf16(_)) {
                        assert_eq!(
                            uses_amx_short(Isa::Amx, w, n_tok),
                            Isa::Amx.is_supported() && (8..=16).contains(&n_tok),
                        );
                    }
                    for isa in Isa::supported() {
                        for pool in &pools {
                            let mut y = vec![f32::NAN; n_tok * rows];
                            matmul(pool, isa, w, &x, n_tok, &mut y);
                            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                                let tol = 1e-5 * (cols as f32).sqrt() * 4.0;
                                assert!(
                                    (a - b).abs() <= tol,
                                    "{isa:?} {rows}x{cols} n_tok={n_tok} at {i}: {a} vs {b}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The row kernels give each token the sums it gets alone, bit for bit,
    /// however many tokens share the pass (and however the bf16 kernel
    /// chunks the inputs to keep them in L1): a verifying pass must repeat
    /// the logits of one-token decoding exactly.
    #[test]
    fn row_kernels_give_a_token_the_same_bits_in_any_pass() {
        let pool = ThreadPool::new(2).unwrap();
        let mut seed = 5;
        // 3000 inputs: a 3-token pass and longer chunks its inputs (with a
        // masked tail step); 200 rows: passes, groups and single tail rows.
        let (rows, cols) = (200, 3000);
        let wf: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
        let wb: Vec<u16> = wf.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let wh: Vec<u16> = wf.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
        let x: Vec<f32> = (0..GEMV_MAX_TOKENS_BF16 * cols)
            .map(|_| lcg(&mut seed))
            .collect();
        let mut checked = 0;
        for isa in Isa::supported()
            .into_iter()
            .filter(|&isa| matches!(isa, Isa::Avx2 | Isa::Avx512))
        {
            for (name, data) in [
                ("f32", WeightSlice::F32(&wf)),
                ("bf16", WeightSlice::Bf16(&wb)),
                ("f16", WeightSlice::F16(&wh)),
            ] {
                let w = MatRef::new(data, rows, cols).unwrap();
                let alone: Vec<Vec<f32>> = (0..GEMV_MAX_TOKENS_BF16)
                    .map(|t| {
                        let mut y = vec![0f32; rows];
                        matmul(&pool, isa, w, &x[t * cols..(t + 1) * cols], 1, &mut y);
                        y
                    })
                    .collect();
                for n_tok in 2..=gemv_max_tokens(isa, w) {
                    let mut y = vec![0f32; n_tok * rows];
                    matmul(&pool, isa, w, &x[..n_tok * cols], n_tok, &mut y);
                    for (t, want) in alone.iter().take(n_tok).enumerate() {
                        let got = &y[t * rows..(t + 1) * rows];
                        assert!(
                            got.iter()
                                .zip(want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?} {name} token {t} of {n_tok}"
                        );
                    }
                    checked += 1;
                }
            }
        }
        // AVX2 passes of 2-4 tokens for 3 dtypes, AVX-512's bf16 passes of 2-16.
        let want = if Isa::Avx512.is_supported() {
            9 + 6 + 15
        } else if Isa::Avx2.is_supported() {
            9
        } else {
            0
        };
        assert_eq!(checked, want, "row-kernel passes compared");
    }

    /// The tile path over more output rows than one packed panel holds, with
    /// a tail of rows, and token counts with one, two and three token blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tile_products_span_panels_and_token_blocks() {
        if !Isa::Amx.is_supported() {
            return;
        }
        let pool = ThreadPool::new(2).unwrap();
        let mut seed = 11;
        let (rows, cols) = (300, 2048);
        let wb: Vec<u16> = (0..rows * cols)
            .map(|_| bf16::from_f32(lcg(&mut seed)).to_bits())
            .collect();
        let w = MatRef::new(WeightSlice::Bf16(&wb), rows, cols).unwrap();
        for n_tok in [17, 40] {
            assert!(uses_amx(Isa::Amx, w, n_tok));
            let x: Vec<f32> = (0..n_tok * cols).map(|_| lcg(&mut seed)).collect();
            let want = reference(w, &x, n_tok);
            let mut y = vec![f32::NAN; n_tok * rows];
            matmul(&pool, Isa::Amx, w, &x, n_tok, &mut y);
            let tol = 4e-5 * (cols as f32).sqrt();
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= tol, "n_tok={n_tok} at {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn fused_jobs_equal_separate_products() {
        let pool = ThreadPool::new(2).unwrap();
        let mut seed = 3;
        let cols = 40;
        let wa: Vec<f32> = (0..33 * cols).map(|_| lcg(&mut seed)).collect();
        let wb: Vec<f32> = (0..17 * cols).map(|_| lcg(&mut seed)).collect();
        let ma = MatRef::new(WeightSlice::F32(&wa), 33, cols).unwrap();
        let mb = MatRef::new(WeightSlice::F32(&wb), 17, cols).unwrap();
        for n_tok in [1, 9] {
            let x: Vec<f32> = (0..n_tok * cols).map(|_| lcg(&mut seed)).collect();
            for isa in Isa::supported() {
                let (mut ya, mut yb) = (vec![0f32; n_tok * 33], vec![0f32; n_tok * 17]);
                matmul_many(
                    &pool,
                    isa,
                    &mut [
                        MatmulJob { w: ma, y: &mut ya },
                        MatmulJob { w: mb, y: &mut yb },
                    ],
                    &x,
                    n_tok,
                );
                let (mut sa, mut sb) = (vec![0f32; n_tok * 33], vec![0f32; n_tok * 17]);
                matmul(&pool, isa, ma, &x, n_tok, &mut sa);
                matmul(&pool, isa, mb, &x, n_tok, &mut sb);
                assert_eq!(ya, sa);
                assert_eq!(yb, sb);
            }
        }
    }
}
