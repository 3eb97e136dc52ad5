//! The engine: a model is a list of generic blocks built from its
//! configuration by a per-architecture translator ([`arch`]); each layer
//! type lives in one module of [`layers`] (weights, per-sequence state,
//! scratch, forward); the forward pass runs any such list over a sequence's
//! [`InferenceState`]; tokens are drawn by the Gumbel-max trick under
//! reproducible per-position noise ([`sampler`]). `docs/architecture.md`
//! walks through it.
//!
//! The forward pass runs one sequence ([`Model::forward`]: a prompt in
//! chunks, or a token) or a step of several together
//! ([`Model::forward_batch`]: each with its own state, new tokens and
//! logits request), where the linear layers run once over every
//! sequence's rows and each sequence's results are bit-identical to its
//! results alone. [`batch`] schedules such steps for many requests at once.
//!
//! # Sizes
//!
//! Every size the engine derives from `config.json` is checked once, in
//! [`arch::geometry`](mod@arch::geometry), before any weight file is mapped: bounded values,
//! consistent head counts, products that fit. Buffers that grow with the
//! context (KV caches, recurrent states, scratch) are each checked against
//! the machine's memory before they are allocated, so an absurd context is
//! an error, not an abort.
//!
//! # Threads
//!
//! - **Shared:** a [`Model`] (weights, blocks, rotary tables, its kernel
//!   thread pool) is `Sync` and read-only after loading. Any number of
//!   threads may call [`Model::forward`] on one model at once.
//! - **Per sequence:** an [`InferenceState`] holds everything a sequence
//!   writes: caches, recurrent states, and the scratch buffers the forward
//!   pass reuses (so decoding does not allocate). `forward` takes it by
//!   `&mut`, so one state is used by one call at a time, and a state only
//!   runs on the model that made it (another model's is refused).
//! - **Kernels:** each product, attention or delta-rule step is one job on
//!   the model's pool; concurrent callers take turns job by job (the pool's
//!   docs give the argument why no data race is possible). Results do not
//!   depend on what else runs: a sequence gives bit-identical logits alone
//!   or beside others.

pub mod arch;
pub mod batch;
mod budget;
pub mod calibrate;
mod error;
mod forward;
pub mod generate;
pub mod layers;
pub mod linear;
pub mod model;
pub mod quantize;
pub mod refine;
pub mod rng;
pub mod rope;
pub mod sampler;
pub mod saved;
pub mod speculate;
pub mod state;

pub use batch::{BatchRequest, Batcher, SlotEvent};
pub use calibrate::Calibration;
pub use error::EngineError;
pub use forward::{BatchScratch, Logits, MAX_TREE_NODES, SequenceStep};
pub use generate::{GenerationStats, Generator, Rules, StopReason};
pub use layers::{KV_PAGE, KvFormat, KvPool};
pub use model::{LoadOptions, Model, ModelInfo, StateOptions};
pub use quantize::{EmbeddingFormat, QuantSpec};
pub use sampler::{Sampler, SamplingParams, TokenConstraint};
pub use state::{InferenceState, Snapshot};

/// Result type of this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
