//! The generic building blocks every architecture is assembled from.
//!
//! A translator ([`crate::arch`]) turns a configuration into a list of
//! [`Block`]s; the forward pass knows only these types. A new architecture
//! adds a translator and only the block variants it really needs.

use hayate_formats::{Result, Tensor};
use hayate_kernels::MatRef;

/// A linear layer `y = W·x (+ b)` with `W` in its stored dtype.
pub struct Linear {
    weight: Tensor,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Optional bias, widened to f32.
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// Checks that `weight` is `[rows, cols]` of a float dtype and `bias` is `[rows]`.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>, rows: usize, cols: usize) -> Result<Self> {
        weight.matrix(rows, cols)?;
        let bias = bias.map(|b| b.vector_f32(rows)).transpose()?;
        Ok(Linear {
            weight: weight.clone(),
            rows,
            cols,
            bias,
        })
    }

    /// The weights as a kernel view.
    pub fn matrix(&self) -> MatRef<'_> {
        self.weight
            .matrix(self.rows, self.cols)
            .expect("shape and dtype validated at load")
    }

    /// Bytes the weights occupy (read once per decoded token).
    pub fn n_bytes(&self) -> usize {
        self.weight.n_bytes()
    }

    /// Adds the bias to each of the `n_tok` output rows in `y`.
    pub fn add_bias(&self, y: &mut [f32], n_tok: usize) {
        if let Some(bias) = &self.bias {
            for row in y[..n_tok * self.rows].chunks_exact_mut(self.rows) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
    }
}

/// RMS normalisation with a learned per-channel scale.
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
}

/// Causal self-attention with grouped key/value heads and rotary positions.
pub struct Attention {
    /// Query projection, `n_heads * head_dim` outputs.
    pub q: Linear,
    /// Key projection, `n_kv_heads * head_dim` outputs.
    pub k: Linear,
    /// Value projection, `n_kv_heads * head_dim` outputs.
    pub v: Linear,
    /// Output projection back to the hidden size.
    pub o: Linear,
    /// Per-head RMS norm of the queries before rotation (Qwen3).
    pub q_norm: Option<RmsNorm>,
    /// Per-head RMS norm of the keys before rotation (Qwen3).
    pub k_norm: Option<RmsNorm>,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Score scale, usually `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// What mixes information across positions.
pub enum Mixer {
    /// Full causal attention over a KV cache.
    Attention(Attention),
}

/// Activation of a gated feed-forward network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x·sigmoid(x)` (SwiGLU).
    Silu,
}

/// Gated feed-forward network: `down(act(gate(x)) * up(x))`.
pub struct GatedMlp {
    /// Gate projection.
    pub gate: Linear,
    /// Up projection.
    pub up: Linear,
    /// Down projection.
    pub down: Linear,
    /// Activation applied to the gate.
    pub activation: Activation,
}

/// One pre-norm residual layer: `x += mixer(norm(x)); x += mlp(norm(x))`.
pub struct Block {
    /// Norm before the mixer.
    pub mixer_norm: RmsNorm,
    /// Attention (later: recurrent mixers).
    pub mixer: Mixer,
    /// Norm before the feed-forward network.
    pub mlp_norm: RmsNorm,
    /// The feed-forward network.
    pub mlp: GatedMlp,
}
