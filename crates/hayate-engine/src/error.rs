use hayate_formats::FormatError;

/// Why the engine could not load or run a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model file is missing or malformed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// No translator exists for this `model_type`.
    #[error("unsupported model_type `{model_type}` (supported: {})", supported.join(", "))]
    UnsupportedArchitecture {
        /// What the config says.
        model_type: String,
        /// What Hayate knows.
        supported: Vec<&'static str>,
    },
    /// The configuration is inconsistent or uses an unimplemented feature.
    #[error("config.json: {0}")]
    Config(String),
    /// A context size the model does not support.
    #[error(
        "context size {requested} must be between 1 and the model's max_position_embeddings ({max})"
    )]
    ContextSize {
        /// What was asked for.
        requested: usize,
        /// The model's maximum.
        max: usize,
    },
    /// More tokens than the context holds.
    #[error(
        "context is full: {needed} tokens needed, the context holds {capacity} (raise --ctx-size up to the model's maximum)"
    )]
    ContextFull {
        /// Tokens the request needs.
        needed: usize,
        /// Tokens the state can hold.
        capacity: usize,
    },
    /// The attention caches' pool has no page left.
    #[error(
        "the KV memory is full: the sequences' attention caches hold all {:.1} MiB of it (raise --kv-memory, or run fewer or shorter requests at once)",
        *limit as f64 / f64::from(1u32 << 20)
    )]
    KvMemory {
        /// The pool's limit in bytes.
        limit: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange {
        /// The id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Rolling back past the start, or another misuse of the state.
    #[error("{0}")]
    State(String),
    /// A model cannot be quantized as asked.
    #[error("cannot quantize: {0}")]
    Quantize(String),
    /// A token constraint (grammar) failed or left no token to draw.
    #[error("constraint: {0}")]
    Constraint(String),
}
