//! Qwen3.5 (`qwen3_5_text`, and the text part of `qwen3_5` checkpoints):
//! Gated DeltaNet layers mixed with gated full-attention layers, as
//! `layer_types` says (by default every `full_attention_interval`-th layer
//! is full attention). Full attention carries a per-head output gate in
//! `q_proj`, normalises q and k, and rotates only the first
//! `partial_rotary_factor` of each head. Norms scale by `1 + w`.

use super::geometry::{
    AttentionDims, DeltaNetDims, Dims, Geometry, LayerDims, MAX_CONV_KERNEL, MAX_HEAD_DIM,
    MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB,
};
use super::{
    AttentionSpec, Binder, LLAMA_BLOCK, NormStyle, Translated, conv_taps, layer_types_or_periodic,
    layers_by_type, text_model_names,
};
use crate::layers::{GatedDeltaNet, Mixer, RmsNorm};
use crate::rope::Rope;
use crate::{EngineError, Result};
use hayate_formats::{HfConfig, TensorStore};

/// Sizes from the config (its `text_config` for multimodal checkpoints), checked.
pub fn geometry(top: &HfConfig) -> Result<Geometry> {
    let cfg = top.text_config()?;
    let model_type = top.model_type()?;
    let d = Dims::new(&cfg);
    let hidden = d.required("hidden_size", MAX_HIDDEN)?;
    let n_layers = d.required("num_hidden_layers", MAX_LAYERS)?;
    let n_heads = d.required("num_attention_heads", MAX_HEADS)?;
    let n_kv_heads = d.optional("num_key_value_heads", n_heads, MAX_HEADS)?;
    let head_dim = d.optional("head_dim", (hidden / n_heads).max(1), MAX_HEAD_DIM)?;
    let partial = cfg.rope()?.partial_rotary_factor;
    // transformers truncates the rotated share to an integer.
    let rotary_dim = (head_dim as f64 * partial) as usize;
    let attention = AttentionDims::new(n_heads, n_kv_heads, head_dim, rotary_dim, true, None)?;
    let delta = DeltaNetDims::new(
        d.optional("linear_num_key_heads", 16, MAX_HEADS)?,
        d.optional("linear_key_head_dim", 128, MAX_HEAD_DIM)?,
        d.optional("linear_num_value_heads", 32, MAX_HEADS)?,
        d.optional("linear_value_head_dim", 128, MAX_HEAD_DIM)?,
        d.optional("linear_conv_kernel_dim", 4, MAX_CONV_KERNEL)?,
    )?;
    let layer_types = layer_types_or_periodic(
        &cfg,
        n_layers,
        "full_attention_interval",
        4,
        "full_attention",
        "linear_attention",
    )?;
    let layers = layers_by_type(
        model_type,
        &layer_types,
        &[
            ("linear_attention", LayerDims::DeltaNet(delta)),
            ("full_attention", LayerDims::Attention(attention)),
        ],
    )?;
    Geometry::new(
        hidden,
        d.required("vocab_size", MAX_VOCAB)?,
        d.required("intermediate_size", MAX_INTERMEDIATE)?,
        d.optional("max_position_embeddings", 32768, MAX_POSITIONS)?,
        layers,
    )
}

/// Binds the tensors of a checkpoint with geometry `g`.
pub fn translate(top: &HfConfig, g: &Geometry, store: &TensorStore) -> Result<Translated> {
    let cfg = top.text_config()?;
    let model_type = top.model_type()?;
    let (hidden, intermediate) = (g.hidden, g.intermediate);
    let eps = Dims::new(&cfg).eps("rms_norm_eps", 1e-6)?;
    let b = Binder {
        store,
        eps,
        norms: NormStyle::OnePlus,
    };
    if let Some(act) = cfg.opt_str("hidden_act")?
        && act != "silu"
    {
        return Err(EngineError::Config(format!(
            "hidden_act `{act}` is not supported for {model_type} (supported: silu)"
        )));
    }
    let bias = cfg.opt_bool("attention_bias")?.unwrap_or(false);
    let rope_config = cfg.rope()?;

    let (model, head_name) = text_model_names(store);

    let mut blocks = Vec::with_capacity(g.layers.len());
    for (i, layer) in g.layers.iter().enumerate() {
        let p = format!("{model}.layers.{i}");
        let mixer = match layer {
            LayerDims::Attention(dims) => {
                let a = format!("{p}.self_attn");
                let spec = AttentionSpec {
                    out: "o_proj",
                    qk_norms: Some(("q_norm", "k_norm")),
                    biases: (bias, bias),
                    scale: 1.0 / (dims.head_dim as f32).sqrt(),
                    rope: 0,
                };
                Mixer::Attention(b.attention(&a, dims, hidden, spec)?)
            }
            LayerDims::DeltaNet(dims) => {
                let l = format!("{p}.linear_attn");
                let (n_k_heads, k_dim, n_v_heads, v_dim, kernel) = (
                    dims.n_k_heads,
                    dims.k_dim,
                    dims.n_v_heads,
                    dims.v_dim,
                    dims.kernel,
                );
                let value_dim = n_v_heads * v_dim;
                let channels = dims.channels();
                let a_log = store
                    .require(&format!("{l}.A_log"))?
                    .vector_f32(n_v_heads)?;
                Mixer::DeltaNet(GatedDeltaNet {
                    qkv: b.linear(&format!("{l}.in_proj_qkv"), channels, hidden, false)?,
                    z: b.linear(&format!("{l}.in_proj_z"), value_dim, hidden, false)?,
                    b: b.linear(&format!("{l}.in_proj_b"), n_v_heads, hidden, false)?,
                    a: b.linear(&format!("{l}.in_proj_a"), n_v_heads, hidden, false)?,
                    out: b.linear(&format!("{l}.out_proj"), hidden, value_dim, false)?,
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
            _ => unreachable!("qwen3_5 geometry has attention and DeltaNet layers only"),
        };
        let sizes = (hidden, intermediate);
        blocks.push(b.block(&p, mixer, &LLAMA_BLOCK, sizes, false)?);
    }

    let ropes = vec![Rope::new(&rope_config, g.rotary_dim())];
    let final_norm = format!("{model}.norm.weight");
    b.model(
        &cfg,
        g,
        &model,
        &final_norm,
        (&head_name, false),
        blocks,
        ropes,
    )
}
