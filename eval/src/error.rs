//! The evaluation's error type: one variant per source of failure, with the file and line where an
//! input file is at fault.

use std::path::PathBuf;

/// Everything an evaluation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The runtime (forward, tokenizer, chat template, `.cart` I/O) failed.
    #[error(transparent)]
    Runtime(#[from] cartridge_runtime::Error),
    /// The dataset could not be read or belongs to another teacher.
    #[error(transparent)]
    Dataset(#[from] cartridge_formats::dataset::DatasetError),
    /// The compiler's loss code failed.
    #[error(transparent)]
    Compiler(#[from] cartridge_compiler::Error),
    /// The corpus could not be read.
    #[error(transparent)]
    Corpus(#[from] cartridge_selfstudy::Error),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line of a question file is not a valid item.
    #[error("{}:{line}: {message}", path.display())]
    QaLine {
        /// The question file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },
    /// An earlier report given to `--reuse` cannot stand in for this run's modes.
    #[error("{}: cannot reuse its modes: {message}", path.display())]
    Reuse {
        /// The earlier report.
        path: PathBuf,
        /// Why not.
        message: String,
    },
    /// The evaluation cannot run as asked (with a message that says why).
    #[error("{0}")]
    Config(String),
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

/// The evaluation's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
