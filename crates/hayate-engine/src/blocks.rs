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

    /// A norm whose stored weight is zero-centred: it scales by `1 + w`
    /// (Gemma, Qwen3.5).
    pub fn one_plus(weight: &Tensor, dim: usize, eps: f32) -> Result<Self> {
        let mut norm = Self::new(weight, dim, eps)?;
        norm.weight.iter_mut().for_each(|w| *w += 1.0);
        Ok(norm)
    }
}

/// Causal self-attention with grouped key/value heads and rotary positions.
pub struct Attention {
    /// Query projection, `n_heads * head_dim` outputs (twice that with an
    /// output gate: per head, the query then the gate).
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
    /// Whether `q` also produces a gate: the output is `o · sigmoid(gate)` (Qwen3.5).
    pub output_gate: bool,
    /// Which of the model's rotary tables this layer uses; it rotates the
    /// first `2 * half` dimensions of each head (partial rotary if fewer).
    pub rope: usize,
    /// Sliding window: each token sees itself and the `window - 1` before it.
    pub window: Option<usize>,
}

/// Gated DeltaNet linear attention (Qwen3.5): a causal depthwise
/// convolution over the fused q/k/v projection, then the gated delta rule
/// ([`hayate_kernels::deltanet`]) per value head, a gated RMS norm and the
/// output projection.
pub struct GatedDeltaNet {
    /// Fused projection: queries and keys (`n_k_heads * k_dim` each), then
    /// values (`n_v_heads * v_dim`).
    pub qkv: Linear,
    /// Output gate, `n_v_heads * v_dim`.
    pub z: Linear,
    /// Write strength before the sigmoid, one per value head.
    pub b: Linear,
    /// Decay input, one per value head.
    pub a: Linear,
    /// Output projection back to the hidden size.
    pub out: Linear,
    /// Convolution taps, `[kernel][channels]`.
    pub conv: Vec<f32>,
    /// Convolution length.
    pub kernel: usize,
    /// Added to `a` before the softplus.
    pub dt_bias: Vec<f32>,
    /// `-exp(A_log)`: the decay rate per value head.
    pub neg_decay: Vec<f32>,
    /// Gated RMS norm over each value head's output.
    pub norm: RmsNorm,
    /// Key heads (divides `n_v_heads`; consecutive value heads share one).
    pub n_k_heads: usize,
    /// Dimensions per key head.
    pub k_dim: usize,
    /// Value heads.
    pub n_v_heads: usize,
    /// Dimensions per value head.
    pub v_dim: usize,
}

impl GatedDeltaNet {
    /// Channels of the fused projection (and of the convolution).
    pub fn channels(&self) -> usize {
        2 * self.n_k_heads * self.k_dim + self.n_v_heads * self.v_dim
    }
}

/// Gated short convolution (LFM2): `out(C ⊙ conv(B ⊙ x))` with `B`, `C`
/// and `x` from one input projection.
pub struct ShortConv {
    /// Input projection, `3 * channels` outputs: `B`, `C`, `x`.
    pub in_proj: Linear,
    /// Output projection.
    pub out: Linear,
    /// Convolution taps, `[kernel][channels]`.
    pub conv: Vec<f32>,
    /// Convolution bias, if any.
    pub conv_bias: Option<Vec<f32>>,
    /// Convolution length.
    pub kernel: usize,
    /// Channels (the hidden size).
    pub channels: usize,
}

/// What mixes information across positions.
pub enum Mixer {
    /// Causal attention over a KV cache (full or sliding-window).
    Attention(Attention),
    /// Gated DeltaNet linear attention with a fixed-size state.
    DeltaNet(GatedDeltaNet),
    /// Gated short convolution with a few positions of state.
    ShortConv(ShortConv),
}

/// Activation of a gated feed-forward network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x·sigmoid(x)` (SwiGLU).
    Silu,
    /// GELU with the tanh approximation (GeGLU, Gemma).
    GeluTanh,
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

/// One pre-norm residual layer: `x += post(mixer(norm(x))); x += post(mlp(norm(x)))`,
/// the post norms only where the architecture has them (Gemma).
pub struct Block {
    /// Norm before the mixer.
    pub mixer_norm: RmsNorm,
    /// What mixes positions.
    pub mixer: Mixer,
    /// Norm of the mixer's output before the residual add.
    pub post_mixer_norm: Option<RmsNorm>,
    /// Norm before the feed-forward network.
    pub mlp_norm: RmsNorm,
    /// The feed-forward network.
    pub mlp: GatedMlp,
    /// Norm of the feed-forward output before the residual add.
    pub post_mlp_norm: Option<RmsNorm>,
}

impl Block {
    /// The block's linear layers, grouped by shared input (one group is one
    /// fused product and, when quantized with a rotation, shares `S_in`).
    pub fn linear_groups_mut(&mut self) -> Vec<Vec<&mut Linear>> {
        let mlp = &mut self.mlp;
        let mut groups = match &mut self.mixer {
            Mixer::Attention(a) => vec![vec![&mut a.q, &mut a.k, &mut a.v], vec![&mut a.o]],
            Mixer::DeltaNet(d) => vec![
                vec![&mut d.qkv, &mut d.z, &mut d.b, &mut d.a],
                vec![&mut d.out],
            ],
            Mixer::ShortConv(c) => vec![vec![&mut c.in_proj], vec![&mut c.out]],
        };
        groups.push(vec![&mut mlp.gate, &mut mlp.up]);
        groups.push(vec![&mut mlp.down]);
        groups
    }

    /// The block's linear layers, grouped by shared input.
    pub fn linear_groups(&self) -> Vec<Vec<&Linear>> {
        let mlp = &self.mlp;
        let mut groups = match &self.mixer {
            Mixer::Attention(a) => vec![vec![&a.q, &a.k, &a.v], vec![&a.o]],
            Mixer::DeltaNet(d) => vec![vec![&d.qkv, &d.z, &d.b, &d.a], vec![&d.out]],
            Mixer::ShortConv(c) => vec![vec![&c.in_proj], vec![&c.out]],
        };
        groups.push(vec![&mlp.gate, &mlp.up]);
        groups.push(vec![&mlp.down]);
        groups
    }

    /// The block's linear layers.
    pub fn linears(&self) -> Vec<&Linear> {
        self.linear_groups().into_iter().flatten().collect()
    }
}
