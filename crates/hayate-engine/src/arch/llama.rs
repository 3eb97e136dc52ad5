//! The Llama family: `llama`, `qwen2` (q/k/v biases) and `qwen3` (q/k norms).
//! One pre-norm decoder layer shape, with features switched by `model_type`
//! and config keys.

use super::geometry::{
    AttentionDims, Dims, Geometry, LayerDims, MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN,
    MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB,
};
use super::{AttentionSpec, Binder, LLAMA_BLOCK, NormStyle, Translated};
use crate::layers::Mixer;
use crate::rope::Rope;
use crate::{EngineError, Result};
use hayate_formats::{HfConfig, TensorStore};

/// Sizes from the config, checked.
pub fn geometry(cfg: &HfConfig) -> Result<Geometry> {
    let d = Dims::new(cfg);
    let hidden = d.required("hidden_size", MAX_HIDDEN)?;
    let n_layers = d.required("num_hidden_layers", MAX_LAYERS)?;
    let n_heads = d.required("num_attention_heads", MAX_HEADS)?;
    let n_kv_heads = d.optional("num_key_value_heads", n_heads, MAX_HEADS)?;
    let head_dim = match d.maybe("head_dim", MAX_HEAD_DIM)? {
        Some(h) => h,
        None if hidden.is_multiple_of(n_heads) => hidden / n_heads,
        None => {
            return Err(EngineError::Config(format!(
                "hidden_size {hidden} is not divisible by num_attention_heads {n_heads}; set head_dim"
            )));
        }
    };
    let attention = AttentionDims::new(n_heads, n_kv_heads, head_dim, head_dim, false, None)?;
    Geometry::new(
        hidden,
        d.required("vocab_size", MAX_VOCAB)?,
        d.required("intermediate_size", MAX_INTERMEDIATE)?,
        d.optional("max_position_embeddings", 2048, MAX_POSITIONS)?,
        vec![LayerDims::Attention(attention); n_layers],
    )
}

/// Binds the tensors of a checkpoint with geometry `g`.
pub fn translate(cfg: &HfConfig, g: &Geometry, store: &TensorStore) -> Result<Translated> {
    let model_type = cfg.model_type()?;
    let (hidden, intermediate) = (g.hidden, g.intermediate);
    let LayerDims::Attention(dims) = &g.layers[0] else {
        unreachable!("llama geometry has attention layers only")
    };
    let head_dim = dims.head_dim;
    let eps = Dims::new(cfg).eps("rms_norm_eps", 1e-6)?;
    let b = Binder {
        store,
        eps,
        norms: NormStyle::Plain,
    };
    match cfg.opt_str("hidden_act")?.unwrap_or("silu") {
        "silu" => {}
        other => {
            return Err(EngineError::Config(format!(
                "hidden_act `{other}` is not supported for {model_type} (supported: silu)"
            )));
        }
    }
    if cfg.opt_bool("use_sliding_window")?.unwrap_or(false) {
        return Err(EngineError::Config(
            "use_sliding_window is set; sliding-window attention is not supported for this model_type yet".into(),
        ));
    }
    let (qkv_bias, o_bias, qk_norm) = match model_type {
        "qwen2" => (true, false, false),
        "qwen3" => {
            let b = cfg.opt_bool("attention_bias")?.unwrap_or(false);
            (b, b, true)
        }
        _ => {
            let b = cfg.opt_bool("attention_bias")?.unwrap_or(false);
            (b, b, false)
        }
    };
    let mlp_bias = cfg.opt_bool("mlp_bias")?.unwrap_or(false);

    let mut blocks = Vec::with_capacity(g.layers.len());
    for i in 0..g.layers.len() {
        let p = format!("model.layers.{i}");
        let spec = AttentionSpec {
            out: "o_proj",
            qk_norms: qk_norm.then_some(("q_norm", "k_norm")),
            biases: (qkv_bias, o_bias),
            scale: 1.0 / (head_dim as f32).sqrt(),
            rope: 0,
        };
        let attention = b.attention(&format!("{p}.self_attn"), dims, hidden, spec)?;
        let mixer = Mixer::Attention(attention);
        let sizes = (hidden, intermediate);
        blocks.push(b.block(&p, mixer, &LLAMA_BLOCK, sizes, mlp_bias)?);
    }

    let ropes = vec![Rope::new(&cfg.rope()?, g.rotary_dim())];
    b.model(
        cfg,
        g,
        "model",
        "model.norm.weight",
        ("lm_head", false),
        blocks,
        ropes,
    )
}
