//! The self-study error type: one enum for ingestion, chunking, seeds, backends and synthesis.

use std::path::PathBuf;

/// Everything that can go wrong in self-study.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The corpus path does not exist.
    #[error("corpus {} does not exist", .0.display())]
    CorpusNotFound(PathBuf),
    /// Nothing usable was found in the corpus.
    #[error("corpus {} is empty: {detail}", path.display())]
    EmptyCorpus {
        /// The corpus root.
        path: PathBuf,
        /// What was found instead (binary files skipped, excluded files...).
        detail: String,
    },
    /// The corpus is larger than the configured cap.
    #[error("corpus {} holds more than {cap} bytes of text (at {at}); raise the cap or --exclude parts of it", path.display())]
    CorpusTooLarge {
        /// The corpus root.
        path: PathBuf,
        /// The cap in bytes.
        cap: u64,
        /// The file that crossed the cap.
        at: String,
    },
    /// Text files that are not valid UTF-8 (decoding lossily was not asked for).
    #[error("{} file(s) are not valid UTF-8 (use lossy decoding, or exclude them): {}", files.len(), list_invalid(files))]
    InvalidUtf8 {
        /// `(relative path, byte offset of the first invalid sequence)`.
        files: Vec<(String, usize)>,
    },
    /// An `--exclude` glob does not parse.
    #[error("bad exclude glob {glob:?}: {message}")]
    BadGlob {
        /// The glob.
        glob: String,
        /// Why.
        message: String,
    },
    /// Walking the corpus folder failed.
    #[error("walking the corpus: {0}")]
    Walk(String),
    /// A seed-prompt file or weight is wrong.
    #[error("seed prompts: {0}")]
    Seeds(String),
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The generating backend failed.
    #[error("backend: {0}")]
    Backend(String),
    /// The runtime failed (local backend, tokenizer, chat template).
    #[error(transparent)]
    Runtime(#[from] cartridge_runtime::Error),
    /// The dataset could not be written, resumed or read.
    #[error(transparent)]
    Dataset(#[from] cartridge_formats::dataset::DatasetError),
}

fn list_invalid(files: &[(String, usize)]) -> String {
    let mut s: Vec<String> = files
        .iter()
        .take(20)
        .map(|(p, off)| format!("{p} (byte {off})"))
        .collect();
    if files.len() > 20 {
        s.push(format!("and {} more", files.len() - 20));
    }
    s.join(", ")
}

/// The self-study result type.
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
