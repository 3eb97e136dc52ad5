//! RMS normalisation: the norms around every block, inside attention
//! (per-head q/k norms) and after Gated DeltaNet. Kernels:
//! [`hayate_kernels::ops::rms_norm`].

use hayate_formats::{Result, Tensor};
use hayate_kernels::ops;

/// RMS normalisation with a learned per-channel scale.
#[derive(Clone)]
pub struct RmsNorm {
    /// The scale, widened to f32 (and with 1 added for `(1 + w)` variants).
    pub weight: Vec<f32>,
    /// Added to the mean square.
    pub eps: f32,
}

impl RmsNorm {
    /// A norm over `dim` channels from a `[dim]` tensor.
    pub fn new(weight: &Tensor, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm {
            weight: weight.vector_f32(dim)?,
            eps,
        })
    }

    /// A norm whose stored weight is zero-centred: it scales by `1 + w`
    /// (Gemma, Qwen3.5).
    pub fn one_plus(weight: &Tensor, dim: usize, eps: f32) -> Result<Self> {
        let mut norm = Self::new(weight, dim, eps)?;
        norm.weight.iter_mut().for_each(|w| *w += 1.0);
        Ok(norm)
    }

    /// Normalises each `dim`-long row of `x` into the same row of `out`.
    pub fn rows(&self, x: &[f32], out: &mut [f32], dim: usize) {
        for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            ops::rms_norm(xr, &self.weight, self.eps, or);
        }
    }

    /// Normalises each `dim`-long row of `x` in place (a row is one
    /// token, or one head of a token).
    pub fn rows_inplace(&self, x: &mut [f32], dim: usize) {
        for row in x.chunks_exact_mut(dim) {
            ops::rms_norm_inplace(row, &self.weight, self.eps);
        }
    }
}
