use crate::{FormatError, Result};
use serde::Deserialize;
use std::path::Path;

/// The parts of `generation_config.json` an engine uses. Every field is optional.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct GenerationConfig {
    /// Token(s) that end generation.
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// Whether the model's authors sample (true) or decode greedily (false).
    pub do_sample: Option<bool>,
    /// Default temperature.
    pub temperature: Option<f32>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default nucleus threshold.
    pub top_p: Option<f32>,
    /// Default min-p threshold.
    pub min_p: Option<f32>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Default generation length.
    pub max_new_tokens: Option<usize>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        Null(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(v) => vec![v],
        OneOrMany::Many(v) => v,
        OneOrMany::Null(()) => Vec::new(),
    })
}

impl GenerationConfig {
    /// Reads `generation_config.json`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| FormatError::Json {
                path: path.to_owned(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(cause) => Err(FormatError::Io {
                path: path.to_owned(),
                cause,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_may_be_one_id_or_a_list() {
        let one: GenerationConfig = serde_json::from_str(r#"{"eos_token_id": 2}"#).unwrap();
        assert_eq!(one.eos_token_id, vec![2]);
        let many: GenerationConfig =
            serde_json::from_str(r#"{"eos_token_id": [0, 2], "top_k": 20}"#).unwrap();
        assert_eq!(many.eos_token_id, vec![0, 2]);
        assert_eq!(many.top_k, Some(20));
    }
}
