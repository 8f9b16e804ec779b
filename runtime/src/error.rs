//! The runtime's error type: one enum for loading, tokenising, templating and running models.
//!
//! Variants carry the structured facts a caller needs (which file, which tensor, what was expected)
//! so the CLI can print one clear line with `{:#}`.

use std::path::PathBuf;

/// Everything that can go wrong in the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A model configuration could not be read or is unusable.
    #[error(transparent)]
    Config(#[from] crate::models::config::ConfigError),
    /// A GGUF file is malformed or lacks something we need.
    #[error("{}: {message}", path.display())]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A weight is missing or has the wrong shape.
    #[error("weight {name}: {message}")]
    Weight {
        /// Hugging Face name of the tensor.
        name: String,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer could not be built or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// No model where we looked.
    #[error("{0}")]
    ModelNotFound(String),
    /// A `.cart` file is corrupt, foreign, or made for another model.
    #[error(transparent)]
    Cart(#[from] cartridge_formats::cart::CartError),
    /// Anything else, with a message that says what.
    #[error("{0}")]
    Msg(String),
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
