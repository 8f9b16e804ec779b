//! Self-study datasets (SPEC.md "Self-study dataset shards"): a folder with a manifest (teacher
//! fingerprint, corpus digest, settings) and append-only, zstd-compressed shards of
//! length-prefixed, checksummed records — one synthesised conversation each, with its exact token
//! ids and the teacher's top-k log-probabilities at every answer token.
//!
//! - [`record`]: the record and its pure encoder/decoder;
//! - [`manifest`]: the manifest and teacher checks;
//! - [`shard`]: shard preamble, frames, the torn-tail scanner, the append writer;
//! - [`reader`]: [`Dataset`] (iterate, counts, seed-kind histogram);
//! - [`writer`]: [`DatasetWriter`] (create, append, resume).

pub mod error;
pub mod manifest;
pub mod reader;
pub mod record;
pub mod shard;
pub mod writer;

pub use error::{DatasetError, Result};
pub use manifest::{Manifest, MANIFEST_FILE};
pub use reader::{Dataset, ReadOptions, Stats};
pub use record::{ChunkLocation, ChunkPiece, Message, Record};
pub use writer::{DatasetWriter, ResumeState, DEFAULT_SHARD_BYTES};
