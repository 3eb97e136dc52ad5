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
        let required = |key: &str| -> Result<f64> {
            number(key)?.ok_or_else(|| FormatError::Config(format!("rope scaling needs `{key}`")))
        };
        let theta = match number("rope_theta")? {
            Some(t) => t,
            None => self.opt_f64("rope_theta")?.unwrap_or(10000.0),
        };
        let kind = params
            .and_then(|m| m.get("rope_type").or_else(|| m.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: required("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: required("original_max_position_embeddings")?,
            },
            other => {
                return Err(FormatError::Config(format!(
                    "rope scaling `{other}` is not supported (supported: default, linear, llama3)"
                )));
            }
        };
        if !(theta.is_finite() && theta > 0.0) {
            return Err(FormatError::Config(format!(
                "rope_theta must be positive, not {theta}"
            )));
        }
        Ok(RopeConfig { theta, scaling })
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
                scaling: RopeScaling::Linear { factor: 2.0 }
            }
        );
        let old = cfg(r#"{"rope_theta": 1e6, "rope_scaling": null}"#);
        assert_eq!(
            old.rope().unwrap(),
            RopeConfig {
                theta: 1e6,
                scaling: RopeScaling::None
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
