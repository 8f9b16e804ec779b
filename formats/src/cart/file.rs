//! A `.cart` on disk: memory-mapped, parsed, and (when compressed) decompressed once at open.
//!
//! The parser in `parse.rs` never does I/O; this wrapper owns the map and hands out views into it.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::error::{CartError, Result};
use super::header::{Compression, Header};
use super::parse::{self, AlignedBytes, TensorView};
use crate::fingerprint::ModelFingerprint;

/// Where a file's raw payload lives.
enum Backing {
    /// Uncompressed: tensors are views into the map.
    Mapped,
    /// Compressed: the payload was decompressed into this buffer at open.
    Decompressed(AlignedBytes),
}

/// An open `.cart` file.
pub struct CartFile {
    path: PathBuf,
    map: Mmap,
    header: Header,
    payload_offset: usize,
    backing: Backing,
}

impl std::fmt::Debug for CartFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CartFile")
            .field("path", &self.path)
            .field("kind", &self.header.kind())
            .finish()
    }
}

impl CartFile {
    /// Map and parse a file. Reads only the preamble and header of an uncompressed file; a
    /// compressed one is decompressed (and its size checked) here. Checksums are not checked:
    /// call [`CartFile::verify`] before trusting the data.
    ///
    /// The map is read-only. Writers in this project replace files by rename and never truncate
    /// them in place (`write_atomic`), which is what makes mapping them sound.
    pub fn open(path: &Path) -> Result<Self> {
        let in_file = |e: CartError| CartError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
        let file = File::open(path).map_err(|source| CartError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only and lives as long as `CartFile`. A concurrent in-place
        // truncation by another program would fault reads; our own writers only ever rename.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| CartError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let view = parse::parse(&map).map_err(in_file)?;
        let backing = match view.header.payload.compression {
            Compression::None => Backing::Mapped,
            Compression::Zstd => Backing::Decompressed(view.decompress().map_err(in_file)?),
        };
        let header = view.header;
        let payload_offset = view.payload_offset as usize;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header,
            payload_offset,
            backing,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Size of the file on disk.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// The stored payload bytes (the zstd frame when compressed).
    fn stored(&self) -> &[u8] {
        // Bounds were checked by the parser at open.
        &self.map[self.payload_offset..]
    }

    /// The raw (decompressed) payload.
    pub fn raw_payload(&self) -> &[u8] {
        match &self.backing {
            Backing::Mapped => self.stored(),
            Backing::Decompressed(buf) => buf.as_slice(),
        }
    }

    /// Whether tensor views point into the memory map (no copy was made).
    pub fn is_zero_copy(&self) -> bool {
        matches!(self.backing, Backing::Mapped)
    }

    /// Check every checksum: the stored payload, then each tensor. Errors name the file and tensor.
    pub fn verify(&self) -> Result<()> {
        let check = || {
            parse::verify_stored(&self.header, self.stored())?;
            parse::verify_raw(&self.header, self.raw_payload())
        };
        check().map_err(|e| CartError::InFile {
            path: self.path.clone(),
            source: Box::new(e),
        })
    }

    /// Refuse a model whose fingerprint differs from the one the file was made for.
    pub fn check_model(&self, model: &ModelFingerprint) -> Result<()> {
        check_model(&self.header.model, model).map_err(|e| CartError::InFile {
            path: self.path.clone(),
            source: Box::new(e),
        })
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.header.tensors.len()
    }

    /// View of tensor `index` (file order).
    pub fn tensor(&self, index: usize) -> Result<TensorView<'_>> {
        parse::view(&self.header, self.raw_payload(), index)
    }

    /// View of the tensor called `name`.
    pub fn tensor_by_name(&self, name: &str) -> Result<TensorView<'_>> {
        let index = self
            .header
            .tensors
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| CartError::NoSuchTensor(name.to_string()))?;
        self.tensor(index)
    }
}

/// Compare a cartridge's fingerprint with a model's; the error names both and the differing fields.
pub fn check_model(cartridge: &ModelFingerprint, model: &ModelFingerprint) -> Result<()> {
    let diff = cartridge.differences(model);
    if diff.is_empty() {
        return Ok(());
    }
    Err(CartError::ModelMismatch {
        fields: diff.join(", "),
        cartridge: cartridge.short(),
        model: model.short(),
    })
}
