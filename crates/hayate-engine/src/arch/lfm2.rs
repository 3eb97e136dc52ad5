//! LFM2 (`lfm2`): gated short-convolution layers mixed with attention
//! layers (q/k layer norms), as `layer_types` (or the older
//! `full_attn_idxs`) says. The final norm is named `embedding_norm`.

use super::{Translated, check_heads, conv_taps, output_head, unknown_layer_type};
use crate::blocks::{Activation, Attention, Block, GatedMlp, Linear, Mixer, RmsNorm, ShortConv};
use crate::rope::Rope;
use crate::{EngineError, Result};
use hayate_formats::{HfConfig, TensorStore};

pub fn translate(cfg: &HfConfig, store: &TensorStore) -> Result<Translated> {
    let model_type = cfg.model_type()?;
    let hidden = cfg.usize("hidden_size")?;
    let n_layers = cfg.usize("num_hidden_layers")?;
    let n_heads = cfg.usize("num_attention_heads")?;
    let n_kv_heads = cfg.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
    if n_heads == 0 || hidden % n_heads != 0 {
        return Err(EngineError::Config(format!(
            "hidden_size {hidden} is not a positive multiple of num_attention_heads {n_heads}"
        )));
    }
    let head_dim = hidden / n_heads;
    check_heads(hidden, n_heads, n_kv_heads, head_dim)?;
    let vocab = cfg.usize("vocab_size")?;
    let eps = cfg.opt_f64("norm_eps")?.unwrap_or(1e-5) as f32;
    let max_positions = cfg.opt_usize("max_position_embeddings")?.unwrap_or(128000);
    let ff = feed_forward_dim(cfg)?;
    let conv_bias = cfg.opt_bool("conv_bias")?.unwrap_or(false);
    let kernel = cfg.opt_usize("conv_L_cache")?.unwrap_or(3);
    if kernel == 0 {
        return Err(EngineError::Config("conv_L_cache must be positive".into()));
    }
    let layer_types = match cfg.layer_types(n_layers)? {
        Some(t) => t,
        None => {
            let full = cfg
                .opt_usize_list("full_attn_idxs")?
                .unwrap_or_else(|| (0..n_layers).collect());
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
    let rope = cfg.rope_for_layer_type("full_attention", None, 1e6)?;

    let linear = |name: &str, rows: usize, cols: usize, bias: bool| -> Result<Linear> {
        Ok(Linear::load(store, name, rows, cols, bias)?)
    };
    let norm = |name: &str, dim: usize| -> Result<RmsNorm> {
        Ok(RmsNorm::new(store.require(name)?, dim, eps)?)
    };

    let mut blocks = Vec::with_capacity(n_layers);
    for (i, kind) in layer_types.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let mixer = match kind.as_str() {
            "full_attention" => {
                let a = format!("{p}.self_attn");
                Mixer::Attention(Attention {
                    q: linear(&format!("{a}.q_proj"), n_heads * head_dim, hidden, false)?,
                    k: linear(&format!("{a}.k_proj"), n_kv_heads * head_dim, hidden, false)?,
                    v: linear(&format!("{a}.v_proj"), n_kv_heads * head_dim, hidden, false)?,
                    o: linear(&format!("{a}.out_proj"), hidden, n_heads * head_dim, false)?,
                    q_norm: Some(norm(&format!("{a}.q_layernorm.weight"), head_dim)?),
                    k_norm: Some(norm(&format!("{a}.k_layernorm.weight"), head_dim)?),
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    scale: 1.0 / (head_dim as f32).sqrt(),
                    output_gate: false,
                    rope: 0,
                    window: None,
                })
            }
            "conv" => {
                let c = format!("{p}.conv");
                Mixer::ShortConv(ShortConv {
                    in_proj: linear(&format!("{c}.in_proj"), 3 * hidden, hidden, conv_bias)?,
                    out: linear(&format!("{c}.out_proj"), hidden, hidden, conv_bias)?,
                    conv: conv_taps(store.require(&format!("{c}.conv.weight"))?, hidden, kernel)?,
                    conv_bias: conv_bias
                        .then(|| store.require(&format!("{c}.conv.bias"))?.vector_f32(hidden))
                        .transpose()?,
                    kernel,
                    channels: hidden,
                })
            }
            other => {
                return Err(unknown_layer_type(
                    model_type,
                    i,
                    other,
                    &["conv", "full_attention"],
                ));
            }
        };
        blocks.push(Block {
            mixer_norm: norm(&format!("{p}.operator_norm.weight"), hidden)?,
            mixer,
            post_mixer_norm: None,
            mlp_norm: norm(&format!("{p}.ffn_norm.weight"), hidden)?,
            mlp: GatedMlp {
                gate: linear(&format!("{p}.feed_forward.w1"), ff, hidden, false)?,
                up: linear(&format!("{p}.feed_forward.w3"), ff, hidden, false)?,
                down: linear(&format!("{p}.feed_forward.w2"), hidden, ff, false)?,
                activation: Activation::Silu,
            },
            post_mlp_norm: None,
        });
    }

    let embedding = linear("model.embed_tokens", vocab, hidden, false)?;
    let tied_by_default = cfg.opt_bool("tie_embedding")?.unwrap_or(true);
    let lm_head = output_head(cfg, store, &embedding, "lm_head", tied_by_default)?;
    Ok(Translated {
        embedding,
        blocks,
        final_norm: norm("model.embedding_norm.weight", hidden)?,
        lm_head,
        ropes: vec![Rope::new(&rope, head_dim)],
        embed_scale: None,
        logit_softcap: None,
        hidden,
        vocab,
        max_positions,
    })
}

/// The feed-forward width: `intermediate_size` (or the older
/// `block_ff_dim`), shrunk to two thirds, scaled and rounded up to a
/// multiple when `block_auto_adjust_ff_dim` is set, as `transformers` does.
fn feed_forward_dim(cfg: &HfConfig) -> Result<usize> {
    let size = match cfg.opt_usize("intermediate_size")? {
        Some(s) => s,
        None => cfg.usize("block_ff_dim")?,
    };
    let mut ff = size;
    if cfg.opt_bool("block_auto_adjust_ff_dim")?.unwrap_or(true) {
        ff = 2 * ff / 3;
        if let Some(m) = cfg.opt_f64("block_ffn_dim_multiplier")? {
            ff = (m * ff as f64) as usize;
        }
        let multiple = cfg.opt_usize("block_multiple_of")?.unwrap_or(256).max(1);
        ff = ff.div_ceil(multiple) * multiple;
    }
    if ff == 0 {
        return Err(EngineError::Config("the feed-forward width is 0".into()));
    }
    Ok(ff)
}
