//! The engine: a model is a list of generic blocks built from its
//! configuration by a per-architecture translator ([`arch`]); the forward pass
//! runs any such list over per-layer state ([`state`]); tokens are drawn by
//! the Gumbel-max trick under reproducible per-position noise ([`sampler`]).

pub mod arch;
pub mod blocks;
mod error;
mod forward;
pub mod generate;
pub mod linear;
pub mod model;
pub mod quantize;
pub mod rng;
pub mod rope;
pub mod sampler;
pub mod state;

pub use error::EngineError;
pub use forward::Logits;
pub use generate::{GenerationStats, Generator, StopReason};
pub use model::{LoadOptions, Model, ModelInfo, StateOptions};
pub use quantize::{EmbeddingFormat, QuantSpec};
pub use sampler::{Sampler, SamplingParams};
pub use state::InferenceState;

/// Result type of this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
