//! Counter-based random numbers: the value for a key is a pure function of
//! it, so the noise of any (seed, position, token) can be recomputed on
//! demand, by any process, in any order. Speculative decoding relies on this:
//! draft and target models see the same noise at the same position.

/// The SplitMix64 finaliser: a bijective mixer with full avalanche.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 random bits for `(seed, position, index)`.
#[inline]
pub fn bits(seed: u64, position: u64, index: u64) -> u64 {
    let key = mix64(mix64(seed ^ 0x9e37_79b9_7f4a_7c15) ^ position);
    mix64(key ^ mix64(index.wrapping_add(0x632b_e59b_d9b4_e019)))
}

/// A uniform number strictly inside (0, 1), with 53 random bits.
#[inline]
pub fn uniform(seed: u64, position: u64, index: u64) -> f64 {
    ((bits(seed, position, index) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// Standard Gumbel noise `-ln(-ln(u))` for `(seed, position, index)`.
/// Always within ±[`GUMBEL_BOUND`].
#[inline]
pub fn gumbel(seed: u64, position: u64, index: u64) -> f32 {
    (-(-uniform(seed, position, index).ln()).ln()) as f32
}

/// Bound on |Gumbel noise| given 53-bit uniforms: -ln(-ln(1 - 2⁻⁵⁴)) ≈ 37.4.
pub const GUMBEL_BOUND: f32 = 37.5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_keyed() {
        assert_eq!(bits(1, 2, 3), bits(1, 2, 3));
        assert_ne!(bits(1, 2, 3), bits(1, 2, 4));
        assert_ne!(bits(1, 2, 3), bits(1, 3, 3));
        assert_ne!(bits(1, 2, 3), bits(2, 2, 3));
    }

    #[test]
    fn uniform_moments_and_gumbel_mean() {
        let n = 200_000u64;
        let (mut sum, mut sum_sq, mut g_sum) = (0.0, 0.0, 0.0);
        for i in 0..n {
            let u = uniform(42, i / 7, i % 7);
            assert!(u > 0.0 && u < 1.0);
            sum += u;
            sum_sq += u * u;
            let g = gumbel(42, i / 7, i % 7);
            assert!(g.abs() < GUMBEL_BOUND);
            g_sum += g as f64;
        }
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 0.005);
        assert!((sum_sq / n as f64 - mean * mean - 1.0 / 12.0).abs() < 0.002);
        // The Gumbel mean is the Euler-Mascheroni constant.
        assert!((g_sum / n as f64 - 0.5772).abs() < 0.01);
    }
}
