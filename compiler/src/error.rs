//! The compiler's error type: one variant per source of failure, with the path where a file is
//! involved.

use std::path::PathBuf;

/// Everything training can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The runtime (forward, `.cart` I/O) failed.
    #[error(transparent)]
    Runtime(#[from] cartridge_runtime::Error),
    /// The dataset could not be read or belongs to another teacher.
    #[error(transparent)]
    Dataset(#[from] cartridge_formats::dataset::DatasetError),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint is corrupt or was written by a run with other settings.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Another process is training into the same output.
    #[error(
        "{}: another process{} is training into this output; wait for it to end (or stop it), \
         then resume",
        out.display(),
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Busy {
        /// The artifact being written.
        out: PathBuf,
        /// The process id the holder wrote into the lock file, when readable.
        holder: Option<u32>,
    },
    /// The training settings are unusable (with a message that says which and why).
    #[error("invalid training settings: {0}")]
    Config(String),
    /// The data cannot train anything (no records, no targets, ids outside the vocabulary, ...).
    #[error("training data: {0}")]
    Data(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// The compiler's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
