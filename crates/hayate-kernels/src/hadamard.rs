//! The normalised 32-point Walsh–Hadamard transform, applied block-diagonally.
//!
//! Quantization rotates weights and activations by `H` (block 32) to spread
//! outliers before rounding. `H` is symmetric and orthogonal, so the
//! transform is its own inverse: applying it twice gives the input back.

use crate::cpu::Isa;

/// Block size of the transform.
pub const BLOCK: usize = 32;

/// `1/sqrt(32)`, which makes the transform orthonormal.
const SCALE: f32 = 0.176_776_69;

/// Applies `H` to every block of 32 consecutive values of `x` in place.
///
/// Panics if `x.len()` is not a multiple of 32 (a caller bug: quantized
/// layouts only allow such lengths).
pub fn hadamard_blocks(isa: Isa, x: &mut [f32]) {
    assert!(
        x.len().is_multiple_of(BLOCK),
        "length {} is not a multiple of {BLOCK}",
        x.len()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 (checked).
        isa if isa.has_avx2() => unsafe { avx2::fwht_blocks(x) },
        _ => {
            for block in x.chunks_exact_mut(BLOCK) {
                fwht32_scalar(block);
            }
        }
    }
}

/// The reference: five butterfly stages, then the normalisation.
fn fwht32_scalar(x: &mut [f32]) {
    let mut stride = 1;
    while stride < BLOCK {
        for start in (0..BLOCK).step_by(2 * stride) {
            for i in start..start + stride {
                let (a, b) = (x[i], x[i + stride]);
                x[i] = a + b;
                x[i + stride] = a - b;
            }
        }
        stride *= 2;
    }
    for v in x.iter_mut() {
        *v *= SCALE;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::SCALE;
    use std::arch::x86_64::*;

    /// One in-register butterfly stage: lanes whose `MASK` bit is clear get
    /// `v + partner`, the others `partner - v`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn stage<const MASK: i32>(v: __m256, partner: __m256) -> __m256 {
        _mm256_blend_ps::<MASK>(_mm256_add_ps(v, partner), _mm256_sub_ps(partner, v))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn within(v: __m256) -> __m256 {
        let v = stage::<0b1010_1010>(v, _mm256_permute_ps::<0b10_11_00_01>(v));
        let v = stage::<0b1100_1100>(v, _mm256_permute_ps::<0b01_00_11_10>(v));
        stage::<0b1111_0000>(v, _mm256_permute2f128_ps::<1>(v, v))
    }

    /// Every block of 32 of `x` (a multiple of 32 long), in one call so
    /// that the blocks' butterflies are inlined together.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fwht_blocks(x: &mut [f32]) {
        for block in x.chunks_exact_mut(32) {
            // SAFETY: the block has 32 values; the features are enabled.
            unsafe { fwht32(block) }
        }
    }

    /// # Safety
    /// `x` holds 32 values; the CPU supports AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fwht32(x: &mut [f32]) {
        let p = x.as_mut_ptr();
        // SAFETY: four loads and stores of 8 values within the 32.
        unsafe {
            let r0 = within(_mm256_loadu_ps(p));
            let r1 = within(_mm256_loadu_ps(p.add(8)));
            let r2 = within(_mm256_loadu_ps(p.add(16)));
            let r3 = within(_mm256_loadu_ps(p.add(24)));
            let (s0, s1) = (_mm256_add_ps(r0, r1), _mm256_sub_ps(r0, r1));
            let (s2, s3) = (_mm256_add_ps(r2, r3), _mm256_sub_ps(r2, r3));
            let scale = _mm256_set1_ps(SCALE);
            _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_add_ps(s0, s2), scale));
            _mm256_storeu_ps(p.add(8), _mm256_mul_ps(_mm256_add_ps(s1, s3), scale));
            _mm256_storeu_ps(p.add(16), _mm256_mul_ps(_mm256_sub_ps(s0, s2), scale));
            _mm256_storeu_ps(p.add(24), _mm256_mul_ps(_mm256_sub_ps(s1, s3), scale));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            for i in 0..BLOCK {
                let s: f64 = (0..BLOCK)
                    .map(|j| {
                        let sign = if (i & j).count_ones() % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        };
                        sign * block[j] as f64
                    })
                    .sum();
                out[b * BLOCK + i] = (s / (BLOCK as f64).sqrt()) as f32;
            }
        }
        out
    }

    #[test]
    fn equals_the_dense_matrix_and_is_its_own_inverse_on_every_path() {
        let x: Vec<f32> = (0..3 * BLOCK)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let want = dense(&x);
        for isa in Isa::supported() {
            let mut y = x.clone();
            hadamard_blocks(isa, &mut y);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{isa:?}: {a} vs {b}");
            }
            hadamard_blocks(isa, &mut y);
            for (a, b) in y.iter().zip(&x) {
                assert!((a - b).abs() < 1e-4, "{isa:?} inverse: {a} vs {b}");
            }
        }
    }

    #[test]
    fn preserves_the_norm() {
        let mut x: Vec<f32> = (0..BLOCK).map(|i| (i as f32).sin()).collect();
        let before: f32 = x.iter().map(|v| v * v).sum();
        hadamard_blocks(Isa::best(), &mut x);
        let after: f32 = x.iter().map(|v| v * v).sum();
        assert!((before - after).abs() < 1e-4);
    }
}
