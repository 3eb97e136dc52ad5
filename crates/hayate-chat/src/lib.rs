//! The text side: `tokenizer.json` through the `tokenizers` crate, chat
//! templates from `tokenizer_config.json` / `chat_template.jinja` rendered
//! with `minijinja` (with Python-compatible string and dict methods, which
//! Hugging Face templates use), a streaming detokeniser, stop strings
//! matched across tokens, tool-call syntaxes, grammars, and the split of a
//! reply into reasoning, content and calls.

pub mod grammar;
pub mod reply;
pub mod stop;
mod stream;
mod template;
mod tokenizer;
pub mod tools;

pub use stream::StreamDecoder;
pub use template::{ChatTemplate, MAX_OUTPUT_BYTES as MAX_TEMPLATE_OUTPUT, Message, RenderOptions};
pub use tokenizer::TextTokenizer;

/// Why text could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// A tokenizer or template file is missing or malformed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer failed on some input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to render (or raised an exception itself).
    #[error("chat template: {0}")]
    Template(String),
    /// The model has no chat template and raw mode was not asked for.
    #[error(
        "the model has no chat template (in tokenizer_config.json or chat_template.jinja); use --raw"
    )]
    NoTemplate,
}

/// Result type of this crate.
pub type Result<T, E = ChatError> = std::result::Result<T, E>;
