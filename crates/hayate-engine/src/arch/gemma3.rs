//! Gemma 3 (`gemma3_text`, and the text part of `gemma3` checkpoints):
//! sliding-window attention on the layers `layer_types` marks (by default
//! five of every six), global attention elsewhere, each kind with its own
//! rotary base. Four `(1 + w)` norms per layer (before and after attention
//! and the MLP), q/k norms, scores scaled by `query_pre_attn_scalar^-1/2`,
//! embeddings scaled by `sqrt(hidden)`, a GELU-tanh MLP and optional final
//! logit soft-capping. (`attn_logit_softcapping` is ignored, as the
//! `transformers` implementation of Gemma 3 ignores it.)

use super::{
    Translated, check_heads, layer_types_or_periodic, output_head, text_model_names,
    unknown_layer_type,
};
use crate::blocks::{Activation, Attention, Block, GatedMlp, Linear, Mixer, RmsNorm};
use crate::rope::Rope;
use crate::{EngineError, Result};
use hayate_formats::{HfConfig, TensorStore};

/// Indices into [`Translated::ropes`].
const LOCAL_ROPE: usize = 0;
const GLOBAL_ROPE: usize = 1;

pub fn translate(top: &HfConfig, store: &TensorStore) -> Result<Translated> {
    let cfg = top.text_config()?;
    let model_type = top.model_type()?;
    let hidden = cfg.usize("hidden_size")?;
    let n_layers = cfg.usize("num_hidden_layers")?;
    let n_heads = cfg.usize("num_attention_heads")?;
    let n_kv_heads = cfg.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
    let head_dim = cfg.opt_usize("head_dim")?.unwrap_or(256);
    check_heads(hidden, n_heads, n_kv_heads, head_dim)?;
    let intermediate = cfg.usize("intermediate_size")?;
    let vocab = cfg.usize("vocab_size")?;
    let eps = cfg.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32;
    let max_positions = cfg.opt_usize("max_position_embeddings")?.unwrap_or(131072);
    let act = cfg
        .opt_str("hidden_activation")?
        .or(cfg.opt_str("hidden_act")?)
        .unwrap_or("gelu_pytorch_tanh");
    if act != "gelu_pytorch_tanh" {
        return Err(EngineError::Config(format!(
            "hidden_activation `{act}` is not supported for {model_type} (supported: gelu_pytorch_tanh)"
        )));
    }
    if cfg
        .opt_bool("use_bidirectional_attention")?
        .unwrap_or(false)
    {
        return Err(EngineError::Config(
            "use_bidirectional_attention (Gemma embedding models) is not supported".into(),
        ));
    }
    let bias = cfg.opt_bool("attention_bias")?.unwrap_or(false);
    let query_scalar = cfg.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
    if query_scalar.is_nan() || query_scalar <= 0.0 {
        return Err(EngineError::Config(format!(
            "query_pre_attn_scalar must be positive, not {query_scalar}"
        )));
    }
    let window = cfg.opt_usize("sliding_window")?.unwrap_or(4096);
    if window == 0 {
        return Err(EngineError::Config(
            "sliding_window must be positive".into(),
        ));
    }
    let softcap = cfg.opt_f64("final_logit_softcapping")?;
    if softcap.is_some_and(|c| c.is_nan() || c <= 0.0) {
        return Err(EngineError::Config(
            "final_logit_softcapping must be positive".into(),
        ));
    }

    let layer_types = layer_types_or_periodic(
        &cfg,
        n_layers,
        "sliding_window_pattern",
        6,
        "full_attention",
        "sliding_attention",
    )?;
    let local =
        cfg.rope_for_layer_type("sliding_attention", Some("rope_local_base_freq"), 10000.0)?;
    let global = cfg.rope_for_layer_type("full_attention", None, 1e6)?;

    let (model, head_name) = text_model_names(store);
    let linear = |name: &str, rows: usize, cols: usize, bias: bool| -> Result<Linear> {
        Ok(Linear::load(store, name, rows, cols, bias)?)
    };
    let norm = |name: &str, dim: usize| -> Result<RmsNorm> {
        Ok(RmsNorm::one_plus(store.require(name)?, dim, eps)?)
    };

    let mut blocks = Vec::with_capacity(n_layers);
    for (i, kind) in layer_types.iter().enumerate() {
        let (rope, window) = match kind.as_str() {
            "sliding_attention" => (LOCAL_ROPE, Some(window)),
            "full_attention" => (GLOBAL_ROPE, None),
            other => {
                return Err(unknown_layer_type(
                    model_type,
                    i,
                    other,
                    &["sliding_attention", "full_attention"],
                ));
            }
        };
        let p = format!("{model}.layers.{i}");
        let a = format!("{p}.self_attn");
        let attention = Attention {
            q: linear(&format!("{a}.q_proj"), n_heads * head_dim, hidden, bias)?,
            k: linear(&format!("{a}.k_proj"), n_kv_heads * head_dim, hidden, bias)?,
            v: linear(&format!("{a}.v_proj"), n_kv_heads * head_dim, hidden, bias)?,
            o: linear(&format!("{a}.o_proj"), hidden, n_heads * head_dim, bias)?,
            q_norm: Some(norm(&format!("{a}.q_norm.weight"), head_dim)?),
            k_norm: Some(norm(&format!("{a}.k_norm.weight"), head_dim)?),
            n_heads,
            n_kv_heads,
            head_dim,
            scale: (1.0 / query_scalar.sqrt()) as f32,
            output_gate: false,
            rope,
            window,
        };
        blocks.push(Block {
            mixer_norm: norm(&format!("{p}.input_layernorm.weight"), hidden)?,
            mixer: Mixer::Attention(attention),
            post_mixer_norm: Some(norm(
                &format!("{p}.post_attention_layernorm.weight"),
                hidden,
            )?),
            mlp_norm: norm(&format!("{p}.pre_feedforward_layernorm.weight"), hidden)?,
            mlp: GatedMlp {
                gate: linear(&format!("{p}.mlp.gate_proj"), intermediate, hidden, false)?,
                up: linear(&format!("{p}.mlp.up_proj"), intermediate, hidden, false)?,
                down: linear(&format!("{p}.mlp.down_proj"), hidden, intermediate, false)?,
                activation: Activation::GeluTanh,
            },
            post_mlp_norm: Some(norm(
                &format!("{p}.post_feedforward_layernorm.weight"),
                hidden,
            )?),
        });
    }

    let embedding = linear(&format!("{model}.embed_tokens"), vocab, hidden, false)?;
    let lm_head = output_head(&cfg, store, &embedding, &head_name, true)?;
    Ok(Translated {
        embedding,
        blocks,
        final_norm: norm(&format!("{model}.norm.weight"), hidden)?,
        lm_head,
        ropes: vec![Rope::new(&local, head_dim), Rope::new(&global, head_dim)],
        embed_scale: Some((hidden as f32).sqrt()),
        logit_softcap: softcap.map(|c| c as f32),
        hidden,
        vocab,
        max_positions,
    })
}
