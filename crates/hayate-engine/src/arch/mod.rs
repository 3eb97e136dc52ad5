//! Translators: each turns one family of `model_type`s into generic blocks.

mod llama;

use crate::blocks::{Block, Linear, RmsNorm};
use crate::rope::Rope;
use crate::{EngineError, Result};
use hayate_formats::{HfConfig, TensorStore};

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
    /// Rotary frequencies shared by the attention layers.
    pub rope: Rope,
    /// Hidden size.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Longest context the model was configured for.
    pub max_positions: usize,
}

/// Builds the blocks for a config, binding and checking every tensor.
pub type Translator = fn(&HfConfig, &TensorStore) -> Result<Translated>;

/// Every supported `model_type` and its translator.
const TRANSLATORS: &[(&str, Translator)] = &[
    ("llama", llama::translate),
    ("qwen2", llama::translate),
    ("qwen3", llama::translate),
];

/// The `model_type`s Hayate can run.
pub fn supported() -> Vec<&'static str> {
    TRANSLATORS.iter().map(|(name, _)| *name).collect()
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
