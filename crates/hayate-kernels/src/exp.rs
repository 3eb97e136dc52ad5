//! `e^x` in f32, the same value on every path (scalar and SIMD use the
//! same operations in the same order), for softmax and activations.

/// `e^x` to about 2 ulp (Cephes' polynomial after reduction by `ln 2`),
/// exactly 0 below -87.3 (and for -∞ and NaN). Every SIMD path computes the same.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // As the vector compare: NaN is not `>=`, so it gives 0 too.
    if x.is_nan() || x < EXP_MIN {
        return 0.0;
    }
    let x = x.min(EXP_MAX);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut poly = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        poly = poly.mul_add(r, c);
    }
    let y = poly.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

const EXP_MIN: f32 = -87.3;
const EXP_MAX: f32 = 88.3;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO};
    use std::arch::x86_64::*;

    /// [`super::exp`] on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp8(x: __m256) -> __m256 {
        let low = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(EXP_MIN));
        let x = _mm256_min_ps(x, _mm256_set1_ps(EXP_MAX));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut poly = _mm256_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let pow = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow)), low)
    }

    /// [`super::exp`] on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp16(x: __m512) -> __m512 {
        let low = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(EXP_MIN));
        let x = _mm512_min_ps(x, _mm512_set1_ps(EXP_MAX));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
        let mut poly = _mm512_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let pow = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_maskz_mul_ps(low, y, _mm512_castsi512_ps(pow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Isa;

    /// The inputs the tests sweep: below the cut-off to a little above 0.
    fn inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..7000).map(|i| -90.0 + 0.0137 * i as f32).collect();
        xs.extend([f32::NEG_INFINITY, 0.0, -0.0, EXP_MIN, 1e-30, -1e-30]);
        xs.resize(xs.len().next_multiple_of(16), 0.5);
        xs
    }

    #[test]
    fn exp_matches_the_library() {
        for x in inputs() {
            let (got, want) = (exp(x), (x as f64).exp());
            if x < EXP_MIN {
                assert_eq!(got, 0.0, "exp({x})");
            } else {
                let err = ((got as f64 - want) / want).abs();
                assert!(err < 3e-7, "exp({x}) = {got}, want {want}");
            }
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NAN), 0.0);
    }

    #[test]
    fn every_path_computes_the_same_bits() {
        let xs = inputs();
        let want: Vec<u32> = xs.iter().map(|&x| exp(x).to_bits()).collect();
        let mut tested = 0;
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            if Isa::Avx2.is_supported() {
                for (x, w) in xs.chunks_exact(8).zip(want.chunks_exact(8)) {
                    let mut got = [0f32; 8];
                    // SAFETY: AVX2 and FMA are supported (checked); 8 values each.
                    unsafe {
                        _mm256_storeu_ps(got.as_mut_ptr(), x86::exp8(_mm256_loadu_ps(x.as_ptr())))
                    };
                    assert_eq!(got.map(f32::to_bits), w, "AVX2 exp of {x:?}");
                }
                tested += 1;
            }
            if Isa::Avx512.is_supported() {
                for (x, w) in xs.chunks_exact(16).zip(want.chunks_exact(16)) {
                    let mut got = [0f32; 16];
                    // SAFETY: AVX-512 F is supported (checked); 16 values each.
                    unsafe {
                        _mm512_storeu_ps(got.as_mut_ptr(), x86::exp16(_mm512_loadu_ps(x.as_ptr())))
                    };
                    assert_eq!(got.map(f32::to_bits), w, "AVX-512 exp of {x:?}");
                }
                // The AMX level runs this same exp.
                tested += 1 + Isa::Amx.is_supported() as usize;
            }
        }
        let simd = Isa::supported()
            .iter()
            .filter(|&&i| i != Isa::Scalar)
            .count();
        assert_eq!(tested, simd, "a SIMD level has no exp test");
    }
}
