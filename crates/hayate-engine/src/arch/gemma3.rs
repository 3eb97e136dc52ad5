//! Gemma 3 (`gemma3_text`, and the text part of `gemma3` checkpoints):
//! sliding-window attention on the layers `layer_types` marks (by default
//! five of every six), global attention elsewhere, each kind with its own
//! rotary base. Four `(1 + w)` norms per layer (before and after attention
//! and the MLP), q/k norms, scores scaled by `query_pre_attn_scalar^-1/2`,
//! embeddings scaled by `sqrt(hidden)`, a GELU-tanh MLP and optional final
//! logit soft-capping. (`attn_logit_softcapping` is ignored, as the
//! `transformers` implementation of Gemma 3 ignores it.)

use super::geometry::{
    AttentionDims, Dims, Geometry, LayerDims, MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN,
    MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, positive,
};
use super::{
    AttentionSpec, Binder, BlockLayout, NormStyle, Translated, layer_types_or_periodic,
    layers_by_type, text_model_names,
};
use crate::layers::{Activation, Mixer};
use crate::rope::Rope;
use crate::{EngineError, Result};
use hayate_formats::{HfConfig, TensorStore};

/// Indices into [`Translated::ropes`].
const LOCAL_ROPE: usize = 0;
const GLOBAL_ROPE: usize = 1;

/// Gemma's block: norms before and after both sublayers, a GeGLU MLP.
const GEMMA3_BLOCK: BlockLayout = BlockLayout {
    mixer_norm: "input_layernorm",
    post_mixer_norm: Some("post_attention_layernorm"),
    mlp_norm: "pre_feedforward_layernorm",
    post_mlp_norm: Some("post_feedforward_layernorm"),
    mlp: "mlp",
    mlp_parts: ["gate_proj", "up_proj", "down_proj"],
    activation: Activation::GeluTanh,
};

/// Sizes from the config (its `text_config` for multimodal checkpoints), checked.
pub fn geometry(top: &HfConfig) -> Result<Geometry> {
    let cfg = top.text_config()?;
    let model_type = top.model_type()?;
    let d = Dims::new(&cfg);
    let n_layers = d.required("num_hidden_layers", MAX_LAYERS)?;
    let n_heads = d.required("num_attention_heads", MAX_HEADS)?;
    let n_kv_heads = d.optional("num_key_value_heads", n_heads, MAX_HEADS)?;
    let head_dim = d.optional("head_dim", 256, MAX_HEAD_DIM)?;
    let window = d.optional("sliding_window", 4096, MAX_POSITIONS)?;
    let layer_types = layer_types_or_periodic(
        &cfg,
        n_layers,
        "sliding_window_pattern",
        6,
        "full_attention",
        "sliding_attention",
    )?;
    let attention =
        |window| AttentionDims::new(n_heads, n_kv_heads, head_dim, head_dim, false, window);
    let layers = layers_by_type(
        model_type,
        &layer_types,
        &[
            (
                "sliding_attention",
                LayerDims::Attention(attention(Some(window))?),
            ),
            ("full_attention", LayerDims::Attention(attention(None)?)),
        ],
    )?;
    Geometry::new(
        d.required("hidden_size", MAX_HIDDEN)?,
        d.required("vocab_size", MAX_VOCAB)?,
        d.required("intermediate_size", MAX_INTERMEDIATE)?,
        d.optional("max_position_embeddings", 131072, MAX_POSITIONS)?,
        layers,
    )
}

/// Binds the tensors of a checkpoint with geometry `g`.
pub fn translate(top: &HfConfig, g: &Geometry, store: &TensorStore) -> Result<Translated> {
    let cfg = top.text_config()?;
    let model_type = top.model_type()?;
    let (hidden, intermediate) = (g.hidden, g.intermediate);
    let d = Dims::new(&cfg);
    let eps = d.eps("rms_norm_eps", 1e-6)?;
    let b = Binder {
        store,
        eps,
        norms: NormStyle::OnePlus,
    };
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
    let query_scalar = d.positive_f64("query_pre_attn_scalar", 256.0, 1e30)?;
    let softcap = cfg
        .opt_f64("final_logit_softcapping")?
        .map(|c| positive("final_logit_softcapping", c, 1e30))
        .transpose()?;
    let local =
        cfg.rope_for_layer_type("sliding_attention", Some("rope_local_base_freq"), 10000.0)?;
    let global = cfg.rope_for_layer_type("full_attention", None, 1e6)?;

    let (model, head_name) = text_model_names(store);

    let mut blocks = Vec::with_capacity(g.layers.len());
    for (i, layer) in g.layers.iter().enumerate() {
        let LayerDims::Attention(dims) = layer else {
            unreachable!("gemma3 geometry has attention layers only")
        };
        let rope = if dims.window.is_some() {
            LOCAL_ROPE
        } else {
            GLOBAL_ROPE
        };
        let p = format!("{model}.layers.{i}");
        let a = format!("{p}.self_attn");
        let spec = AttentionSpec {
            out: "o_proj",
            qk_norms: Some(("q_norm", "k_norm")),
            biases: (bias, bias),
            scale: (1.0 / query_scalar.sqrt()) as f32,
            rope,
        };
        let attention = b.attention(&a, dims, hidden, spec)?;
        let mixer = Mixer::Attention(attention);
        let sizes = (hidden, intermediate);
        blocks.push(b.block(&p, mixer, &GEMMA3_BLOCK, sizes, false)?);
    }

    let ropes = vec![
        Rope::new(&local, g.rotary_dim()),
        Rope::new(&global, g.rotary_dim()),
    ];
    let final_norm = format!("{model}.norm.weight");
    let mut translated = b.model(
        &cfg,
        g,
        &model,
        &final_norm,
        (&head_name, true),
        blocks,
        ropes,
    )?;
    translated.embed_scale = Some((hidden as f32).sqrt());
    translated.logit_softcap = softcap.map(|c| c as f32);
    Ok(translated)
}
