//! Every way a self-study dataset can be wrong, one variant each (SPEC.md "Self-study dataset
//! shards").

use std::path::PathBuf;

/// Result alias for datasets.
pub type Result<T> = std::result::Result<T, DatasetError>;

/// Why a dataset could not be read, written or trusted.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The folder has no `manifest.json`.
    #[error("{}: not a self-study dataset (no manifest.json)", dir.display())]
    NoManifest {
        /// The folder.
        dir: PathBuf,
    },
    /// A dataset already exists where a new one was to be created.
    #[error("{}: a dataset already exists here (resume it, or choose another folder)", dir.display())]
    AlreadyExists {
        /// The folder.
        dir: PathBuf,
    },
    /// The manifest is not the JSON this version expects.
    #[error("{}: manifest: {message}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Data from another teacher model (or tokenizer) would be mixed in.
    #[error("teacher mismatch ({fields}): the dataset was made by [{dataset}], this is [{other}]")]
    TeacherMismatch {
        /// Names of the differing fingerprint fields (or "teacher id" for a foreign shard).
        fields: String,
        /// The dataset's teacher, short form.
        dataset: String,
        /// The other side, short form.
        other: String,
    },
    /// A shard's preamble is wrong.
    #[error("{}: bad shard preamble: {message}", path.display())]
    BadShard {
        /// The shard.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A shard was written for another dataset's teacher.
    #[error("{}: shard belongs to another teacher model (teacher id {found}, manifest {expected})", path.display())]
    ForeignShard {
        /// The shard.
        path: PathBuf,
        /// Teacher id in the shard (hex).
        found: String,
        /// Teacher id of the manifest (hex).
        expected: String,
    },
    /// The last frame of the last shard is incomplete: a writer was killed mid-append.
    #[error("{}: torn last record at offset {offset} ({reason}); run synthesis with --resume to repair", path.display())]
    TornTail {
        /// The shard.
        path: PathBuf,
        /// Offset of the torn frame.
        offset: u64,
        /// Why it is torn.
        reason: String,
    },
    /// A frame that is not the torn tail fails its checks.
    #[error("{}: corrupt record at offset {offset}: {reason}", path.display())]
    CorruptRecord {
        /// The shard.
        path: PathBuf,
        /// Offset of the frame.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A decompressed record does not follow the record layout.
    #[error("record layout: {0}")]
    RecordLayout(String),
    /// Two records carry the same conversation id.
    #[error("conversation id {id} appears twice ({first} and {second})")]
    DuplicateId {
        /// The id.
        id: u64,
        /// Where it was first seen.
        first: String,
        /// Where it was seen again.
        second: String,
    },
    /// The writer was given a record that breaks the rules.
    #[error("cannot write record: {0}")]
    InvalidRecord(String),
    /// Another process holds the dataset's writer lock.
    #[error(
        "{}: another process{} is writing this dataset; wait for it to end (or stop it), then \
         resume",
        dir.display(),
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Busy {
        /// The folder.
        dir: PathBuf,
        /// The process id the holder wrote into the lock file, when readable.
        holder: Option<u32>,
    },
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DatasetError::Io {
            path: path.into(),
            source,
        }
    }
}
