//! Reading models as Hugging Face publishes them.
//!
//! - [`HfConfig`]: `config.json`, kept as JSON with typed, error-reporting accessors,
//!   because every architecture adds its own keys;
//! - [`GenerationConfig`]: `generation_config.json` (stop ids, default sampling);
//! - [`TensorStore`]: `model.safetensors` or its shards, memory-mapped; tensors stay
//!   in their stored dtype and are borrowed as kernel views.

mod config;
mod error;
mod generation;
mod quant;
mod store;
mod writer;

pub use config::{HfConfig, RopeConfig, RopeScaling};
pub use error::FormatError;
pub use generation::GenerationConfig;
pub use quant::{QuantInfo, QuantTensors, ROTATION};
pub use store::{Dtype, Tensor, TensorStore};
pub use writer::{SafetensorsWriter, TensorSpec};

/// Result type of this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
