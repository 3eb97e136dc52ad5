//! Translators: each turns one family of `model_type`s into generic blocks.

mod gemma3;
pub mod geometry;
mod lfm2;
mod llama;
mod qwen3_5;

pub use self::geometry::Geometry;
use crate::layers::{Activation, Attention, Block, GatedMlp, Mixer, RmsNorm};
use crate::linear::{Linear, gather_rows};
use crate::rope::Rope;
use crate::{EngineError, Result};
use hayate_formats::{HfConfig, Tensor, TensorStore};

/// What a translator produces: the blocks and the tensors around them.
pub struct Translated {
    /// Token embedding, `[vocab, hidden]`.
    pub embedding: Linear,
    /// The layers, in order.
    pub blocks: Vec<Block>,
    /// Norm after the last layer.
    pub final_norm: RmsNorm,
    /// Output projection to the vocabulary (may share the embedding's tensor).
    pub lm_head: Linear,
    /// Rotary frequency tables; each attention layer names the one it uses.
    pub ropes: Vec<Rope>,
    /// Factor applied to embedding rows (Gemma: `sqrt(hidden)`).
    pub embed_scale: Option<f32>,
    /// Logits become `cap · tanh(logits / cap)` (Gemma's final soft-capping).
    pub logit_softcap: Option<f32>,
    /// Hidden size.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Longest context the model was configured for.
    pub max_positions: usize,
}

/// How one family of `model_type`s becomes blocks, in two steps: the
/// sizes from the config alone (checked before any file is opened), then
/// the blocks, binding and checking every tensor.
#[derive(Clone, Copy)]
pub struct Translator {
    /// Every size the model needs, from `config.json`.
    pub geometry: fn(&HfConfig) -> Result<Geometry>,
    /// The blocks of a checkpoint with that geometry.
    pub build: fn(&HfConfig, &Geometry, &TensorStore) -> Result<Translated>,
}

impl Translator {
    /// The translator of one family's two steps.
    const fn of(
        geometry: fn(&HfConfig) -> Result<Geometry>,
        build: fn(&HfConfig, &Geometry, &TensorStore) -> Result<Translated>,
    ) -> Self {
        Translator { geometry, build }
    }
}

const LLAMA: Translator = Translator::of(llama::geometry, llama::translate);
const QWEN3_5: Translator = Translator::of(qwen3_5::geometry, qwen3_5::translate);
const GEMMA3: Translator = Translator::of(gemma3::geometry, gemma3::translate);
const LFM2: Translator = Translator::of(lfm2::geometry, lfm2::translate);

/// Every supported `model_type` and its translator.
const TRANSLATORS: &[(&str, Translator)] = &[
    ("llama", LLAMA),
    ("qwen2", LLAMA),
    ("qwen3", LLAMA),
    ("qwen3_5_text", QWEN3_5),
    ("qwen3_5", QWEN3_5),
    ("gemma3_text", GEMMA3),
    ("gemma3", GEMMA3),
    ("lfm2", LFM2),
];

/// The `model_type`s Hayate can run.
pub fn supported() -> Vec<&'static str> {
    TRANSLATORS.iter().map(|(name, _)| *name).collect()
}

/// The checked geometry of a config of any supported `model_type`.
pub fn geometry(config: &HfConfig) -> Result<Geometry> {
    (translator(config)?.geometry)(config)
}

/// The translator for `config`'s `model_type`; an error listing the supported ones otherwise.
pub fn translator(config: &HfConfig) -> Result<Translator> {
    let model_type = config.model_type()?;
    TRANSLATORS
        .iter()
        .find(|(name, _)| *name == model_type)
        .map(|(_, translate)| *translate)
        .ok_or_else(|| EngineError::UnsupportedArchitecture {
            model_type: model_type.to_owned(),
            supported: supported(),
        })
}

/// Where a checkpoint keeps its language model: `model.*` for text-only
/// checkpoints, `model.language_model.*` for multimodal ones as
/// `transformers` 5 saves them, `language_model.model.*` in older
/// multimodal exports. Returns the prefix of the text model and the name of
/// the output head. Tensors outside them (a vision tower, multi-token
/// prediction heads) are not loaded, and the log says so.
pub(crate) fn text_model_names(store: &TensorStore) -> (String, String) {
    let has = |prefix: &str| has_matrix(store, &format!("{prefix}.embed_tokens"));
    let (model, head) = if has("model.language_model") {
        ("model.language_model", "lm_head")
    } else if has("language_model.model") {
        ("language_model.model", "language_model.lm_head")
    } else {
        ("model", "lm_head")
    };
    let ignored = store
        .names()
        .filter(|n| !n.starts_with(&format!("{model}.")) && !n.starts_with(&format!("{head}.")))
        .count();
    if ignored > 0 {
        tracing::info!(
            "loading the language model under `{model}`; ignoring {ignored} other tensors (vision tower, extra heads)"
        );
    }
    (model.to_owned(), head.to_owned())
}

/// Whether `store` holds matrix `name`, float or quantized.
fn has_matrix(store: &TensorStore, name: &str) -> bool {
    store.get(&format!("{name}.weight")).is_some()
        || store.get(&format!("{name}.qweight")).is_some()
}

/// Convolution taps of a depthwise `[channels, 1, kernel]` weight, reordered
/// `[kernel][channels]` for the kernel.
pub(crate) fn conv_taps(tensor: &Tensor, channels: usize, kernel: usize) -> Result<Vec<f32>> {
    let w = tensor.array_f32(&[channels, 1, kernel])?;
    let mut taps = vec![0f32; kernel * channels];
    for c in 0..channels {
        for j in 0..kernel {
            taps[j * channels + c] = w[c * kernel + j];
        }
    }
    Ok(taps)
}

/// How a family's norms scale: by `w`, or by `1 + w` (zero-centred weights:
/// Gemma, Qwen3.5).
#[derive(Clone, Copy)]
pub(crate) enum NormStyle {
    Plain,
    OnePlus,
}

/// How a family's attention differs beyond its sizes: tensor names besides
/// `{q,k,v}_proj`, biases, score scale and rotary table.
#[derive(Clone, Copy)]
pub(crate) struct AttentionSpec {
    /// The output projection (`o_proj`, `out_proj`).
    pub out: &'static str,
    /// The per-head query and key norms, if the family has them.
    pub qk_norms: Option<(&'static str, &'static str)>,
    /// Whether q, k and v have biases, and whether the output has one.
    pub biases: (bool, bool),
    /// Score scale.
    pub scale: f32,
    /// Index of the layer's rotary table.
    pub rope: usize,
}

/// How a family names a block's norms and MLP, and the MLP's activation.
pub(crate) struct BlockLayout {
    pub mixer_norm: &'static str,
    pub post_mixer_norm: Option<&'static str>,
    pub mlp_norm: &'static str,
    pub post_mlp_norm: Option<&'static str>,
    /// The MLP's prefix inside the block.
    pub mlp: &'static str,
    /// Its gate, up and down projections, in that order.
    pub mlp_parts: [&'static str; 3],
    pub activation: Activation,
}

/// Llama's block, which most families share: pre-norms only, a SwiGLU MLP.
pub(crate) const LLAMA_BLOCK: BlockLayout = BlockLayout {
    mixer_norm: "input_layernorm",
    post_mixer_norm: None,
    mlp_norm: "post_attention_layernorm",
    post_mlp_norm: None,
    mlp: "mlp",
    mlp_parts: ["gate_proj", "up_proj", "down_proj"],
    activation: Activation::Silu,
};

/// The tensor lookups every translator makes, bound to one checkpoint.
pub(crate) struct Binder<'a> {
    pub store: &'a TensorStore,
    /// Epsilon of the family's norms.
    pub eps: f32,
    pub norms: NormStyle,
}

impl Binder<'_> {
    /// Linear layer `name` (`name.weight` or quantized tensors), `rows x cols`.
    pub fn linear(&self, name: &str, rows: usize, cols: usize, bias: bool) -> Result<Linear> {
        Ok(Linear::load(self.store, name, rows, cols, bias)?)
    }

    /// The family's norm over `dim` channels from tensor `name`.
    pub fn norm(&self, name: &str, dim: usize) -> Result<RmsNorm> {
        let weight = self.store.require(name)?;
        Ok(match self.norms {
            NormStyle::Plain => RmsNorm::new(weight, dim, self.eps)?,
            NormStyle::OnePlus => RmsNorm::one_plus(weight, dim, self.eps)?,
        })
    }

    /// Attention of sizes `dims` from `{prefix}.{q,k,v}_proj` and
    /// `{prefix}.{spec.out}`, with the q/k norms `spec.qk_norms` if any.
    pub fn attention(
        &self,
        prefix: &str,
        dims: &geometry::AttentionDims,
        hidden: usize,
        spec: AttentionSpec,
    ) -> Result<Attention> {
        let head_dim = dims.head_dim;
        let (qkv_bias, out_bias) = spec.biases;
        let qk_norm = |name: Option<&str>| {
            name.map(|n| self.norm(&format!("{prefix}.{n}.weight"), head_dim))
                .transpose()
        };
        let q_name = format!("{prefix}.q_proj");
        let (q, gate) = if dims.output_gate {
            let (q, gate) = self.gated_query(&q_name, dims, hidden, qkv_bias)?;
            (q, Some(gate))
        } else {
            (self.linear(&q_name, dims.q_dim(), hidden, qkv_bias)?, None)
        };
        Ok(Attention {
            q,
            gate,
            k: self.linear(&format!("{prefix}.k_proj"), dims.kv_dim(), hidden, qkv_bias)?,
            v: self.linear(&format!("{prefix}.v_proj"), dims.kv_dim(), hidden, qkv_bias)?,
            o: self.linear(
                &format!("{prefix}.{}", spec.out),
                hidden,
                dims.q_dim(),
                out_bias,
            )?,
            q_norm: qk_norm(spec.qk_norms.map(|(q, _)| q))?,
            k_norm: qk_norm(spec.qk_norms.map(|(_, k)| k))?,
            n_heads: dims.n_heads,
            n_kv_heads: dims.n_kv_heads,
            head_dim,
            scale: spec.scale,
            rope: spec.rope,
            window: dims.window,
        })
    }

    /// The queries and output gates of a gated attention: checkpoints
    /// store them interleaved per head in `q_proj` (each head's query, then
    /// its gate), which is regrouped once here into two layers; quantized
    /// checkpoints store the two as `q_proj.query` and `q_proj.gate`.
    fn gated_query(
        &self,
        q_name: &str,
        dims: &geometry::AttentionDims,
        hidden: usize,
        bias: bool,
    ) -> Result<(Linear, Linear)> {
        let (query, gate) = (format!("{q_name}.query"), format!("{q_name}.gate"));
        let hd = dims.head_dim;
        let rows = |first: usize| -> Vec<_> {
            (0..dims.n_heads)
                .map(|h| 2 * h * hd + first..2 * h * hd + first + hd)
                .collect()
        };
        if has_matrix(self.store, &query) {
            let q_dim = dims.q_dim();
            let mut q = self.linear(&query, q_dim, hidden, false)?;
            let mut g = self.linear(&gate, q_dim, hidden, false)?;
            if bias {
                // The bias stays as the checkpoint had it, interleaved.
                let name = format!("{q_name}.bias");
                let both = self.store.require(&name)?.vector_f32(dims.q_rows())?;
                q.bias = Some(gather_rows(&both, 1, &rows(0)));
                g.bias = Some(gather_rows(&both, 1, &rows(hd)));
            }
            return Ok((q, g));
        }
        let both = self.linear(q_name, dims.q_rows(), hidden, bias)?;
        Ok((
            both.gather_rows(&query, &rows(0))?,
            both.gather_rows(&gate, &rows(hd))?,
        ))
    }

    /// The model around `blocks`: embedding `{model}.embed_tokens`, the
    /// final norm `final_norm`, the output head `head` (tied to the
    /// embedding when the config says so, or says nothing and
    /// `tied_by_default`), sizes from `g`; no embedding scale or logit cap.
    #[allow(clippy::too_many_arguments)]
    pub fn model(
        &self,
        cfg: &HfConfig,
        g: &Geometry,
        model: &str,
        final_norm: &str,
        (head, tied_by_default): (&str, bool),
        blocks: Vec<Block>,
        ropes: Vec<Rope>,
    ) -> Result<Translated> {
        let embedding = self.linear(&format!("{model}.embed_tokens"), g.vocab, g.hidden, false)?;
        // Some tied checkpoints still carry a copy of the head: it is ignored.
        let tied = cfg
            .opt_bool("tie_word_embeddings")?
            .unwrap_or(tied_by_default);
        let lm_head = if tied {
            embedding.clone()
        } else {
            self.linear(head, g.vocab, g.hidden, false)?
        };
        Ok(Translated {
            embedding,
            blocks,
            final_norm: self.norm(final_norm, g.hidden)?,
            lm_head,
            ropes,
            embed_scale: None,
            logit_softcap: None,
            hidden: g.hidden,
            vocab: g.vocab,
            max_positions: g.max_positions,
        })
    }

    /// Block `prefix` (e.g. `model.layers.3`) around `mixer`, its norms
    /// and gated MLP (of width `inter`, biased if `mlp_bias`) named as
    /// `layout` says.
    pub fn block(
        &self,
        prefix: &str,
        mixer: Mixer,
        layout: &BlockLayout,
        (hidden, inter): (usize, usize),
        mlp_bias: bool,
    ) -> Result<Block> {
        let norm = |name: &str| self.norm(&format!("{prefix}.{name}.weight"), hidden);
        let [gate, up, down] = layout.mlp_parts;
        let mlp = format!("{prefix}.{}", layout.mlp);
        let linear =
            |name: &str, rows, cols| self.linear(&format!("{mlp}.{name}"), rows, cols, mlp_bias);
        Ok(Block {
            mixer_norm: norm(layout.mixer_norm)?,
            mixer,
            post_mixer_norm: layout.post_mixer_norm.map(norm).transpose()?,
            mlp_norm: norm(layout.mlp_norm)?,
            mlp: GatedMlp {
                gate: linear(gate, inter, hidden)?,
                up: linear(up, inter, hidden)?,
                down: linear(down, hidden, inter)?,
                activation: layout.activation,
            },
            post_mlp_norm: layout.post_mlp_norm.map(norm).transpose()?,
        })
    }
}

/// Each layer's sizes, from its type name: `kinds` maps the names this
/// architecture has to their sizes; another name is an error listing them.
pub(crate) fn layers_by_type(
    model_type: &str,
    types: &[String],
    kinds: &[(&str, geometry::LayerDims)],
) -> Result<Vec<geometry::LayerDims>> {
    types
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            kinds
                .iter()
                .find(|(name, _)| name == kind)
                .map(|(_, dims)| dims.clone())
                .ok_or_else(|| {
                    let known: Vec<&str> = kinds.iter().map(|(name, _)| *name).collect();
                    unknown_layer_type(model_type, i, kind, &known)
                })
        })
        .collect()
}

/// A layer type that this architecture does not have.
pub(crate) fn unknown_layer_type(
    model_type: &str,
    layer: usize,
    kind: &str,
    known: &[&str],
) -> EngineError {
    EngineError::Config(format!(
        "layer {layer} has layer type `{kind}`, which {model_type} does not have (expected one of: {})",
        known.join(", ")
    ))
}

/// `layer_types` from the config, else the periodic default: every
/// `period`-th layer (read from `period_key`, `default_period` if absent)
/// is `periodic`, the others `otherwise`.
pub(crate) fn layer_types_or_periodic(
    cfg: &HfConfig,
    n_layers: usize,
    period_key: &str,
    default_period: usize,
    periodic: &str,
    otherwise: &str,
) -> Result<Vec<String>> {
    if let Some(types) = cfg.layer_types(n_layers)? {
        return Ok(types);
    }
    // A period longer than the model just means no layer is periodic.
    let period =
        geometry::Dims::new(cfg).optional(period_key, default_period, geometry::MAX_LAYERS)?;
    Ok((0..n_layers)
        .map(|i| {
            if (i + 1) % period == 0 {
                periodic
            } else {
                otherwise
            }
            .to_owned()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_types_default_to_a_period() {
        let cfg = HfConfig::from_slice(br#"{"full_attention_interval": 3}"#).unwrap();
        let types =
            layer_types_or_periodic(&cfg, 6, "full_attention_interval", 4, "full", "linear")
                .unwrap();
        assert_eq!(
            types,
            ["linear", "linear", "full", "linear", "linear", "full"]
        );
        // A model shorter than the default period has no periodic layer.
        let short = HfConfig::from_slice(b"{}").unwrap();
        let types =
            layer_types_or_periodic(&short, 2, "sliding_window_pattern", 6, "full", "sliding")
                .unwrap();
        assert_eq!(types, ["sliding", "sliding"]);
        let explicit = HfConfig::from_slice(br#"{"layer_types": ["a", "b"]}"#).unwrap();
        let types = layer_types_or_periodic(&explicit, 2, "x", 4, "full", "linear").unwrap();
        assert_eq!(types, ["a", "b"]);
    }
}
