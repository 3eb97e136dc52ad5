//! LFM2 (`lfm2`): gated short-convolution layers mixed with attention
//! layers (q/k layer norms), as `layer_types` (or the older
//! `full_attn_idxs`) says. The final norm is named `embedding_norm`.

use super::geometry::{
    AttentionDims, Dims, Geometry, LayerDims, MAX_CONV_KERNEL, MAX_HEADS, MAX_HIDDEN,
    MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, ShortConvDims, in_range, positive,
};
use super::{AttentionSpec, Binder, BlockLayout, NormStyle, Translated, conv_taps, layers_by_type};
use crate::layers::{Activation, Mixer, ShortConv};
use crate::rope::Rope;
use crate::{EngineError, Result};
use hayate_formats::{HfConfig, TensorStore};

/// LFM2's block: pre-norms, a SwiGLU MLP named `w1` (gate), `w3` (up), `w2` (down).
const LFM2_BLOCK: BlockLayout = BlockLayout {
    mixer_norm: "operator_norm",
    post_mixer_norm: None,
    mlp_norm: "ffn_norm",
    post_mlp_norm: None,
    mlp: "feed_forward",
    mlp_parts: ["w1", "w3", "w2"],
    activation: Activation::Silu,
};

/// Sizes from the config, checked.
pub fn geometry(cfg: &HfConfig) -> Result<Geometry> {
    let model_type = cfg.model_type()?;
    let d = Dims::new(cfg);
    let hidden = d.required("hidden_size", MAX_HIDDEN)?;
    let n_layers = d.required("num_hidden_layers", MAX_LAYERS)?;
    let n_heads = d.required("num_attention_heads", MAX_HEADS)?;
    let n_kv_heads = d.optional("num_key_value_heads", n_heads, MAX_HEADS)?;
    if !hidden.is_multiple_of(n_heads) {
        return Err(EngineError::Config(format!(
            "hidden_size {hidden} is not a multiple of num_attention_heads {n_heads}"
        )));
    }
    let head_dim = hidden / n_heads;
    let attention = AttentionDims::new(n_heads, n_kv_heads, head_dim, head_dim, false, None)?;
    let conv = ShortConvDims::new(hidden, d.optional("conv_L_cache", 3, MAX_CONV_KERNEL)?)?;
    let layer_types = match cfg.layer_types(n_layers)? {
        Some(t) => t,
        None => {
            let full = cfg
                .opt_usize_list("full_attn_idxs")?
                .unwrap_or_else(|| (0..n_layers).collect());
            if let Some(bad) = full.iter().find(|&&i| i >= n_layers) {
                return Err(EngineError::Config(format!(
                    "`full_attn_idxs` names layer {bad}, but the model has {n_layers}"
                )));
            }
            (0..n_layers)
                .map(|i| {
                    if full.contains(&i) {
                        "full_attention"
                    } else {
                        "conv"
                    }
                    .to_owned()
                })
                .collect()
        }
    };
    let layers = layers_by_type(
        model_type,
        &layer_types,
        &[
            ("conv", LayerDims::ShortConv(conv)),
            ("full_attention", LayerDims::Attention(attention)),
        ],
    )?;
    Geometry::new(
        hidden,
        d.required("vocab_size", MAX_VOCAB)?,
        feed_forward_dim(cfg)?,
        d.optional("max_position_embeddings", 128000, MAX_POSITIONS)?,
        layers,
    )
}

/// Binds the tensors of a checkpoint with geometry `g`.
pub fn translate(cfg: &HfConfig, g: &Geometry, store: &TensorStore) -> Result<Translated> {
    let (hidden, ff) = (g.hidden, g.intermediate);
    let eps = Dims::new(cfg).eps("norm_eps", 1e-5)?;
    let b = Binder {
        store,
        eps,
        norms: NormStyle::Plain,
    };
    let conv_bias = cfg.opt_bool("conv_bias")?.unwrap_or(false);
    let rope = cfg.rope_for_layer_type("full_attention", None, 1e6)?;

    let mut blocks = Vec::with_capacity(g.layers.len());
    for (i, layer) in g.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let mixer = match layer {
            LayerDims::Attention(dims) => {
                let a = format!("{p}.self_attn");
                let spec = AttentionSpec {
                    out: "out_proj",
                    qk_norms: Some(("q_layernorm", "k_layernorm")),
                    biases: (false, false),
                    scale: 1.0 / (dims.head_dim as f32).sqrt(),
                    rope: 0,
                };
                Mixer::Attention(b.attention(&a, dims, hidden, spec)?)
            }
            LayerDims::ShortConv(dims) => {
                let kernel = dims.kernel;
                let c = format!("{p}.conv");
                Mixer::ShortConv(ShortConv {
                    in_proj: b.linear(&format!("{c}.in_proj"), 3 * hidden, hidden, conv_bias)?,
                    out: b.linear(&format!("{c}.out_proj"), hidden, hidden, conv_bias)?,
                    conv: conv_taps(store.require(&format!("{c}.conv.weight"))?, hidden, kernel)?,
                    conv_bias: conv_bias
                        .then(|| store.require(&format!("{c}.conv.bias"))?.vector_f32(hidden))
                        .transpose()?,
                    kernel,
                    channels: hidden,
                })
            }
            _ => unreachable!("lfm2 geometry has attention and convolution layers only"),
        };
        blocks.push(b.block(&p, mixer, &LFM2_BLOCK, (hidden, ff), false)?);
    }

    let tied_by_default = cfg.opt_bool("tie_embedding")?.unwrap_or(true);
    let ropes = vec![Rope::new(&rope, g.rotary_dim())];
    let head = ("lm_head", tied_by_default);
    b.model(
        cfg,
        g,
        "model",
        "model.embedding_norm.weight",
        head,
        blocks,
        ropes,
    )
}

/// The feed-forward width: `intermediate_size` (or the older
/// `block_ff_dim`), shrunk to two thirds, scaled and rounded up to a
/// multiple when `block_auto_adjust_ff_dim` is set, as `transformers` does.
fn feed_forward_dim(cfg: &HfConfig) -> Result<usize> {
    let size = match cfg.opt_usize("intermediate_size")? {
        Some(s) => s,
        None => cfg.usize("block_ff_dim")?,
    };
    let key = "intermediate_size";
    let mut ff = in_range(key, size, MAX_INTERMEDIATE)?;
    if cfg.opt_bool("block_auto_adjust_ff_dim")?.unwrap_or(true) {
        ff = 2 * ff / 3;
        if let Some(m) = cfg.opt_f64("block_ffn_dim_multiplier")? {
            ff = (positive("block_ffn_dim_multiplier", m, 1e3)? * ff as f64) as usize;
        }
        let multiple = Dims::new(cfg).optional("block_multiple_of", 256, MAX_INTERMEDIATE)?;
        ff = ff.div_ceil(multiple) * multiple;
    }
    in_range("the adjusted feed-forward width", ff, MAX_INTERMEDIATE)
}
