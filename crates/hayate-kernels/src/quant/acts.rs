//! Activations prepared for quantized products: rotated, then (for integer
//! products) quantized to int8 per block of 32.

use super::round_even;
use crate::cpu::Isa;
use crate::hadamard::{BLOCK, hadamard_blocks};

/// How activations enter a quantized product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ActPrecision {
    /// Quantized to int8 per block of 32 on the fly; products run on integer units.
    #[default]
    Int8,
    /// Kept in f32 (for accuracy checks).
    F32,
}

impl ActPrecision {
    /// `int8` or `f32`.
    pub fn name(self) -> &'static str {
        match self {
            ActPrecision::Int8 => "int8",
            ActPrecision::F32 => "f32",
        }
    }
}

/// `n_tok` activation rows of `k` values, ready for the products.
#[derive(Default)]
pub struct QuantizedActs {
    /// Tokens.
    pub n_tok: usize,
    /// Values per token (a multiple of 32).
    pub k: usize,
    /// The rotated values (`n_tok x k`).
    pub x: Vec<f32>,
    /// int8 codes (`n_tok x k`), for [`ActPrecision::Int8`].
    pub codes: Vec<i8>,
    /// Scale per block of 32 (`n_tok x k/32`).
    pub scales: Vec<f32>,
    /// Sum of the dequantized block, `scale · Σ codes` (for zero points).
    pub sums: Vec<f32>,
}

impl QuantizedActs {
    /// Sizes the buffers (allocating only when they grow).
    pub fn resize(&mut self, n_tok: usize, k: usize) {
        assert!(
            k.is_multiple_of(BLOCK),
            "{k} inputs are not a multiple of 32"
        );
        self.n_tok = n_tok;
        self.k = k;
        self.x.resize(n_tok * k, 0.0);
        self.codes.resize(n_tok * k, 0);
        self.scales.resize(n_tok * k / BLOCK, 0.0);
        self.sums.resize(n_tok * k / BLOCK, 0.0);
    }

    /// Prepares the rows `tokens` of `x` (`n_tok x k`): `H·S_in·x` when signs
    /// are given, then int8 codes when `precision` asks for them.
    pub fn prepare_rows(
        &mut self,
        isa: Isa,
        x: &[f32],
        sign_in: Option<&[f32]>,
        precision: ActPrecision,
        tokens: std::ops::Range<usize>,
    ) {
        let (k, nb) = (self.k, self.k / BLOCK);
        for t in tokens {
            prepare_token(
                isa,
                &x[t * k..(t + 1) * k],
                sign_in,
                precision,
                TokenRows {
                    x: &mut self.x[t * k..(t + 1) * k],
                    codes: &mut self.codes[t * k..(t + 1) * k],
                    scales: &mut self.scales[t * nb..(t + 1) * nb],
                    sums: &mut self.sums[t * nb..(t + 1) * nb],
                },
            );
        }
    }

    /// The buffers as raw parts, for threads that each prepare their own tokens.
    pub(crate) fn shared(&mut self) -> SharedActs {
        SharedActs {
            k: self.k,
            x: self.x.as_mut_ptr(),
            codes: self.codes.as_mut_ptr(),
            scales: self.scales.as_mut_ptr(),
            sums: self.sums.as_mut_ptr(),
        }
    }
}

/// One token's slices of the buffers.
pub(crate) struct TokenRows<'a> {
    x: &'a mut [f32],
    codes: &'a mut [i8],
    scales: &'a mut [f32],
    sums: &'a mut [f32],
}

/// Raw parts of [`QuantizedActs`] that threads split by token.
pub(crate) struct SharedActs {
    k: usize,
    x: *mut f32,
    codes: *mut i8,
    scales: *mut f32,
    sums: *mut f32,
}

// SAFETY: threads only form slices of disjoint tokens, see `SharedActs::token`.
unsafe impl Sync for SharedActs {}

impl SharedActs {
    /// Token `t`'s slices.
    ///
    /// # Safety
    /// `t` is below the `n_tok` the buffers were sized for, they are not
    /// resized or otherwise borrowed meanwhile, and no other thread takes `t`.
    pub(crate) unsafe fn token(&self, t: usize) -> TokenRows<'_> {
        let (k, nb) = (self.k, self.k / BLOCK);
        // SAFETY: within the buffers and exclusive to this token (caller).
        unsafe {
            TokenRows {
                x: std::slice::from_raw_parts_mut(self.x.add(t * k), k),
                codes: std::slice::from_raw_parts_mut(self.codes.add(t * k), k),
                scales: std::slice::from_raw_parts_mut(self.scales.add(t * nb), nb),
                sums: std::slice::from_raw_parts_mut(self.sums.add(t * nb), nb),
            }
        }
    }
}

/// Rotates one token's input `src` into `out.x`, then quantizes it when asked.
pub(crate) fn prepare_token(
    isa: Isa,
    src: &[f32],
    sign_in: Option<&[f32]>,
    precision: ActPrecision,
    out: TokenRows<'_>,
) {
    match sign_in {
        Some(signs) => {
            for ((o, &v), &s) in out.x.iter_mut().zip(src).zip(signs) {
                *o = v * s;
            }
            hadamard_blocks(isa, out.x);
        }
        None => out.x.copy_from_slice(src),
    }
    if precision == ActPrecision::Int8 {
        quantize_blocks(out.x, out.codes, out.scales, out.sums);
    }
}

/// int8 codes per block of 32: `scale = max|x| / 127`, `code = round(x / scale)`
/// (ties to even, as the vector units round).
fn quantize_blocks(x: &[f32], codes: &mut [i8], scales: &mut [f32], sums: &mut [f32]) {
    for (((xb, cb), scale), sum) in x
        .chunks_exact(BLOCK)
        .zip(codes.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
        .zip(sums.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = amax / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        let mut total = 0i32;
        for (c, &v) in cb.iter_mut().zip(xb) {
            let q = round_even(v * inv).clamp(-127.0, 127.0) as i8;
            *c = q;
            total += i32::from(q);
        }
        *scale = s;
        *sum = s * total as f32;
    }
}
