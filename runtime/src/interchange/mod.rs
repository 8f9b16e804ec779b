//! Interchange with Python stacks (DESIGN.md §7): Hugging Face PEFT adapters out and in
//! ([`peft`]), and the reference implementation's pickled torch cartridges in ([`torch_pickle`]).
//!
//! # Layouts
//! A `.cart` KV cartridge stores, per layer, keys (after RoPE, positions `0..p-1`) and values as
//! `[kv_heads, p, head_dim]`, in the Hugging Face rotate-half layout (SPEC.md §2.1). PEFT's
//! `CARTRIDGE` adapter and the reference trainer both hold `past_key_values` of a Hugging Face
//! model, which are the same thing: post-RoPE keys in rotate-half layout at positions `0..p-1`.
//! No rotation or permutation is needed in either direction; only the axes are rearranged
//! (the `peft` and `torch_pickle` modules say how).
//!
//! A foreign file carries no model fingerprint: import checks every shape against the model it is
//! given and stamps that model's fingerprint on the result. A file trained for another model with
//! the same shapes cannot be told apart; the shapes of any other model are refused.

pub mod peft;
pub mod torch_pickle;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cartridge_formats::cart::{
    self, CartContents, CartError, Compression, DType, Dims, Provenance,
};
use cartridge_formats::ModelFingerprint;

/// Why a foreign file could not be imported or a `.cart` exported. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum InterchangeError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Something the format requires is absent (a file, a tensor, a dict key).
    #[error("{}: missing {what}", path.display())]
    Missing {
        /// The file or folder.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
    /// A configuration value is malformed or unsupported.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor has the wrong shape for its role.
    #[error("{}: tensor {tensor} has shape {found}, expected {expected}", path.display())]
    Shape {
        /// The file.
        path: PathBuf,
        /// Which tensor.
        tensor: String,
        /// The shape the format and model require.
        expected: String,
        /// The shape in the file.
        found: String,
    },
    /// A tensor's element type is not one a `.cart` can hold.
    #[error("{}: tensor {tensor} is {found}; f32, f16 and bf16 are supported", path.display())]
    DType {
        /// The file.
        path: PathBuf,
        /// Which tensor.
        tensor: String,
        /// Its element type.
        found: String,
    },
    /// The file was made for a model with other dimensions than the one given.
    #[error("{}: made for another model: {message}", path.display())]
    WrongModel {
        /// The file.
        path: PathBuf,
        /// Which dimension differs, with both values.
        message: String,
    },
    /// The container (zip, pickle, safetensors) is malformed.
    #[error("{}: {message}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What could not be read.
        message: String,
    },
    /// Reading or writing the `.cart` side failed.
    #[error(transparent)]
    Cart(#[from] CartError),
}

/// Result alias for interchange.
pub type Result<T, E = InterchangeError> = std::result::Result<T, E>;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> InterchangeError + '_ {
    move |source| InterchangeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A prefix read from a foreign file: `.cart` contents without the fingerprint and provenance.
#[derive(Debug, Clone)]
pub struct ImportedPrefix {
    /// Kind and dimensions (checked against the model at import).
    pub dims: Dims,
    /// Element type of `tensors`.
    pub dtype: DType,
    /// Tensor bytes in `.cart` file order (`keys.0, values.0, ...` or `embeddings`).
    pub tensors: Vec<Vec<u8>>,
    /// A soft prompt's summary, when the source had one.
    pub summary: Option<String>,
    /// Where it came from, for `provenance.metadata` (`imported_from`, ...).
    pub metadata: BTreeMap<String, String>,
}

impl ImportedPrefix {
    /// Write it as a `.cart` for `model`, atomically. `created` goes into the provenance.
    pub fn write_cart(
        &self,
        path: &Path,
        model: &ModelFingerprint,
        created: String,
        compression: Compression,
    ) -> Result<()> {
        let contents = CartContents {
            dims: self.dims,
            dtype: self.dtype,
            model: model.clone(),
            provenance: Provenance {
                created,
                metadata: self.metadata.clone(),
                ..Provenance::default()
            },
            summary: self.summary.clone(),
            tensors: self.tensors.iter().map(Vec::as_slice).collect(),
        };
        cart::write_file(path, &contents, compression)?;
        Ok(())
    }
}

/// Bytes per element of a `.cart` dtype.
fn elem_size(dtype: DType) -> usize {
    dtype.size() as usize
}

/// Little-endian `dtype` bytes widened to f32 bytes (exact for f16 and bf16).
fn widen_to_f32(bytes: &[u8], dtype: DType) -> Vec<u8> {
    let value = |c: &[u8]| match dtype {
        DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        DType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
        DType::Bf16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
    };
    bytes
        .chunks_exact(elem_size(dtype))
        .flat_map(|c| value(c).to_le_bytes())
        .collect()
}
