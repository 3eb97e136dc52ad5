//! The generic building blocks every architecture is assembled from.
//!
//! A translator ([`crate::arch`]) turns a configuration into a list of
//! [`Block`]s; the forward pass knows only these types. A new architecture
//! adds a translator and only the block variants it really needs.

pub use crate::linear::Linear;
use hayate_formats::{Result, Tensor};

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

impl Block {
    /// The block's linear layers, grouped by shared input (one group is one
    /// fused product and, when quantized with a rotation, shares `S_in`).
    pub fn linear_groups_mut(&mut self) -> Vec<Vec<&mut Linear>> {
        let Mixer::Attention(a) = &mut self.mixer;
        let mlp = &mut self.mlp;
        vec![
            vec![&mut a.q, &mut a.k, &mut a.v],
            vec![&mut a.o],
            vec![&mut mlp.gate, &mut mlp.up],
            vec![&mut mlp.down],
        ]
    }

    /// The block's linear layers, grouped by shared input.
    pub fn linear_groups(&self) -> Vec<Vec<&Linear>> {
        let Mixer::Attention(a) = &self.mixer;
        let mlp = &self.mlp;
        vec![
            vec![&a.q, &a.k, &a.v],
            vec![&a.o],
            vec![&mlp.gate, &mlp.up],
            vec![&mlp.down],
        ]
    }

    /// The block's linear layers.
    pub fn linears(&self) -> [&Linear; 7] {
        let Mixer::Attention(a) = &self.mixer;
        let mlp = &self.mlp;
        [&a.q, &a.k, &a.v, &a.o, &mlp.gate, &mlp.up, &mlp.down]
    }
}
