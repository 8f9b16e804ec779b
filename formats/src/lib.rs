//! File formats of the cartridge toolchain, with no ML dependency: a hosting plugin can read a
//! `.cart` with this crate alone.
//!
//! - [`cart`]: the `.cart` container (KV cartridges and soft prompts), specified in `SPEC.md`;
//! - [`fingerprint`]: model identity, so a cartridge is never used on another model;
//! - [`atomic`]: atomic file replacement used by every writer;
//! - [`lock`]: exclusive lock files, so two processes never write the same dataset or output.
//!
//! ```
//! use cartridge_formats::cart::{self, Compression, DType, Dims, KvDims, Provenance};
//! use cartridge_formats::ModelFingerprint;
//!
//! let model = ModelFingerprint {
//!     architecture: "llama".into(), num_layers: 1, hidden_size: 8, num_attention_heads: 2,
//!     num_kv_heads: 1, head_dim: 4, vocab_size: 32, rope_theta: 1e4, rope_scaling: None,
//!     tokenizer_hash: "sha256:00".into(), weights_hash: "sha256:00".into(),
//! };
//! let dims = Dims::Kv(KvDims { layers: 1, kv_heads: 1, head_dim: 4, tokens: 2, frozen_tokens: 1, biased: false });
//! let k: Vec<f32> = (0..8).map(|i| i as f32).collect();
//! let v = vec![0.5f32; 8];
//! let bytes = cart::encode(&cart::CartContents {
//!     dims, dtype: DType::F32, model, provenance: Provenance::default(), summary: None,
//!     tensors: vec![bytemuck::cast_slice(&k), bytemuck::cast_slice(&v)],
//! }, Compression::None)?;
//! let view = cart::parse(&bytes)?;
//! view.verify()?;
//! assert_eq!(view.header.dims.tokens(), 2);
//! # Ok::<(), cart::CartError>(())
//! ```
#![deny(missing_docs)]

pub mod atomic;
pub mod cart;
pub mod dataset;
pub mod fingerprint;
pub mod lock;
pub mod time;

pub use fingerprint::{ModelFingerprint, WeightSampler};
