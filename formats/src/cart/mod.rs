//! The `.cart` container, version 1. `formats/SPEC.md` is the specification; this module follows it.
//!
//! - [`header`]: the JSON header types and their structural rules;
//! - [`parse`]: the pure parser over bytes and typed tensor views;
//! - [`write`]: deterministic encoding;
//! - [`file`]: the memory-mapped file wrapper;
//! - [`compose`]: offline composition (concatenation along the token axis).

pub mod compose;
pub mod error;
pub mod file;
pub mod header;
pub mod parse;
pub mod write;

pub use compose::{compose, compose_files, ComposePart, Composed};
pub use error::{CartError, Result};
pub use file::{check_model, CartFile};
pub use header::{
    Compression, DType, Dims, Header, Kind, KvDims, PayloadInfo, Positions, Provenance,
    SoftPromptDims, TensorEntry,
};
pub use parse::{parse, AlignedBytes, CartView, TensorView};
pub use write::{encode, recompress, CartContents};

/// Encode and write a `.cart` atomically (SPEC.md §5).
pub fn write_file(
    path: &std::path::Path,
    contents: &CartContents<'_>,
    compression: Compression,
) -> Result<()> {
    let bytes = encode(contents, compression)?;
    crate::atomic::write_atomic(path, &bytes).map_err(|source| CartError::Io {
        path: path.to_path_buf(),
        source,
    })
}
