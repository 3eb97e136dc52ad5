//! Hessian-aware rounding (GPTQ, Frantar et al. 2022) for q4 and q8.
//!
//! Round-to-nearest ([`super::quantize_matrix`]) keeps each weight close;
//! what matters is the layer's output on real inputs, `‖(W − Q)·X‖²` =
//! `tr((W − Q)·H·(W − Q)ᵀ)` with `H = Σ x·xᵀ` the inputs' second moment
//! ([`Hessian`]). GPTQ quantizes a row's inputs in order and moves each
//! one's rounding error onto the inputs not yet quantized, weighted by the
//! inverse of `H` (through the upper Cholesky factor `U` of `H⁻¹`), so
//! that correlated inputs absorb it. A group's scale and zero point are
//! chosen when the loop reaches its first input, from the values as the
//! errors of the earlier inputs left them. The result is an ordinary
//! quantized matrix: the format and the kernels do not change.
//!
//! Rows are independent given `U`: threads take batches of rows, each batch
//! reading every row of `U` once.

use super::{QuantFormat, QuantLayout, QuantizedMatrix, check_shape, layout_sizes, pack_group};
use super::{q4_group, q8_scale};
use crate::cpu::Isa;
use crate::pool::{ThreadPool, split_range};
use half::bf16;

/// The second moment `Σ x·xᵀ` of a layer's inputs (`n` values each),
/// accumulated token by token in f64.
#[derive(Clone, Debug)]
pub struct Hessian {
    n: usize,
    /// Row-major `n x n`; only the lower triangle is accumulated.
    sum: Vec<f64>,
    tokens: usize,
}

impl Hessian {
    /// An empty accumulator for inputs of `n` values.
    pub fn new(n: usize) -> Self {
        Hessian {
            n,
            sum: vec![0.0; n * n],
            tokens: 0,
        }
    }

    /// Inputs per token.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Tokens added so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Adds tokens `x` (`x.len() / n` of them, `n` values each).
    ///
    /// Panics if `x` is not whole tokens: that is a bug in the caller.
    pub fn add(&mut self, x: &[f32]) {
        let n = self.n;
        assert!(
            n > 0 && x.len().is_multiple_of(n),
            "Hessian inputs are not whole tokens"
        );
        for token in x.chunks_exact(n) {
            for (i, &xi) in token.iter().enumerate() {
                let xi = xi as f64;
                let row = &mut self.sum[i * n..i * n + i + 1];
                for (h, &xj) in row.iter_mut().zip(&token[..=i]) {
                    *h += xi * xj as f64;
                }
            }
            self.tokens += 1;
        }
    }

    /// The full symmetric matrix (row-major, `n x n`).
    pub fn matrix(&self) -> Vec<f64> {
        let n = self.n;
        let mut h = self.sum.clone();
        for i in 0..n {
            for j in 0..i {
                h[j * n + i] = h[i * n + j];
            }
        }
        h
    }
}

/// Why GPTQ could not run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GptqError {
    /// The matrix's shape and group do not form a valid quantized matrix.
    #[error("{0}")]
    Shape(String),
    /// The Hessian is for inputs of another length.
    #[error("a Hessian of {got} inputs for a matrix of {want}")]
    HessianSize { got: usize, want: usize },
    /// The Hessian has no positive diagonal: no calibration input reached the layer.
    #[error("the calibration inputs of this layer are all zero")]
    NoSignal,
    /// The dampened Hessian was still not positive definite (non-finite inputs).
    #[error("the dampened Hessian is not positive definite (non-finite calibration inputs?)")]
    NotPositiveDefinite,
}

/// Rows per batch: each batch reads every row of `U` once.
const ROW_BATCH: usize = 16;

/// Quantizes `w` (`rows x cols`, row-major, in the basis the kernels see:
/// already rotated when the layer is) with GPTQ against the inputs'
/// second moment `h` (of inputs in that same basis), dampened by
/// `damp` times its mean diagonal. Inputs that never occurred (zero
/// diagonal) get zero weights, as they cannot affect the outputs.
#[allow(clippy::too_many_arguments)]
pub fn gptq_quantize(
    pool: &ThreadPool,
    isa: Isa,
    format: QuantFormat,
    group: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &Hessian,
    damp: f64,
) -> Result<QuantizedMatrix, GptqError> {
    check_shape(rows, cols, group).map_err(GptqError::Shape)?;
    assert_eq!(w.len(), rows * cols, "weights do not match their shape");
    if h.n() != cols {
        return Err(GptqError::HessianSize {
            got: h.n(),
            want: cols,
        });
    }
    let mut hm = h.matrix();
    let dead: Vec<bool> = (0..cols).map(|i| hm[i * cols + i] <= 0.0).collect();
    let live = dead.iter().filter(|d| !**d).count();
    if live == 0 {
        return Err(GptqError::NoSignal);
    }
    let mean_diag = (0..cols)
        .filter(|&i| !dead[i])
        .map(|i| hm[i * cols + i])
        .sum::<f64>()
        / live as f64;
    for i in 0..cols {
        hm[i * cols + i] += if dead[i] { 1.0 } else { damp * mean_diag };
    }
    let u = inverse_upper_factor(&mut hm, cols)?;
    let (nc, ns, nz) = layout_sizes(format, rows, cols, group);
    let mut out = QuantizedMatrix {
        format,
        rows,
        cols,
        group,
        codes: vec![0; nc],
        scales: vec![0; ns],
        zeros: vec![0; nz],
        layout: QuantLayout::Rows,
    };
    let groups = cols / group;
    let (code_row, zero_row) = (format.code_row_bytes(cols), format.zero_row_bytes(groups));
    let codes = crate::pool::DisjointMut::new(&mut out.codes);
    let scales = crate::pool::DisjointMut::new(&mut out.scales);
    let zeros = crate::pool::DisjointMut::new(&mut out.zeros);
    pool.run(&|tid, n_threads| {
        let mine = split_range(rows, n_threads, tid, ROW_BATCH);
        let mut r0 = mine.start;
        while r0 < mine.end {
            let n = ROW_BATCH.min(mine.end - r0);
            let mut batch = w[r0 * cols..(r0 + n) * cols].to_vec();
            for (row, &d) in batch
                .chunks_exact_mut(cols)
                .flat_map(|r| r.iter_mut().zip(&dead))
            {
                if d {
                    *row = 0.0;
                }
            }
            let mut q = vec![0u8; n * cols];
            let mut params = vec![(bf16::ZERO, 0u8); n * groups];
            quantize_batch(
                isa,
                format,
                group,
                cols,
                &u,
                &mut batch,
                &mut q,
                &mut params,
            );
            // SAFETY: rows `r0..r0+n` are this thread's alone (`split_range`).
            let (c, s, z) = unsafe {
                (
                    codes.piece(r0 * code_row, n * code_row),
                    scales.piece(r0 * groups, n * groups),
                    zeros.piece(r0 * zero_row, n * zero_row),
                )
            };
            for i in 0..n {
                for g in 0..groups {
                    pack_group(
                        format,
                        group,
                        g,
                        &q[i * cols + g * group..i * cols + (g + 1) * group],
                        params[i * groups + g],
                        &mut c[i * code_row..(i + 1) * code_row],
                        &mut s[i * groups..(i + 1) * groups],
                        &mut z[i * zero_row..(i + 1) * zero_row],
                    );
                }
            }
            r0 += n;
        }
    });
    Ok(out)
}

/// The GPTQ loop over a batch of rows (`w`, modified in place): codes into
/// `q` (q8 as two's-complement bytes), each group's scale and zero point
/// into `params`.
#[allow(clippy::too_many_arguments)]
fn quantize_batch(
    isa: Isa,
    format: QuantFormat,
    group: usize,
    cols: usize,
    u: &[f32],
    w: &mut [f32],
    q: &mut [u8],
    params: &mut [(bf16, u8)],
) {
    let n = w.len() / cols;
    let groups = cols / group;
    let mut codes = [0u8; 128];
    let mut err = [0f32; ROW_BATCH];
    for i in 0..cols {
        let g = i / group;
        if i % group == 0 {
            for r in 0..n {
                let values = &w[r * cols + i..r * cols + i + group];
                params[r * groups + g] = match format {
                    QuantFormat::Q4 => q4_group(isa, values, &mut codes[..group]),
                    QuantFormat::Q8 => (q8_scale(values), 0),
                };
            }
        }
        let d = u[i * cols + i];
        for r in 0..n {
            let v = w[r * cols + i];
            let (scale, zero) = params[r * groups + g];
            let s = scale.to_f32();
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            let (code, back) = match format {
                QuantFormat::Q4 => {
                    let c = (super::round_even(v * inv) + zero as f32).clamp(0.0, 15.0);
                    (c as u8, (c - zero as f32) * s)
                }
                QuantFormat::Q8 => {
                    let c = (v * inv).round().clamp(-127.0, 127.0);
                    ((c as i8) as u8, c * s)
                }
            };
            q[r * cols + i] = code;
            err[r] = (v - back) / d;
        }
        let urow = &u[i * cols + i + 1..(i + 1) * cols];
        for r in 0..n {
            let e = err[r];
            let rest = &mut w[r * cols + i + 1..(r + 1) * cols];
            for (x, &uij) in rest.iter_mut().zip(urow) {
                *x -= e * uij;
            }
        }
    }
}

/// The upper Cholesky factor `U` of `A⁻¹` (`A⁻¹ = Uᵀ·U`) for a symmetric
/// positive definite `a` (`n x n`, overwritten), as f32.
fn inverse_upper_factor(a: &mut [f64], n: usize) -> Result<Vec<f32>, GptqError> {
    cholesky_lower(a, n)?;
    // A⁻¹ = L⁻ᵀ·L⁻¹: invert L in place (lower triangular).
    let mut inv = vec![0f64; n * n];
    for j in 0..n {
        inv[j * n + j] = 1.0 / a[j * n + j];
        for i in j + 1..n {
            let s: f64 = (j..i).map(|k| a[i * n + k] * inv[k * n + j]).sum();
            inv[i * n + j] = -s / a[i * n + i];
        }
    }
    // A⁻¹[i][j] = Σ_k L⁻¹[k][i]·L⁻¹[k][j] over k ≥ max(i, j).
    let mut ainv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (i..n).map(|k| inv[k * n + i] * inv[k * n + j]).sum();
            ainv[i * n + j] = s;
            ainv[j * n + i] = s;
        }
    }
    // A⁻¹ = L'·L'ᵀ, so U = L'ᵀ.
    cholesky_lower(&mut ainv, n)?;
    let mut u = vec![0f32; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = ainv[j * n + i] as f32;
        }
    }
    Ok(u)
}

/// In-place Cholesky factorisation `A = L·Lᵀ` (the lower triangle of `a`
/// becomes `L`; the upper one is left as it was).
fn cholesky_lower(a: &mut [f64], n: usize) -> Result<(), GptqError> {
    for j in 0..n {
        let d = a[j * n + j] - (0..j).map(|k| a[j * n + k] * a[j * n + k]).sum::<f64>();
        if !(d > 0.0 && d.is_finite()) {
            return Err(GptqError::NotPositiveDefinite);
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let s: f64 = (0..j).map(|k| a[i * n + k] * a[j * n + k]).sum();
            a[i * n + j] = (a[i * n + j] - s) / d;
        }
    }
    Ok(())
}
