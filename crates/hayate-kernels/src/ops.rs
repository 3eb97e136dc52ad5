//! Vector operations of a transformer layer: norms, activations, rotary
//! embeddings, and the dot / axpy steps of the recurrent layers.

use crate::cpu::Isa;

/// Root-mean-square normalisation: `out = x / sqrt(mean(x²) + eps) * w`,
/// computed in f32 as the reference implementations do.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = sum_of_squares(x) / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// [`rms_norm`] in place.
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let mean_sq = sum_of_squares(x) / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = *v * inv * w;
    }
}

/// Σ x², in eight interleaved lanes so the compiler vectorises it.
fn sum_of_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().map(|v| v * v).sum::<f32>()
}

/// `gate = silu(gate) * up`, the SwiGLU activation, with [`crate::exp::exp`]
/// (the same bits on every path).
pub fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked); lengths are equal.
        done = unsafe { avx2::silu_mul(gate, up) };
    }
    let _ = isa;
    for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = *g / (1.0 + crate::exp::exp(-*g)) * u;
    }
}

/// `gate = gelu_tanh(gate) * up`, GeGLU with the tanh approximation
/// (`gelu_pytorch_tanh`).
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let inner = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
        *g = 0.5 * x * (1.0 + inner.tanh()) * u;
    }
}

/// `x = silu(x)` in place.
pub fn silu(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v /= 1.0 + (-*v).exp();
    }
}

/// `x *= silu(z)`, the output gate of gated norms.
pub fn mul_silu(x: &mut [f32], z: &[f32]) {
    for (v, &g) in x.iter_mut().zip(z) {
        *v *= g / (1.0 + (-g).exp());
    }
}

/// `x *= sigmoid(z)`, an attention output gate.
pub fn mul_sigmoid(x: &mut [f32], z: &[f32]) {
    for (v, &g) in x.iter_mut().zip(z) {
        *v *= sigmoid(g);
    }
}

/// `x *= y` elementwise.
pub fn mul(x: &mut [f32], y: &[f32]) {
    for (v, &g) in x.iter_mut().zip(y) {
        *v *= g;
    }
}

/// `1 / (1 + e^-x)`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `ln(1 + e^x)`, linear above 20 as PyTorch's `softplus`.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// `x / sqrt(Σx² + eps)` in place (the eps inside the root, as `transformers`' `l2norm`).
pub fn l2_normalize(x: &mut [f32], eps: f32) {
    let inv = 1.0 / (sum_of_squares(x) + eps).sqrt();
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Causal depthwise convolution over time. `input` holds `kernel - 1 + n`
/// rows of `channels` values (the history first, then the `n` new rows);
/// `weight` is `[kernel][channels]` (tap-major, so each tap is one vector
/// operation); row `t` of `out` is `bias + Σ_j weight[j] ⊙ input[t + j]`.
pub fn causal_conv1d(
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    channels: usize,
    out: &mut [f32],
) {
    let kernel = weight.len() / channels;
    let n = out.len() / channels;
    let rows = kernel.checked_sub(1).and_then(|k| k.checked_add(n));
    assert!(
        rows.is_some_and(|r| crate::is_product(input.len(), r, channels)),
        "convolution input has the wrong length"
    );
    for (t, row) in out.chunks_exact_mut(channels).enumerate() {
        match bias {
            Some(b) => row.copy_from_slice(b),
            None => row.fill(0.0),
        }
        for (j, w) in weight.chunks_exact(channels).enumerate() {
            let x = &input[(t + j) * channels..(t + j + 1) * channels];
            for ((o, &w), &x) in row.iter_mut().zip(w).zip(x) {
                *o += w * x;
            }
        }
    }
}

/// Rotates the first `2 * cos.len()` dimensions of one head in the
/// "rotate half" layout: dimension `i` pairs with `i + half`.
pub fn rope_rotate_half(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (lo, hi) = head[..2 * half].split_at_mut(half);
    for i in 0..half {
        let (a, b) = (lo[i], hi[i]);
        lo[i] = a * cos[i] - b * sin[i];
        hi[i] = b * cos[i] + a * sin[i];
    }
}

/// Σ a·b.
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        isa if isa.has_avx2() => {
            // SAFETY: the CPU supports AVX2 and FMA (checked); lengths are equal.
            unsafe { avx2::dot(a, b) }
        }
        _ => {
            let mut lanes = [0f32; 8];
            let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
            let tail: f32 = ca
                .remainder()
                .iter()
                .zip(cb.remainder())
                .map(|(x, y)| x * y)
                .sum();
            for (x, y) in ca.zip(cb) {
                for i in 0..8 {
                    lanes[i] += x[i] * y[i];
                }
            }
            lanes.iter().sum::<f32>() + tail
        }
    }
}

/// `y += alpha * x`.
pub fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        isa if isa.has_avx2() => {
            // SAFETY: the CPU supports AVX2 and FMA (checked); lengths are equal.
            unsafe { avx2::axpy(alpha, x, y) }
        }
        _ => {
            for (o, &v) in y.iter_mut().zip(x) {
                *o += alpha * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let body = n - n % 16;
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY: i + 16 <= body <= n for both slices.
        unsafe {
            while i < body {
                acc0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    acc0,
                );
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                    acc1,
                );
                i += 16;
            }
        }
        let v = _mm256_add_ps(acc0, acc1);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        let tail: f32 = a[body..].iter().zip(&b[body..]).map(|(x, y)| x * y).sum();
        _mm_cvtss_f32(s) + tail
    }

    /// [`super::silu_mul`] on the whole vectors of 8; returns how many values it did.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) -> usize {
        let body = gate.len() - gate.len() % 8;
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        // SAFETY: i + 8 <= body <= len for both slices.
        unsafe {
            while i < body {
                let gp = gate.as_mut_ptr().add(i);
                let g = _mm256_loadu_ps(gp);
                let e = crate::exp::x86::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
                _mm256_storeu_ps(gp, _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i))));
                i += 8;
            }
        }
        body
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let body = n - n % 8;
        let av = _mm256_set1_ps(alpha);
        let mut i = 0;
        // SAFETY: i + 8 <= body <= n for both slices.
        unsafe {
            while i < body {
                let yp = y.as_mut_ptr().add(i);
                let r =
                    _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp));
                _mm256_storeu_ps(yp, r);
                i += 8;
            }
        }
        for (o, &v) in y[body..].iter_mut().zip(&x[body..]) {
            *o += alpha * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_dot_and_axpy_match_scalar() {
        for n in [0, 1, 7, 8, 15, 16, 17, 64, 129] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want = dot(Isa::Scalar, &a, &b);
            let mut y_want = b.clone();
            axpy(Isa::Scalar, 0.5, &a, &mut y_want);
            for isa in Isa::supported() {
                assert!((dot(isa, &a, &b) - want).abs() < 1e-4, "{isa:?} n={n}");
                let mut y = b.clone();
                axpy(isa, 0.5, &a, &mut y);
                for (p, q) in y.iter().zip(&y_want) {
                    assert!((p - q).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn causal_conv_sees_only_the_past() {
        // Two channels, three taps: out[t] = Σ_j w[j] ⊙ in[t + j].
        let weight = [1.0, 10.0, 2.0, 20.0, 3.0, 30.0];
        let input = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0];
        let mut out = [0.0; 4];
        causal_conv1d(&input, &weight, Some(&[0.5, -0.5]), 2, &mut out);
        assert_eq!(out, [3.5, 29.5, 8.5, 79.5]);
    }

    #[test]
    fn gelu_tanh_matches_known_values() {
        let mut g = [0.0, 1.0, -1.0, 3.0];
        gelu_tanh_mul(&mut g, &[1.0; 4]);
        let want = [0.0, 0.841_192, -0.158_808, 2.996_363];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert_eq!(softplus(30.0), 30.0);
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-7);
    }

    #[test]
    fn rms_norm_normalises() {
        let x = [3.0, 4.0];
        let mut out = [0.0; 2];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out);
        let rms = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6);
        assert!((out[1] - 8.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn silu_mul_is_the_same_on_every_path() {
        let gate: Vec<f32> = (0..203).map(|i| (i as f32 - 100.0) * 0.37).collect();
        let up: Vec<f32> = (0..203).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut want = gate.clone();
        silu_mul(Isa::Scalar, &mut want, &up);
        for ((&g, &u), &w) in gate.iter().zip(&up).zip(&want) {
            let exact = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
            assert!(
                (w as f64 - exact).abs() <= 1e-6 * exact.abs().max(1.0),
                "{g}: {w} vs {exact}"
            );
        }
        for isa in Isa::supported() {
            let mut got = gate.clone();
            silu_mul(isa, &mut got, &up);
            assert_eq!(got, want, "{isa:?}");
        }
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx2.is_supported() {
            let mut got = gate.clone();
            // SAFETY: AVX2 and FMA are supported (checked); lengths are equal.
            let done = unsafe { avx2::silu_mul(&mut got, &up) };
            assert_eq!((done, &got[..done]), (200, &want[..200]), "the AVX2 path");
        }
    }

    #[test]
    fn rope_by_zero_angle_is_identity_and_preserves_norm() {
        let mut h = [1.0, 2.0, 3.0, 4.0, 5.0];
        rope_rotate_half(&mut h, &[1.0, 1.0], &[0.0, 0.0]);
        assert_eq!(h, [1.0, 2.0, 3.0, 4.0, 5.0]);
        let (c, s) = (0.3f32.cos(), 0.3f32.sin());
        rope_rotate_half(&mut h, &[c, c], &[s, s]);
        let norm: f32 = h[..4].iter().map(|v| v * v).sum();
        assert!((norm - 30.0).abs() < 1e-4);
        assert_eq!(h[4], 5.0);
    }
}
