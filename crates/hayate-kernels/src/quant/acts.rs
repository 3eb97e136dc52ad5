//! Activations prepared for quantized products: rotated, then (for integer
//! products) quantized to int8 per block of 32.

use super::round_even;
use crate::cpu::Isa;
use crate::hadamard::{BLOCK, hadamard_blocks};
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Sum of the codes per block, `Σ codes` (for offsets applied in int32).
    pub totals: Vec<i32>,
    /// Unique to these contents: a new one on every [`QuantizedActs::resize`],
    /// so that kernels can tell whether what they derived from them is current.
    pub id: u64,
}

impl QuantizedActs {
    /// Sizes the buffers (allocating only when they grow).
    pub fn resize(&mut self, n_tok: usize, k: usize) {
        assert!(
            k.is_multiple_of(BLOCK),
            "{k} inputs are not a multiple of 32"
        );
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        self.id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        self.n_tok = n_tok;
        self.k = k;
        self.x.resize(n_tok * k, 0.0);
        self.codes.resize(n_tok * k, 0);
        self.scales.resize(n_tok * k / BLOCK, 0.0);
        self.sums.resize(n_tok * k / BLOCK, 0.0);
        self.totals.resize(n_tok * k / BLOCK, 0);
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
                    totals: &mut self.totals[t * nb..(t + 1) * nb],
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
            totals: self.totals.as_mut_ptr(),
        }
    }
}

/// One token's slices of the buffers.
pub(crate) struct TokenRows<'a> {
    x: &'a mut [f32],
    codes: &'a mut [i8],
    scales: &'a mut [f32],
    sums: &'a mut [f32],
    totals: &'a mut [i32],
}

/// Raw parts of [`QuantizedActs`] that threads split by token.
pub(crate) struct SharedActs {
    k: usize,
    x: *mut f32,
    codes: *mut i8,
    scales: *mut f32,
    sums: *mut f32,
    totals: *mut i32,
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
                totals: std::slice::from_raw_parts_mut(self.totals.add(t * nb), nb),
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
        quantize_blocks(isa, out.x, out.codes, out.scales, out.sums, out.totals);
    }
}

/// int8 codes per block of 32: `scale = max|x| / 127`, `code = round(x / scale)`
/// (ties to even, as the vector units round). Every path gives the same bits.
fn quantize_blocks(
    isa: Isa,
    x: &[f32],
    codes: &mut [i8],
    scales: &mut [f32],
    sums: &mut [f32],
    totals: &mut [i32],
) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked).
        return unsafe { avx2::quantize_blocks(x, codes, scales, sums, totals) };
    }
    let _ = isa;
    quantize_blocks_scalar(x, codes, scales, sums, totals)
}

/// The reference for [`quantize_blocks`].
fn quantize_blocks_scalar(
    x: &[f32],
    codes: &mut [i8],
    scales: &mut [f32],
    sums: &mut [f32],
    totals: &mut [i32],
) {
    for ((((xb, cb), scale), sum), sum_codes) in x
        .chunks_exact(BLOCK)
        .zip(codes.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
        .zip(sums.iter_mut())
        .zip(totals.iter_mut())
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
        *sum_codes = total;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::hadamard::BLOCK;
    use std::arch::x86_64::*;

    /// [`super::quantize_blocks`] on AVX2: the same operations per value.
    ///
    /// # Safety
    /// The CPU supports AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_blocks(
        x: &[f32],
        codes: &mut [i8],
        scales: &mut [f32],
        sums: &mut [f32],
        totals: &mut [i32],
    ) {
        let n = (x.len() / BLOCK)
            .min(codes.len() / BLOCK)
            .min(scales.len())
            .min(sums.len())
            .min(totals.len());
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        for b in 0..n {
            // SAFETY: block `b` lies within `x` and `codes` (n is bounded by both).
            unsafe {
                let p = x.as_ptr().add(b * BLOCK);
                let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
                let m = v.iter().fold(_mm256_setzero_ps(), |m, &x| {
                    _mm256_max_ps(m, _mm256_and_ps(x, abs_mask))
                });
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
                let s = amax / 127.0;
                let inv = _mm256_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 });
                let q = v.map(|x| {
                    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                        _mm256_mul_ps(x, inv),
                    );
                    _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
                });
                let total =
                    _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let t = _mm_add_epi32(
                    _mm256_castsi256_si128(total),
                    _mm256_extracti128_si256(total, 1),
                );
                let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
                let t = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01)));
                // Packing interleaves 128-bit lanes; the permute restores input order.
                let w16 = [
                    _mm256_packs_epi32(q[0], q[1]),
                    _mm256_packs_epi32(q[2], q[3]),
                ];
                let bytes = _mm256_packs_epi16(w16[0], w16[1]);
                let ordered =
                    _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(codes.as_mut_ptr().add(b * BLOCK).cast(), ordered);
                *scales.get_unchecked_mut(b) = s;
                *sums.get_unchecked_mut(b) = s * t as f32;
                *totals.get_unchecked_mut(b) = t;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_quantizes_activations_identically() {
        let mut seed = 3u64;
        let mut x: Vec<f32> = (0..32 * 37)
            .map(|i| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let v = ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0;
                // Some blocks with an outlier, one all zero, exact ties.
                if i % 97 == 0 { v * 50.0 } else { v }
            })
            .collect();
        x[64..96].fill(0.0);
        x[96] = 127.0;
        x[97] = 0.5;
        x[98] = -1.5;
        let nb = x.len() / BLOCK;
        let run = |isa| {
            let (mut c, mut s, mut m) = (vec![0i8; x.len()], vec![0f32; nb], vec![0f32; nb]);
            let mut t = vec![0i32; nb];
            quantize_blocks(isa, &x, &mut c, &mut s, &mut m, &mut t);
            (c, s, m, t)
        };
        let want = run(Isa::Scalar);
        assert_eq!((want.0[97], want.0[98]), (0, -2), "ties go to even");
        for (b, codes) in want.0.chunks_exact(BLOCK).enumerate() {
            let total: i32 = codes.iter().map(|&c| i32::from(c)).sum();
            assert_eq!(want.3[b], total, "block {b}");
        }
        for isa in Isa::supported() {
            assert_eq!(run(isa), want, "{isa:?}");
        }
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx2.is_supported() {
            let (mut c, mut s, mut m) = (vec![0i8; x.len()], vec![0f32; nb], vec![0f32; nb]);
            let mut t = vec![0i32; nb];
            // SAFETY: AVX2 is supported (checked).
            unsafe { avx2::quantize_blocks(&x, &mut c, &mut s, &mut m, &mut t) };
            assert_eq!((c, s, m, t), want, "the AVX2 path");
        }
    }
}
