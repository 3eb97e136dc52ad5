//! Qwen3.5 (`qwen3_5_text`, and the text part of `qwen3_5` checkpoints):
//! Gated DeltaNet layers mixed with gated full-attention layers, as
//! `layer_types` says (by default every `full_attention_interval`-th layer
//! is full attention). Full attention carries a per-head output gate in
//! `q_proj`, normalises q and k, and rotates only the first
//! `partial_rotary_factor` of each head. Norms scale by `1 + w`.

use super::{
    Translated, check_heads, conv_taps, layer_types_or_periodic, output_head, text_model_names,
    unknown_layer_type,
};
use crate::blocks::{
    Activation, Attention, Block, GatedDeltaNet, GatedMlp, Linear, Mixer, RmsNorm,
};
use crate::rope::Rope;
use crate::{EngineError, Result};
use hayate_formats::{HfConfig, TensorStore};

pub fn translate(top: &HfConfig, store: &TensorStore) -> Result<Translated> {
    let cfg = top.text_config()?;
    let model_type = top.model_type()?;
    let hidden = cfg.usize("hidden_size")?;
    let n_layers = cfg.usize("num_hidden_layers")?;
    let n_heads = cfg.usize("num_attention_heads")?;
    let n_kv_heads = cfg.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
    let head_dim = match cfg.opt_usize("head_dim")? {
        Some(d) => d,
        None => hidden / n_heads.max(1),
    };
    check_heads(hidden, n_heads, n_kv_heads, head_dim)?;
    let intermediate = cfg.usize("intermediate_size")?;
    let vocab = cfg.usize("vocab_size")?;
    let eps = cfg.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32;
    let max_positions = cfg.opt_usize("max_position_embeddings")?.unwrap_or(32768);
    if let Some(act) = cfg.opt_str("hidden_act")?
        && act != "silu"
    {
        return Err(EngineError::Config(format!(
            "hidden_act `{act}` is not supported for {model_type} (supported: silu)"
        )));
    }
    let bias = cfg.opt_bool("attention_bias")?.unwrap_or(false);

    let n_k_heads = cfg.opt_usize("linear_num_key_heads")?.unwrap_or(16);
    let k_dim = cfg.opt_usize("linear_key_head_dim")?.unwrap_or(128);
    let n_v_heads = cfg.opt_usize("linear_num_value_heads")?.unwrap_or(32);
    let v_dim = cfg.opt_usize("linear_value_head_dim")?.unwrap_or(128);
    let kernel = cfg.opt_usize("linear_conv_kernel_dim")?.unwrap_or(4);
    if n_k_heads == 0 || k_dim == 0 || n_v_heads == 0 || v_dim == 0 || kernel == 0 {
        return Err(EngineError::Config(
            "linear-attention head counts, head dims and conv kernel must be positive".into(),
        ));
    }
    if n_v_heads % n_k_heads != 0 {
        return Err(EngineError::Config(format!(
            "linear_num_value_heads ({n_v_heads}) is not a multiple of linear_num_key_heads ({n_k_heads})"
        )));
    }

    let layer_types = layer_types_or_periodic(
        &cfg,
        n_layers,
        "full_attention_interval",
        4,
        "full_attention",
        "linear_attention",
    )?;

    let rope_config = cfg.rope()?;
    let rotary_dim = (head_dim as f64 * rope_config.partial_rotary_factor) as usize;
    if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
        return Err(EngineError::Config(format!(
            "partial_rotary_factor {} of head_dim {head_dim} gives {rotary_dim} rotated dimensions; it must be even and positive",
            rope_config.partial_rotary_factor
        )));
    }

    let (model, head_name) = text_model_names(store);
    let linear = |name: &str, rows: usize, cols: usize, bias: bool| -> Result<Linear> {
        Ok(Linear::load(store, name, rows, cols, bias)?)
    };
    let norm = |name: &str, dim: usize| -> Result<RmsNorm> {
        Ok(RmsNorm::one_plus(store.require(name)?, dim, eps)?)
    };

    let mut blocks = Vec::with_capacity(n_layers);
    for (i, kind) in layer_types.iter().enumerate() {
        let p = format!("{model}.layers.{i}");
        let mixer = match kind.as_str() {
            "full_attention" => {
                let a = format!("{p}.self_attn");
                Mixer::Attention(Attention {
                    q: linear(&format!("{a}.q_proj"), 2 * n_heads * head_dim, hidden, bias)?,
                    k: linear(&format!("{a}.k_proj"), n_kv_heads * head_dim, hidden, bias)?,
                    v: linear(&format!("{a}.v_proj"), n_kv_heads * head_dim, hidden, bias)?,
                    o: linear(&format!("{a}.o_proj"), hidden, n_heads * head_dim, bias)?,
                    q_norm: Some(norm(&format!("{a}.q_norm.weight"), head_dim)?),
                    k_norm: Some(norm(&format!("{a}.k_norm.weight"), head_dim)?),
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    scale: 1.0 / (head_dim as f32).sqrt(),
                    output_gate: true,
                    rope: 0,
                    window: None,
                })
            }
            "linear_attention" => {
                let l = format!("{p}.linear_attn");
                let key_dim = n_k_heads * k_dim;
                let value_dim = n_v_heads * v_dim;
                let channels = 2 * key_dim + value_dim;
                let a_log = store
                    .require(&format!("{l}.A_log"))?
                    .vector_f32(n_v_heads)?;
                Mixer::DeltaNet(GatedDeltaNet {
                    qkv: linear(&format!("{l}.in_proj_qkv"), channels, hidden, false)?,
                    z: linear(&format!("{l}.in_proj_z"), value_dim, hidden, false)?,
                    b: linear(&format!("{l}.in_proj_b"), n_v_heads, hidden, false)?,
                    a: linear(&format!("{l}.in_proj_a"), n_v_heads, hidden, false)?,
                    out: linear(&format!("{l}.out_proj"), hidden, value_dim, false)?,
                    conv: conv_taps(
                        store.require(&format!("{l}.conv1d.weight"))?,
                        channels,
                        kernel,
                    )?,
                    kernel,
                    dt_bias: store
                        .require(&format!("{l}.dt_bias"))?
                        .vector_f32(n_v_heads)?,
                    neg_decay: a_log.iter().map(|a| -a.exp()).collect(),
                    norm: RmsNorm::new(store.require(&format!("{l}.norm.weight"))?, v_dim, eps)?,
                    n_k_heads,
                    k_dim,
                    n_v_heads,
                    v_dim,
                })
            }
            other => {
                return Err(unknown_layer_type(
                    model_type,
                    i,
                    other,
                    &["linear_attention", "full_attention"],
                ));
            }
        };
        blocks.push(Block {
            mixer_norm: norm(&format!("{p}.input_layernorm.weight"), hidden)?,
            mixer,
            post_mixer_norm: None,
            mlp_norm: norm(&format!("{p}.post_attention_layernorm.weight"), hidden)?,
            mlp: GatedMlp {
                gate: linear(&format!("{p}.mlp.gate_proj"), intermediate, hidden, false)?,
                up: linear(&format!("{p}.mlp.up_proj"), intermediate, hidden, false)?,
                down: linear(&format!("{p}.mlp.down_proj"), hidden, intermediate, false)?,
                activation: Activation::Silu,
            },
            post_mlp_norm: None,
        });
    }

    let embedding = linear(&format!("{model}.embed_tokens"), vocab, hidden, false)?;
    let lm_head = output_head(&cfg, store, &embedding, &head_name, false)?;
    Ok(Translated {
        embedding,
        blocks,
        final_norm: norm(&format!("{model}.norm.weight"), hidden)?,
        lm_head,
        ropes: vec![Rope::new(&rope_config, rotary_dim)],
        embed_scale: None,
        logit_softcap: None,
        hidden,
        vocab,
        max_positions,
    })
}
