use crate::{FormatError, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// `config.json` of a Hugging Face model.
///
/// Kept as JSON: each architecture's translator asks for the keys it needs and
/// gets an error naming the key when it is absent or of the wrong kind.
#[derive(Clone, Debug)]
pub struct HfConfig {
    map: Map<String, Value>,
}

/// Rotary position embedding parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Base of the geometric frequency sequence.
    pub theta: f64,
    /// How the frequencies are rescaled for longer contexts.
    pub scaling: RopeScaling,
    /// Share of each head's dimensions that is rotated (1 for all).
    pub partial_rotary_factor: f64,
}

/// The rope scaling schemes Hayate implements.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (frequencies divided by it).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3's frequency-band-dependent scaling.
    Llama3 {
        /// Scale of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

impl HfConfig {
    /// Reads and parses `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|cause| FormatError::Io {
            path: path.to_owned(),
            cause,
        })?;
        Self::from_slice(&bytes).map_err(|message| FormatError::Json {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses JSON text that must be an object.
    pub fn from_slice(bytes: &[u8]) -> std::result::Result<Self, String> {
        match serde_json::from_slice::<Value>(bytes).map_err(|e| e.to_string())? {
            Value::Object(map) => Ok(HfConfig { map }),
            _ => Err("expected a JSON object".into()),
        }
    }

    /// The raw value of `key`, if present and not null.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// `model_type`, which selects the architecture.
    pub fn model_type(&self) -> Result<&str> {
        self.get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| FormatError::Config("missing string `model_type`".into()))
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| FormatError::Config(format!("missing integer `{key}`")))
    }

    /// An optional non-negative integer.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    FormatError::Config(format!("`{key}` must be a non-negative integer, not {v}"))
                }),
        }
    }

    /// An optional number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| FormatError::Config(format!("`{key}` must be a number, not {v}"))),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                FormatError::Config(format!("`{key}` must be true or false, not {v}"))
            }),
        }
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| FormatError::Config(format!("`{key}` must be a string, not {v}"))),
        }
    }

    /// Token ids under `key`, which may be one integer or a list.
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = || FormatError::Config(format!("`{key}` must be a token id or a list of them"));
        let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| as_id(v).ok_or_else(bad)).collect(),
            Some(v) => Ok(vec![as_id(v).ok_or_else(bad)?]),
        }
    }

    /// Rotary embedding parameters, from transformers 5's `rope_parameters` or
    /// the older `rope_theta` + `rope_scaling`. An unimplemented scheme is an error.
    pub fn rope(&self) -> Result<RopeConfig> {
        let params = self
            .get("rope_parameters")
            .or_else(|| self.get("rope_scaling"));
        self.parse_rope(params, 10000.0)
    }

    /// Rotary parameters of the layers of one type, for models whose
    /// `rope_parameters` is keyed by layer type (Gemma 3:
    /// `{"sliding_attention": {...}, "full_attention": {...}}`). Configs in
    /// the older style give each type its own keys: `legacy_theta_key` for
    /// the base (`rope_local_base_freq`) and no scaling, or `rope_theta` and
    /// `rope_scaling` when it is `None`.
    pub fn rope_for_layer_type(
        &self,
        layer_type: &str,
        legacy_theta_key: Option<&str>,
        default_theta: f64,
    ) -> Result<RopeConfig> {
        if let Some(Value::Object(by_type)) = self.get("rope_parameters")
            && let Some(params) = by_type.get(layer_type).filter(|v| !v.is_null())
        {
            return self.parse_rope(Some(params), default_theta);
        }
        match legacy_theta_key {
            Some(key) => {
                let theta = self.opt_f64(key)?.unwrap_or(default_theta);
                let params = Value::Object(Map::from_iter([(
                    "rope_theta".to_string(),
                    Value::from(theta),
                )]));
                self.parse_rope(Some(&params), default_theta)
            }
            None => {
                let params = self
                    .get("rope_parameters")
                    .or_else(|| self.get("rope_scaling"));
                self.parse_rope(params, default_theta)
            }
        }
    }

    fn parse_rope(&self, params: Option<&Value>, default_theta: f64) -> Result<RopeConfig> {
        let params = match params {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(v) => {
                return Err(FormatError::Config(format!(
                    "`rope_parameters` must be an object, not {v}"
                )));
            }
        };
        let number = |key: &str| -> Result<Option<f64>> {
            match params.and_then(|m| m.get(key)).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    FormatError::Config(format!("rope parameter `{key}` must be a number, not {v}"))
                }),
            }
        };
        // Scaling parameters divide frequencies: they must be positive and finite.
        let required = |key: &str| -> Result<f64> {
            let value = number(key)?
                .ok_or_else(|| FormatError::Config(format!("rope scaling needs `{key}`")))?;
            if !(1e-6..=1e9).contains(&value) {
                return Err(FormatError::Config(format!(
                    "rope parameter `{key}` is {value:?}: it must be between 1e-6 and 1e9"
                )));
            }
            Ok(value)
        };
        let theta = match number("rope_theta")? {
            Some(t) => t,
            None => self.opt_f64("rope_theta")?.unwrap_or(default_theta),
        };
        let partial_rotary_factor = match number("partial_rotary_factor")? {
            Some(f) => f,
            None => self.opt_f64("partial_rotary_factor")?.unwrap_or(1.0),
        };
        if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
            return Err(FormatError::Config(format!(
                "partial_rotary_factor must be in (0, 1], not {partial_rotary_factor}"
            )));
        }
        let kind = params
            .and_then(|m| m.get("rope_type").or_else(|| m.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: required("factor")?,
            },
            "llama3" => {
                let (low, high) = (required("low_freq_factor")?, required("high_freq_factor")?);
                // The smoothing between the bands divides by their difference.
                if high <= low {
                    return Err(FormatError::Config(format!(
                        "rope parameter `high_freq_factor` ({high}) must exceed `low_freq_factor` ({low})"
                    )));
                }
                RopeScaling::Llama3 {
                    factor: required("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: required("original_max_position_embeddings")?,
                }
            }
            other => {
                return Err(FormatError::Config(format!(
                    "rope scaling `{other}` is not supported (supported: default, linear, llama3)"
                )));
            }
        };
        // Below 1 the frequencies grow past f32's range.
        if !(theta.is_finite() && theta >= 1.0) {
            return Err(FormatError::Config(format!(
                "rope_theta is {theta:?}: it must be at least 1"
            )));
        }
        Ok(RopeConfig {
            theta,
            scaling,
            partial_rotary_factor,
        })
    }

    /// The language model's config of a multimodal checkpoint: the
    /// `text_config` object, with top-level keys it lacks (such as
    /// `tie_word_embeddings`) filled in. Configs without one are returned as they are.
    pub fn text_config(&self) -> Result<HfConfig> {
        match self.get("text_config") {
            None => Ok(self.clone()),
            Some(Value::Object(text)) => {
                let mut map = text.clone();
                for (key, value) in &self.map {
                    if !matches!(key.as_str(), "text_config" | "vision_config" | "model_type") {
                        map.entry(key.clone()).or_insert_with(|| value.clone());
                    }
                }
                Ok(HfConfig { map })
            }
            Some(v) => Err(FormatError::Config(format!(
                "`text_config` must be an object, not {v}"
            ))),
        }
    }

    /// `layer_types`: one string per layer, if present.
    pub fn layer_types(&self, n_layers: usize) -> Result<Option<Vec<String>>> {
        let Some(v) = self.get("layer_types") else {
            return Ok(None);
        };
        let bad =
            || FormatError::Config(format!("`layer_types` must be a list of strings, not {v}"));
        let types: Vec<String> = v
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|t| t.as_str().map(str::to_owned).ok_or_else(bad))
            .collect::<Result<_>>()?;
        if types.len() != n_layers {
            return Err(FormatError::Config(format!(
                "`layer_types` has {} entries for {n_layers} layers",
                types.len()
            )));
        }
        Ok(Some(types))
    }

    /// An optional list of non-negative integers.
    pub fn opt_usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let bad = || FormatError::Config(format!("`{key}` must be a list of integers, not {v}"));
        v.as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> HfConfig {
        HfConfig::from_slice(s.as_bytes()).unwrap()
    }

    #[test]
    fn rope_from_new_and_old_keys() {
        let new = cfg(
            r#"{"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}"#,
        );
        assert_eq!(
            new.rope().unwrap(),
            RopeConfig {
                theta: 500.0,
                scaling: RopeScaling::Linear { factor: 2.0 },
                partial_rotary_factor: 1.0,
            }
        );
        let old = cfg(r#"{"rope_theta": 1e6, "rope_scaling": null}"#);
        assert_eq!(
            old.rope().unwrap(),
            RopeConfig {
                theta: 1e6,
                scaling: RopeScaling::None,
                partial_rotary_factor: 1.0,
            }
        );
        let unknown = cfg(r#"{"rope_scaling": {"type": "yarn", "factor": 4}}"#);
        assert!(unknown.rope().unwrap_err().to_string().contains("yarn"));
        let incomplete = cfg(r#"{"rope_scaling": {"rope_type": "llama3", "factor": 8}}"#);
        assert!(
            incomplete
                .rope()
                .unwrap_err()
                .to_string()
                .contains("low_freq_factor")
        );
    }

    #[test]
    fn rope_per_layer_type_and_partial_rotation() {
        let nested = cfg(
            r#"{"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}"#,
        );
        let local = nested
            .rope_for_layer_type("sliding_attention", Some("rope_local_base_freq"), 1.0)
            .unwrap();
        assert_eq!((local.theta, &local.scaling), (10000.0, &RopeScaling::None));
        let global = nested
            .rope_for_layer_type("full_attention", None, 1.0)
            .unwrap();
        assert_eq!(global.theta, 1e6);
        assert_eq!(global.scaling, RopeScaling::Linear { factor: 8.0 });
        // Older configs: a separate local base, scaling only on global layers.
        let legacy = cfg(r#"{"rope_theta": 1e6, "rope_local_base_freq": 1e4,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0}}"#);
        let local = legacy
            .rope_for_layer_type("sliding_attention", Some("rope_local_base_freq"), 1.0)
            .unwrap();
        assert_eq!((local.theta, &local.scaling), (1e4, &RopeScaling::None));
        let global = legacy
            .rope_for_layer_type("full_attention", None, 1.0)
            .unwrap();
        assert_eq!(
            (global.theta, &global.scaling),
            (1e6, &RopeScaling::Linear { factor: 8.0 })
        );
        let partial =
            cfg(r#"{"rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.25}}"#);
        assert_eq!(partial.rope().unwrap().partial_rotary_factor, 0.25);
        let bad = cfg(r#"{"partial_rotary_factor": 0}"#);
        assert!(
            bad.rope()
                .unwrap_err()
                .to_string()
                .contains("partial_rotary_factor")
        );
    }

    #[test]
    fn text_config_nests_and_inherits() {
        let c = cfg(r#"{"model_type": "qwen3_5", "tie_word_embeddings": true,
                "text_config": {"model_type": "qwen3_5_text", "hidden_size": 64},
                "vision_config": {"hidden_size": 16}}"#);
        let text = c.text_config().unwrap();
        assert_eq!(text.model_type().unwrap(), "qwen3_5_text");
        assert_eq!(text.usize("hidden_size").unwrap(), 64);
        assert_eq!(text.opt_bool("tie_word_embeddings").unwrap(), Some(true));
        assert!(text.get("vision_config").is_none());
        let layers = cfg(r#"{"layer_types": ["conv", "full_attention"]}"#);
        assert_eq!(layers.layer_types(2).unwrap().unwrap().len(), 2);
        assert!(
            layers
                .layer_types(3)
                .unwrap_err()
                .to_string()
                .contains("3 layers")
        );
    }

    #[test]
    fn typed_accessors_name_the_key() {
        let c = cfg(r#"{"hidden_size": "big", "eos_token_id": [1, 2]}"#);
        assert!(
            c.usize("hidden_size")
                .unwrap_err()
                .to_string()
                .contains("hidden_size")
        );
        assert!(
            c.usize("num_hidden_layers")
                .unwrap_err()
                .to_string()
                .contains("num_hidden_layers")
        );
        assert_eq!(c.token_ids("eos_token_id").unwrap(), vec![1, 2]);
        assert!(HfConfig::from_slice(b"[1]").is_err());
    }
}
