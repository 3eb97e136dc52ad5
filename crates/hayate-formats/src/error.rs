use std::path::PathBuf;

/// Why a model file could not be used. Messages name the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error (in the message, not chained, so it is printed once).
        cause: std::io::Error,
    },
    /// The directory holds no weights at all.
    #[error("no model.safetensors or model.safetensors.index.json in {0}")]
    NoWeights(PathBuf),
    /// A JSON file is not valid JSON (or not the expected shape).
    #[error("{path} is not valid JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// `config.json` lacks a key or has a value of the wrong kind.
    #[error("config.json: {0}")]
    Config(String),
    /// A safetensors file is malformed: bad header, offsets outside the file, sizes that disagree.
    #[error("{path} is not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{0}` is missing from the checkpoint")]
    MissingTensor(String),
    /// A tensor has a shape or dtype other than the configuration implies.
    #[error("tensor `{name}`: {message}")]
    BadTensor {
        /// The tensor.
        name: String,
        /// What is wrong.
        message: String,
    },
}
