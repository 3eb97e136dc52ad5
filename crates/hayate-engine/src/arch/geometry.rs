//! Model geometry: every size the engine derives from `config.json`, checked
//! in one place before any weight file is opened or any buffer allocated.
//!
//! A translator reads its family's keys through [`Dims`], which bounds each
//! value (a config with `num_hidden_layers: 1000000000` or a window near
//! 2^64 is refused, not allocated), and assembles a [`Geometry`], whose
//! constructor checks the relations between values (heads that divide, key
//! heads shared evenly) and that every matrix size fits. The bounds are far
//! above any published model and low enough that no product of a few of them
//! overflows 64 bits; the buffers that scale with the context are checked
//! against the machine's memory when a state is made
//! (the state's memory budget).

use crate::{EngineError, Result};
use hayate_formats::HfConfig;

/// Largest hidden size accepted (the largest published models use 16384–25600).
pub const MAX_HIDDEN: usize = 1 << 16;
/// Most layers accepted.
pub const MAX_LAYERS: usize = 1024;
/// Most attention (or linear-attention) heads per layer.
pub const MAX_HEADS: usize = 1024;
/// Largest dimension of one head.
pub const MAX_HEAD_DIM: usize = 1024;
/// Largest feed-forward width.
pub const MAX_INTERMEDIATE: usize = 1 << 20;
/// Largest vocabulary.
pub const MAX_VOCAB: usize = 1 << 24;
/// Longest context (`max_position_embeddings`, sliding windows).
pub const MAX_POSITIONS: usize = 1 << 24;
/// Longest convolution.
pub const MAX_CONV_KERNEL: usize = 64;

/// Reads bounded sizes from a config, naming the key and its value in errors.
pub struct Dims<'a> {
    cfg: &'a HfConfig,
}

impl<'a> Dims<'a> {
    /// Sizes read from `cfg`.
    pub fn new(cfg: &'a HfConfig) -> Self {
        Dims { cfg }
    }

    /// Required `key`, in `1..=max`.
    pub fn required(&self, key: &str, max: usize) -> Result<usize> {
        let value = self.cfg.usize(key)?;
        in_range(key, value, max)
    }

    /// Optional `key` (else `default`), in `1..=max`.
    pub fn optional(&self, key: &str, default: usize, max: usize) -> Result<usize> {
        let value = self.cfg.opt_usize(key)?.unwrap_or(default);
        in_range(key, value, max)
    }

    /// Optional `key` with no default, in `1..=max` when present.
    pub fn maybe(&self, key: &str, max: usize) -> Result<Option<usize>> {
        self.cfg
            .opt_usize(key)?
            .map(|v| in_range(key, v, max))
            .transpose()
    }

    /// Optional positive, finite `key` (else `default`), below `max`.
    pub fn positive_f64(&self, key: &str, default: f64, max: f64) -> Result<f64> {
        let value = self.cfg.opt_f64(key)?.unwrap_or(default);
        positive(key, value, max)
    }

    /// A norm epsilon: positive, finite and below 1.
    pub fn eps(&self, key: &str, default: f64) -> Result<f32> {
        let eps = self.positive_f64(key, default, 1.0)?;
        // An epsilon below f32's smallest normal rounds to 0 or a denormal.
        if (eps as f32) < f32::MIN_POSITIVE {
            return Err(bad(key, number(eps), "it underflows f32"));
        }
        Ok(eps as f32)
    }
}

/// `value` of `key`, if it is in `1..=max`.
pub fn in_range(key: &str, value: usize, max: usize) -> Result<usize> {
    if value == 0 || value > max {
        return Err(bad(key, value, &format!("it must be between 1 and {max}")));
    }
    Ok(value)
}

/// `value` of `key`, if it is finite, positive and below `max`.
pub fn positive(key: &str, value: f64, max: f64) -> Result<f64> {
    if !(value.is_finite() && value > 0.0 && value < max) {
        let why = format!("it must be positive and below {}", number(max));
        return Err(bad(key, number(value), &why));
    }
    Ok(value)
}

/// A number as a person writes it: with an exponent when very large or small.
fn number(v: f64) -> String {
    if v != 0.0 && !(1e-4..1e6).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// The error for a value out of range.
fn bad(key: &str, value: impl std::fmt::Display, why: &str) -> EngineError {
    EngineError::Config(format!("`{key}` is {value}: {why}"))
}

/// The sizes of one attention layer.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionDims {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// Dimensions per head (even).
    pub head_dim: usize,
    /// Dimensions of each head that are rotated (even, at most `head_dim`).
    pub rotary_dim: usize,
    /// Whether the query projection also yields a per-head output gate.
    pub output_gate: bool,
    /// Sliding window, if the layer has one.
    pub window: Option<usize>,
}

impl AttentionDims {
    /// Checks the relations between the sizes.
    pub fn new(
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        rotary_dim: usize,
        output_gate: bool,
        window: Option<usize>,
    ) -> Result<Self> {
        in_range("num_attention_heads", n_heads, MAX_HEADS)?;
        in_range("num_key_value_heads", n_kv_heads, MAX_HEADS)?;
        in_range("head_dim", head_dim, MAX_HEAD_DIM)?;
        if !n_heads.is_multiple_of(n_kv_heads) {
            return Err(EngineError::Config(format!(
                "num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv_heads})"
            )));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(bad("head_dim", head_dim, "it must be even"));
        }
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(EngineError::Config(format!(
                "the rotary part of each head is {rotary_dim} of {head_dim} dimensions; it must be even, positive and at most head_dim"
            )));
        }
        if let Some(w) = window {
            in_range("sliding_window", w, MAX_POSITIONS)?;
        }
        Ok(AttentionDims {
            n_heads,
            n_kv_heads,
            head_dim,
            rotary_dim,
            output_gate,
            window,
        })
    }

    /// Outputs of the query projection (twice the queries with an output gate).
    pub fn q_rows(&self) -> usize {
        self.n_heads * self.head_dim * if self.output_gate { 2 } else { 1 }
    }

    /// Query values per token.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Key (and value) values per token.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// The sizes of one Gated DeltaNet layer.
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaNetDims {
    /// Key heads (divides `n_v_heads`).
    pub n_k_heads: usize,
    /// Dimensions per key head.
    pub k_dim: usize,
    /// Value heads.
    pub n_v_heads: usize,
    /// Dimensions per value head.
    pub v_dim: usize,
    /// Convolution length.
    pub kernel: usize,
}

impl DeltaNetDims {
    /// Checks the relations between the sizes.
    pub fn new(
        n_k_heads: usize,
        k_dim: usize,
        n_v_heads: usize,
        v_dim: usize,
        kernel: usize,
    ) -> Result<Self> {
        in_range("linear_num_key_heads", n_k_heads, MAX_HEADS)?;
        in_range("linear_key_head_dim", k_dim, MAX_HEAD_DIM)?;
        in_range("linear_num_value_heads", n_v_heads, MAX_HEADS)?;
        in_range("linear_value_head_dim", v_dim, MAX_HEAD_DIM)?;
        in_range("linear_conv_kernel_dim", kernel, MAX_CONV_KERNEL)?;
        if !n_v_heads.is_multiple_of(n_k_heads) {
            return Err(EngineError::Config(format!(
                "linear_num_value_heads ({n_v_heads}) is not a multiple of linear_num_key_heads ({n_k_heads})"
            )));
        }
        Ok(DeltaNetDims {
            n_k_heads,
            k_dim,
            n_v_heads,
            v_dim,
            kernel,
        })
    }

    /// Channels of the fused q/k/v projection and its convolution.
    pub fn channels(&self) -> usize {
        2 * self.n_k_heads * self.k_dim + self.n_v_heads * self.v_dim
    }
}

/// The sizes of one gated short convolution.
#[derive(Clone, Debug, PartialEq)]
pub struct ShortConvDims {
    /// Channels (the hidden size).
    pub channels: usize,
    /// Convolution length.
    pub kernel: usize,
}

impl ShortConvDims {
    /// Checks the sizes.
    pub fn new(channels: usize, kernel: usize) -> Result<Self> {
        in_range("hidden_size", channels, MAX_HIDDEN)?;
        in_range("conv_L_cache", kernel, MAX_CONV_KERNEL)?;
        Ok(ShortConvDims { channels, kernel })
    }
}

/// What one layer mixes with, and its sizes.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerDims {
    /// Full or sliding-window attention.
    Attention(AttentionDims),
    /// Gated DeltaNet.
    DeltaNet(DeltaNetDims),
    /// Gated short convolution.
    ShortConv(ShortConvDims),
}

/// Every size of a model, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Geometry {
    /// Hidden size.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Feed-forward width.
    pub intermediate: usize,
    /// Longest context the model was configured for.
    pub max_positions: usize,
    /// The layers, in order.
    pub layers: Vec<LayerDims>,
}

impl Geometry {
    /// Checks the model-wide sizes and each layer's against them.
    pub fn new(
        hidden: usize,
        vocab: usize,
        intermediate: usize,
        max_positions: usize,
        layers: Vec<LayerDims>,
    ) -> Result<Self> {
        in_range("hidden_size", hidden, MAX_HIDDEN)?;
        in_range("vocab_size", vocab, MAX_VOCAB)?;
        in_range("intermediate_size", intermediate, MAX_INTERMEDIATE)?;
        in_range("max_position_embeddings", max_positions, MAX_POSITIONS)?;
        in_range("num_hidden_layers", layers.len(), MAX_LAYERS)?;
        let geometry = Geometry {
            hidden,
            vocab,
            intermediate,
            max_positions,
            layers,
        };
        // The bounds keep this far from overflowing; checked all the same,
        // since every later size is a product of these.
        if geometry.matrix_params().is_none() {
            return Err(EngineError::Config(
                "the model's matrices are too large to address".into(),
            ));
        }
        Ok(geometry)
    }

    /// Rotated dimensions per head of the attention layers (the families here
    /// use one width for all of them); 0 when no layer is attention.
    pub fn rotary_dim(&self) -> usize {
        self.layers
            .iter()
            .find_map(|l| match l {
                LayerDims::Attention(a) => Some(a.rotary_dim),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Parameters of the layers' matrices and the embedding, counted with
    /// checked arithmetic.
    pub fn matrix_params(&self) -> Option<usize> {
        let h = self.hidden;
        let mut total = self.vocab.checked_mul(h)?;
        for layer in &self.layers {
            let mixer = match layer {
                LayerDims::Attention(a) => a
                    .q_rows()
                    .checked_add(2 * a.kv_dim())?
                    .checked_add(a.q_dim())?,
                LayerDims::DeltaNet(d) => d
                    .channels()
                    .checked_add(2 * d.n_v_heads * d.v_dim)?
                    .checked_add(2 * d.n_v_heads)?,
                LayerDims::ShortConv(c) => c.channels.checked_mul(4)?,
            };
            let mlp = self.intermediate.checked_mul(3)?;
            total = total.checked_add(mixer.checked_add(mlp)?.checked_mul(h)?)?;
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(json: &str) -> HfConfig {
        HfConfig::from_slice(json.as_bytes()).unwrap()
    }

    #[test]
    fn values_out_of_range_name_the_key_and_value() {
        let cfg = dims(r#"{"num_hidden_layers": 1000000000, "hidden_size": 0}"#);
        let d = Dims::new(&cfg);
        let e = d.required("num_hidden_layers", MAX_LAYERS).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config.json: `num_hidden_layers` is 1000000000: it must be between 1 and 1024"
        );
        let e = d.required("hidden_size", MAX_HIDDEN).unwrap_err();
        assert!(e.to_string().contains("`hidden_size` is 0"), "{e}");
        assert_eq!(d.optional("head_dim", 64, MAX_HEAD_DIM).unwrap(), 64);
        let eps = dims(r#"{"rms_norm_eps": 1e-60}"#);
        let e = Dims::new(&eps).eps("rms_norm_eps", 1e-6).unwrap_err();
        assert!(e.to_string().contains("rms_norm_eps"), "{e}");
        let zero = dims(r#"{"rms_norm_eps": 0}"#);
        assert!(Dims::new(&zero).eps("rms_norm_eps", 1e-6).is_err());
    }

    #[test]
    fn relations_between_sizes_are_checked() {
        assert!(AttentionDims::new(4, 3, 16, 16, false, None).is_err());
        assert!(AttentionDims::new(4, 2, 15, 14, false, None).is_err());
        assert!(AttentionDims::new(4, 2, 16, 18, false, None).is_err());
        assert!(AttentionDims::new(4, 2, 16, 16, false, Some(0)).is_err());
        assert!(AttentionDims::new(4, 2, 16, 16, false, Some(usize::MAX)).is_err());
        let a = AttentionDims::new(4, 2, 16, 8, true, Some(8)).unwrap();
        assert_eq!((a.q_rows(), a.q_dim(), a.kv_dim()), (128, 64, 32));
        assert!(DeltaNetDims::new(3, 16, 4, 16, 4).is_err());
        assert_eq!(DeltaNetDims::new(2, 16, 4, 24, 4).unwrap().channels(), 160);
        let g = Geometry::new(64, 320, 160, 2048, vec![LayerDims::Attention(a)]).unwrap();
        assert_eq!(
            g.matrix_params(),
            Some(320 * 64 + (128 + 64 + 64 + 480) * 64)
        );
        assert!(Geometry::new(64, 0, 160, 2048, vec![]).is_err());
        assert!(Geometry::new(64, 320, 160, 2048, vec![]).is_err());
    }
}
