//! Products of activations with quantized matrices, split across the pool.

use super::acts::{ActPrecision, QuantizedActs, prepare_token};
use super::{QuantLayout, QuantMatRef, Rotation};
use crate::cpu::Isa;
use crate::hadamard::{BLOCK, hadamard_blocks};
use crate::matmul::{GEMV_MAX_TOKENS, ProductMode};
use crate::ops;
use crate::pool::{ChunkQueue, ThreadPool, split_range};
use std::cell::RefCell;

/// Most products one [`qmatmul_many`] call fuses.
pub const MAX_FUSED: usize = 4;

/// Fewest output rows a thread takes at once: below this, taking a chunk
/// and setting up its kernels would cost more than the rows.
const MIN_CHUNK_ROWS: usize = 64;

thread_local! {
    /// Activations of the current product, prepared by the calling thread.
    static ACTS: RefCell<QuantizedActs> = RefCell::new(QuantizedActs::default());
    /// Per-thread buffer for a dequantized row (f32 activations).
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One quantized matrix of a fused product: all jobs read the same input and
/// write their own output (`n_tok x w.rows`, row-major).
pub struct QuantJob<'a> {
    /// The weights.
    pub w: QuantMatRef<'a>,
    /// `S_out` when the matrix is rotated (then `sign_in` of the call is set too).
    pub sign_out: Option<&'a [f32]>,
    /// The output.
    pub y: &'a mut [f32],
}

/// `y = x · Wᵀ` for one quantized matrix.
#[allow(clippy::too_many_arguments)]
pub fn qmatmul(
    pool: &ThreadPool,
    isa: Isa,
    precision: ActPrecision,
    w: QuantMatRef<'_>,
    rotation: Option<Rotation<'_>>,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
) {
    let job = QuantJob {
        w,
        sign_out: rotation.map(|r| r.sign_out),
        y,
    };
    qmatmul_many(
        pool,
        isa,
        precision,
        &mut [job],
        rotation.map(|r| r.sign_in),
        x,
        n_tok,
    );
}

struct SyncPtr<T>(*mut T);
// SAFETY: threads write disjoint parts of the buffers, see the users.
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// A fused job as the threads see it: weights, output signs, output.
type Target<'a> = (QuantMatRef<'a>, Option<&'a [f32]>, SyncPtr<f32>);

/// [`qmatmul_many_in`] with the fastest kernels ([`ProductMode::Fast`]).
pub fn qmatmul_many(
    pool: &ThreadPool,
    isa: Isa,
    precision: ActPrecision,
    jobs: &mut [QuantJob<'_>],
    sign_in: Option<&[f32]>,
    x: &[f32],
    n_tok: usize,
) {
    let cx = (pool, isa, precision, ProductMode::Fast);
    qmatmul_many_in(cx, jobs, sign_in, x, n_tok);
}

/// Several quantized products sharing their input (and its signs `S_in`),
/// as one piece of work on the pool, with the kernels `mode` allows.
///
/// Panics if shapes or rotations disagree: that is a bug in the caller.
pub fn qmatmul_many_in(
    (pool, isa, precision, mode): (&ThreadPool, Isa, ActPrecision, ProductMode),
    jobs: &mut [QuantJob<'_>],
    sign_in: Option<&[f32]>,
    x: &[f32],
    n_tok: usize,
) {
    let Some(first) = jobs.first() else { return };
    let k = first.w.cols;
    assert!(
        jobs.len() <= MAX_FUSED,
        "at most {MAX_FUSED} fused products"
    );
    assert!(
        crate::holds(x.len(), n_tok, k),
        "quantized matmul input too short"
    );
    if let Some(s) = sign_in {
        assert_eq!(s.len(), k, "input signs do not match the inputs");
    }
    for job in jobs.iter() {
        assert_eq!(job.w.cols, k, "fused matmul inputs differ");
        assert!(
            crate::holds(job.y.len(), n_tok, job.w.rows),
            "matmul output too short"
        );
        assert_eq!(
            job.sign_out.is_some(),
            sign_in.is_some(),
            "partial rotation"
        );
        if let Some(s) = job.sign_out {
            assert_eq!(s.len(), job.w.rows, "output signs do not match the outputs");
        }
    }
    let mut slots: [Option<Target<'_>>; MAX_FUSED] = [const { None }; MAX_FUSED];
    for (slot, job) in slots.iter_mut().zip(jobs.iter_mut()) {
        *slot = Some((job.w, job.sign_out, SyncPtr(job.y.as_mut_ptr())));
    }
    let targets = &slots[..jobs.len()];
    let total_rows: usize = targets.iter().flatten().map(|(w, ..)| w.rows).sum();
    ACTS.with_borrow_mut(|acts| {
        acts.resize(n_tok, k);
        prepare(pool, isa, acts, x, sign_in, precision);
        let acts = &*acts;
        let queue = ChunkQueue::new(total_rows, pool.n_threads(), BLOCK, MIN_CHUNK_ROWS);
        pool.run(&|tid, _| {
            while let Some(mine) = queue.next_chunk(tid) {
                let mut base = 0;
                for (w, sign_out, y) in targets.iter().flatten() {
                    let start = mine.start.max(base);
                    let end = mine.end.min(base + w.rows);
                    if start < end {
                        let rows = start - base..end - base;
                        // SAFETY: shapes were checked above; this thread alone
                        // writes columns `rows` of this output (its chunk).
                        unsafe {
                            let plan = mode.dispatch_tokens(n_tok);
                            rows_product((isa, precision, plan), *w, acts, rows.clone(), y.get());
                            if let Some(signs) = sign_out {
                                rotate_output(isa, y.get(), n_tok, w.rows, rows, signs);
                            }
                        }
                    }
                    base += w.rows;
                }
            }
        });
    });
}

/// Rotates and quantizes the activations, in parallel for long inputs.
fn prepare(
    pool: &ThreadPool,
    isa: Isa,
    acts: &mut QuantizedActs,
    x: &[f32],
    sign_in: Option<&[f32]>,
    precision: ActPrecision,
) {
    let n_tok = acts.n_tok;
    // From two tokens on, the threads share them: a 5-token pass on 2
    // threads spent 5% of its time rotating and quantizing on one.
    if n_tok == 1 || pool.n_threads() == 1 {
        acts.prepare_rows(isa, x, sign_in, precision, 0..n_tok);
        return;
    }
    let k = acts.k;
    let shared = acts.shared();
    pool.run(&|tid, n_threads| {
        for t in split_range(n_tok, n_threads, tid, 1) {
            // SAFETY: `acts` was sized for `n_tok` tokens and stays borrowed
            // here; each thread takes only the tokens of its own range.
            let out = unsafe { shared.token(t) };
            prepare_token(isa, &x[t * k..(t + 1) * k], sign_in, precision, out);
        }
    });
}

/// `y[t, r] = S_out·H` over output rows `rows` (aligned to 32) of every token.
///
/// # Safety
/// `y` holds `n_tok x n` values and this thread alone writes columns `rows`.
unsafe fn rotate_output(
    isa: Isa,
    y: *mut f32,
    n_tok: usize,
    n: usize,
    rows: std::ops::Range<usize>,
    signs: &[f32],
) {
    for t in 0..n_tok {
        // SAFETY: within the output (caller).
        let seg = unsafe { std::slice::from_raw_parts_mut(y.add(t * n + rows.start), rows.len()) };
        hadamard_blocks(isa, seg);
        for (v, &s) in seg.iter_mut().zip(&signs[rows.clone()]) {
            *v *= s;
        }
    }
}

/// Output columns `rows` of `y` on this thread, with the kernels chosen as
/// for `plan` tokens ([`ProductMode::dispatch_tokens`]).
///
/// # Safety
/// `y` points to `acts.n_tok * w.rows` writable values, `rows` lies within
/// `0..w.rows`, no other thread writes those columns, and `acts` was prepared
/// with `precision` for `w.cols` inputs.
unsafe fn rows_product(
    (isa, precision, plan): (Isa, ActPrecision, usize),
    w: QuantMatRef<'_>,
    acts: &QuantizedActs,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    match (isa, precision) {
        (_, ActPrecision::F32) => {
            // SAFETY: forwarded contract.
            unsafe { f32_rows(isa, w, acts, rows, y) }
        }
        (Isa::Scalar, ActPrecision::Int8) => {
            // SAFETY: forwarded contract.
            unsafe { int8_rows_scalar(w, acts, rows, y) }
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::Avx512 | Isa::Amx, ActPrecision::Int8) => {
            assert!(isa.has_avx2(), "AVX2 kernel on a CPU without AVX2");
            let strips = w.layout == QuantLayout::Strips;
            // SAFETY: forwarded contract; the CPU supports AVX2, and AVX-512
            // where that kernel runs (checked).
            unsafe {
                if isa.has_avx512() && plan <= super::avx512::GEMV_MAX_TOKENS {
                    if strips {
                        super::avx512::gemv_strips(w, acts, rows, y)
                    } else {
                        super::avx512::gemv_rows(w, acts, rows, y)
                    }
                } else if strips && plan <= GEMV_MAX_TOKENS {
                    // Strips are made for AVX-512 machines; at a lower level
                    // (comparisons, tests) the reference computes them.
                    int8_rows_scalar(w, acts, rows, y)
                } else if plan <= GEMV_MAX_TOKENS {
                    super::avx2::gemv_rows(w, acts, rows, y)
                } else if isa.has_avx512() {
                    super::avx512::gemm_rows(w, acts, rows, y)
                } else {
                    super::avx2::gemm_rows(w, acts, rows, y)
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        (Isa::Avx2 | Isa::Avx512 | Isa::Amx, _) => {
            unreachable!("AVX2 is never reported on this architecture")
        }
    }
}

/// Float activations: each row is dequantized once, then dotted with every token.
///
/// # Safety
/// See [`rows_product`].
unsafe fn f32_rows(
    isa: Isa,
    w: QuantMatRef<'_>,
    acts: &QuantizedActs,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    let k = w.cols;
    ROW.with_borrow_mut(|row| {
        row.resize(k, 0.0);
        for r in rows {
            w.dequantize_row(r, row);
            for t in 0..acts.n_tok {
                let v = ops::dot(isa, row, &acts.x[t * k..(t + 1) * k]);
                // SAFETY: within the output (caller).
                unsafe { *y.add(t * w.rows + r) = v };
            }
        }
    });
}

/// The integer reference: exact int32 dot products per block of 32, then
/// `Σ_blocks s_w · (s_x · Σ q_w q_x − z · s_x Σ q_x)`.
///
/// # Safety
/// See [`rows_product`].
unsafe fn int8_rows_scalar(
    w: QuantMatRef<'_>,
    acts: &QuantizedActs,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    let k = w.cols;
    let nb = k / BLOCK;
    let per_group = w.group / BLOCK;
    for r in rows {
        for t in 0..acts.n_tok {
            let xq = &acts.codes[t * k..(t + 1) * k];
            let mut acc = 0f32;
            for b in 0..nb {
                let g = b / per_group;
                let (s, z) = (w.scale(r, g), w.zero(r, g));
                let dot: i32 = (b * BLOCK..(b + 1) * BLOCK)
                    .map(|c| w.code(r, c) * i32::from(xq[c]))
                    .sum();
                let (sx, sum) = (acts.scales[t * nb + b], acts.sums[t * nb + b]);
                acc += s * (sx * dot as f32 - z as f32 * sum);
            }
            // SAFETY: within the output (caller).
            unsafe { *y.add(t * w.rows + r) = acc };
        }
    }
}
