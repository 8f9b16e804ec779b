//! The JSON header of a `.cart` file (SPEC.md §2): types and the structural rules they must obey.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::{CartError, Result};
use crate::fingerprint::ModelFingerprint;

/// Cap on any dimension (SPEC.md §2.1).
pub const MAX_DIM: u64 = 1 << 24;
/// Cap on the number of tensors.
pub const MAX_TENSORS: usize = 4096;
/// Cap on any string in the header.
pub const MAX_STRING: usize = 64 * 1024;
/// Cap on metadata entries.
pub const MAX_METADATA: usize = 1024;
/// Cap on the nesting of `provenance.training`.
pub const MAX_DEPTH: usize = 16;
/// Tensor alignment inside the payload, and payload alignment in the file.
pub const ALIGN: u64 = 64;

/// What the payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Per-layer keys and values for `p` virtual tokens.
    Kv,
    /// `n` input embeddings.
    SoftPrompt,
}

impl Kind {
    /// Name as written in the header.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Kv => "kv",
            Kind::SoftPrompt => "soft_prompt",
        }
    }
}

/// Element type of every tensor in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
    /// Name as written in the header.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

/// Dimensions of a KV cartridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvDims {
    /// Decoder layers.
    pub layers: u32,
    /// Key/value heads per layer.
    pub kv_heads: u32,
    /// Width of one head.
    pub head_dim: u32,
    /// Virtual tokens `p`.
    pub tokens: u32,
    /// Leading tokens kept frozen in training (the attention sink).
    pub frozen_tokens: u32,
    /// Whether each layer carries a logit bias per slot, `bias.{l}` of `[kv_heads, tokens]`
    /// (SPEC.md §2.1). Absent from the header when false, so unbiased files keep their bytes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub biased: bool,
}

/// Dimensions of a soft prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftPromptDims {
    /// Embedding width (the model's hidden size).
    pub hidden: u32,
    /// Number of embeddings `n`.
    pub tokens: u32,
}

/// Kind and dimensions together, so one cannot disagree with the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dims {
    /// A KV cartridge.
    Kv(KvDims),
    /// A soft prompt.
    SoftPrompt(SoftPromptDims),
}

impl Dims {
    /// The payload kind.
    pub fn kind(&self) -> Kind {
        match self {
            Dims::Kv(_) => Kind::Kv,
            Dims::SoftPrompt(_) => Kind::SoftPrompt,
        }
    }

    /// Number of prefix tokens (`p` or `n`).
    pub fn tokens(&self) -> u32 {
        match self {
            Dims::Kv(d) => d.tokens,
            Dims::SoftPrompt(d) => d.tokens,
        }
    }

    /// The tensors this kind and these dims require, in file order: (name, shape).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<u64>)> {
        match self {
            Dims::Kv(d) => {
                let shape = vec![d.kv_heads as u64, d.tokens as u64, d.head_dim as u64];
                let bias = vec![d.kv_heads as u64, d.tokens as u64];
                (0..d.layers)
                    .flat_map(|l| {
                        let mut layer = vec![
                            (format!("keys.{l}"), shape.clone()),
                            (format!("values.{l}"), shape.clone()),
                        ];
                        if d.biased {
                            layer.push((format!("bias.{l}"), bias.clone()));
                        }
                        layer
                    })
                    .collect()
            }
            Dims::SoftPrompt(d) => vec![(
                "embeddings".to_string(),
                vec![d.tokens as u64, d.hidden as u64],
            )],
        }
    }

    /// Check every dimension is in range and consistent (SPEC.md §2.1).
    pub fn validate(&self) -> Result<()> {
        let check = |name: &str, v: u32| {
            if v == 0 || v as u64 > MAX_DIM {
                Err(CartError::InvalidDims(format!(
                    "{name} = {v} (must be 1..={MAX_DIM})"
                )))
            } else {
                Ok(())
            }
        };
        match self {
            Dims::Kv(d) => {
                check("layers", d.layers)?;
                check("kv_heads", d.kv_heads)?;
                check("head_dim", d.head_dim)?;
                check("tokens", d.tokens)?;
                if d.frozen_tokens > d.tokens {
                    return Err(CartError::InvalidDims(format!(
                        "frozen_tokens {} > tokens {}",
                        d.frozen_tokens, d.tokens
                    )));
                }
                let n = (2 + d.biased as u64) * d.layers as u64;
                if n > MAX_TENSORS as u64 {
                    return Err(CartError::LimitExceeded {
                        what: format!("tensor count {n}"),
                        limit: MAX_TENSORS as u64,
                    });
                }
                Ok(())
            }
            Dims::SoftPrompt(d) => {
                check("hidden", d.hidden)?;
                check("tokens", d.tokens)
            }
        }
    }

    /// Check the dims agree with the model they were made for (SPEC.md §2.2).
    pub fn check_model(&self, model: &ModelFingerprint) -> Result<()> {
        let mismatch = |what: &str, dims: u32, model: u32| {
            Err(CartError::ModelDimsMismatch(format!(
                "dims.{what} = {dims}, model has {model}"
            )))
        };
        match self {
            Dims::Kv(d) => {
                if d.layers != model.num_layers {
                    return mismatch("layers", d.layers, model.num_layers);
                }
                if d.kv_heads != model.num_kv_heads {
                    return mismatch("kv_heads", d.kv_heads, model.num_kv_heads);
                }
                if d.head_dim != model.head_dim {
                    return mismatch("head_dim", d.head_dim, model.head_dim);
                }
                Ok(())
            }
            Dims::SoftPrompt(d) => {
                if d.hidden != model.hidden_size {
                    return mismatch("hidden", d.hidden, model.hidden_size);
                }
                Ok(())
            }
        }
    }
}

/// Where the stored keys sit in position space (SPEC.md §2.1). v1 admits one value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Positions {
    /// Rotary layout of stored keys: `rotate_half` (Hugging Face).
    pub rope_layout: String,
    /// Position of the first stored token: 0.
    pub first_position: u64,
}

impl Default for Positions {
    fn default() -> Self {
        Self {
            rope_layout: "rotate_half".into(),
            first_position: 0,
        }
    }
}

/// Where a cartridge came from (SPEC.md §2.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// Tool and version that wrote the file.
    pub tool: String,
    /// Creation time, RFC 3339, supplied by the caller.
    pub created: String,
    /// `sha256:<hex>` of the corpus, when there was one.
    pub corpus_digest: Option<String>,
    /// Training settings (free JSON object).
    pub training: serde_json::Value,
    /// Free-form string metadata.
    pub metadata: BTreeMap<String, String>,
}

impl Default for Provenance {
    fn default() -> Self {
        Self {
            tool: format!("cartridge {}", env!("CARGO_PKG_VERSION")),
            created: String::new(),
            corpus_digest: None,
            training: serde_json::Value::Object(Default::default()),
            metadata: BTreeMap::new(),
        }
    }
}

/// One tensor's place in the raw payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// Name (`keys.{l}`, `values.{l}`, `embeddings`).
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<u64>,
    /// Offset from the start of the raw payload, a multiple of 64.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// `xxh3:<16 hex>` of the tensor bytes.
    pub checksum: String,
}

/// How the payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Raw bytes, usable zero-copy.
    None,
    /// One zstd frame.
    Zstd,
}

/// The payload's sizes and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadInfo {
    /// Length of the raw (decompressed) payload.
    pub raw_len: u64,
    /// Length of the bytes stored in the file.
    pub stored_len: u64,
    /// Storage codec.
    pub compression: Compression,
    /// `xxh3:<16 hex>` of the stored bytes when compressed; `None` when uncompressed (the tensor
    /// checksums and the zero padding rule already cover every raw byte).
    pub checksum: Option<String>,
}

/// The header as it sits on disk (SPEC.md §2): field order here is the byte order written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHeader {
    pub kind: Kind,
    pub dtype: DType,
    pub dims: serde_json::Value,
    pub positions: Positions,
    pub model: ModelFingerprint,
    pub provenance: Provenance,
    pub summary: Option<String>,
    pub tensors: Vec<TensorEntry>,
    pub payload: PayloadInfo,
}

/// A validated header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// Kind and dimensions.
    pub dims: Dims,
    /// Element type.
    pub dtype: DType,
    /// Position layout of stored keys.
    pub positions: Positions,
    /// The model this was trained for.
    pub model: ModelFingerprint,
    /// Where it came from.
    pub provenance: Provenance,
    /// Soft prompt summary text.
    pub summary: Option<String>,
    /// Tensors in file order.
    pub tensors: Vec<TensorEntry>,
    /// Payload sizes and codec.
    pub payload: PayloadInfo,
}

impl Header {
    /// The payload kind.
    pub fn kind(&self) -> Kind {
        self.dims.kind()
    }

    /// Bytes the tensors take in memory once loaded (the raw payload).
    pub fn memory_bytes(&self) -> u64 {
        self.payload.raw_len
    }

    /// Serialise to the canonical JSON bytes (SPEC.md §2: fixed member order, no whitespace).
    pub(crate) fn to_json(&self) -> Result<Vec<u8>> {
        let dims = match &self.dims {
            Dims::Kv(d) => serde_json::to_value(d),
            Dims::SoftPrompt(d) => serde_json::to_value(d),
        }
        .map_err(|e| CartError::InvalidInput(e.to_string()))?;
        let raw = RawHeader {
            kind: self.dims.kind(),
            dtype: self.dtype,
            dims,
            positions: self.positions.clone(),
            model: self.model.clone(),
            provenance: self.provenance.clone(),
            summary: self.summary.clone(),
            tensors: self.tensors.clone(),
            payload: self.payload.clone(),
        };
        serde_json::to_vec(&raw).map_err(|e| CartError::InvalidInput(e.to_string()))
    }

    /// Parse and validate header JSON bytes (everything in SPEC.md §2 that the header alone decides).
    pub(crate) fn from_json(bytes: &[u8]) -> Result<Header> {
        let text = std::str::from_utf8(bytes).map_err(|e| CartError::HeaderUtf8 {
            valid_up_to: e.valid_up_to(),
        })?;
        let raw: RawHeader =
            serde_json::from_str(text).map_err(|e| CartError::HeaderJson(e.to_string()))?;
        let dims = match raw.kind {
            Kind::Kv => Dims::Kv(
                serde_json::from_value(raw.dims)
                    .map_err(|e| CartError::HeaderJson(format!("dims: {e}")))?,
            ),
            Kind::SoftPrompt => Dims::SoftPrompt(
                serde_json::from_value(raw.dims)
                    .map_err(|e| CartError::HeaderJson(format!("dims: {e}")))?,
            ),
        };
        let header = Header {
            dims,
            dtype: raw.dtype,
            positions: raw.positions,
            model: raw.model,
            provenance: raw.provenance,
            summary: raw.summary,
            tensors: raw.tensors,
            payload: raw.payload,
        };
        header.validate()?;
        Ok(header)
    }

    /// Every structural rule of SPEC.md §2 and §3 that needs no payload byte.
    pub fn validate(&self) -> Result<()> {
        self.dims.validate()?;
        self.dims.check_model(&self.model)?;
        if self.positions != Positions::default() {
            return Err(CartError::UnsupportedLayout(format!(
                "rope_layout {:?}, first_position {} (v1 requires \"rotate_half\" at 0)",
                self.positions.rope_layout, self.positions.first_position
            )));
        }
        if self.summary.is_some() && self.dims.kind() == Kind::Kv {
            return Err(CartError::HeaderJson(
                "summary must be null for a kv cartridge".into(),
            ));
        }
        self.check_limits()?;
        match (self.payload.compression, &self.payload.checksum) {
            (Compression::None, None) => {}
            (Compression::Zstd, Some(sum)) => {
                parse_checksum("payload", sum)?;
            }
            (Compression::None, Some(_)) => {
                return Err(CartError::HeaderJson(
                    "payload.checksum must be null for an uncompressed payload".into(),
                ))
            }
            (Compression::Zstd, None) => {
                return Err(CartError::HeaderJson(
                    "payload.checksum is required for a compressed payload".into(),
                ))
            }
        }
        if self.payload.compression == Compression::None
            && self.payload.stored_len != self.payload.raw_len
        {
            return Err(CartError::StoredLenMismatch {
                stored: self.payload.stored_len,
                raw: self.payload.raw_len,
            });
        }
        let expected = self.dims.expected_tensors();
        if self.tensors.len() > MAX_TENSORS {
            return Err(CartError::LimitExceeded {
                what: format!("tensor count {}", self.tensors.len()),
                limit: MAX_TENSORS as u64,
            });
        }
        let mut next = 0u64;
        let mut previous = String::from("payload start");
        for i in 0..expected.len().max(self.tensors.len()) {
            let (want_name, want_shape) = match (expected.get(i), self.tensors.get(i)) {
                (Some(e), Some(_)) => e,
                (Some(e), None) => {
                    return Err(CartError::UnexpectedTensor {
                        index: i,
                        expected: e.0.clone(),
                        found: "end of list".into(),
                    })
                }
                (None, Some(t)) => {
                    return Err(CartError::UnexpectedTensor {
                        index: i,
                        expected: "end of list".into(),
                        found: t.name.clone(),
                    })
                }
                (None, None) => break,
            };
            let t = &self.tensors[i];
            if &t.name != want_name {
                return Err(CartError::UnexpectedTensor {
                    index: i,
                    expected: want_name.clone(),
                    found: t.name.clone(),
                });
            }
            let bytes = t
                .shape
                .iter()
                .try_fold(self.dtype.size(), |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| CartError::DimensionOverflow {
                    tensor: t.name.clone(),
                    shape: t.shape.clone(),
                })?;
            if &t.shape != want_shape {
                return Err(CartError::ShapeMismatch {
                    tensor: t.name.clone(),
                    expected: want_shape.clone(),
                    found: t.shape.clone(),
                });
            }
            if t.len != bytes {
                return Err(CartError::SizeMismatch {
                    tensor: t.name.clone(),
                    expected: bytes,
                    found: t.len,
                });
            }
            if !t.offset.is_multiple_of(ALIGN) {
                return Err(CartError::Misaligned {
                    tensor: t.name.clone(),
                    offset: t.offset,
                });
            }
            let end = t
                .offset
                .checked_add(t.len)
                .ok_or_else(|| CartError::DimensionOverflow {
                    tensor: t.name.clone(),
                    shape: t.shape.clone(),
                })?;
            if end > self.payload.raw_len {
                return Err(CartError::OutOfBounds {
                    tensor: t.name.clone(),
                    end,
                    payload_len: self.payload.raw_len,
                });
            }
            if t.offset < next {
                return Err(CartError::Overlap {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    previous,
                    previous_end: next,
                });
            }
            if t.offset > next {
                return Err(CartError::Gap {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    expected: next,
                });
            }
            parse_checksum(&format!("tensor {:?}", t.name), &t.checksum)?;
            next = align_up(end).ok_or_else(|| CartError::DimensionOverflow {
                tensor: t.name.clone(),
                shape: t.shape.clone(),
            })?;
            previous = t.name.clone();
        }
        if self.payload.raw_len != next {
            return Err(CartError::RawLenMismatch {
                expected: next,
                found: self.payload.raw_len,
            });
        }
        Ok(())
    }

    fn check_limits(&self) -> Result<()> {
        let long = |what: &str, s: &str| {
            if s.len() > MAX_STRING {
                Err(CartError::LimitExceeded {
                    what: format!("{what} ({} bytes)", s.len()),
                    limit: MAX_STRING as u64,
                })
            } else {
                Ok(())
            }
        };
        let p = &self.provenance;
        long("provenance.tool", &p.tool)?;
        long("provenance.created", &p.created)?;
        if let Some(d) = &p.corpus_digest {
            long("provenance.corpus_digest", d)?;
        }
        if let Some(s) = &self.summary {
            long("summary", s)?;
        }
        if p.metadata.len() > MAX_METADATA {
            return Err(CartError::LimitExceeded {
                what: format!("metadata entry count {}", p.metadata.len()),
                limit: MAX_METADATA as u64,
            });
        }
        for (k, v) in &p.metadata {
            long("metadata key", k)?;
            long(&format!("metadata[{k:?}]"), v)?;
        }
        if !p.training.is_object() {
            return Err(CartError::HeaderJson(
                "provenance.training must be a JSON object".into(),
            ));
        }
        if depth(&p.training) > MAX_DEPTH {
            return Err(CartError::LimitExceeded {
                what: "nesting of provenance.training".into(),
                limit: MAX_DEPTH as u64,
            });
        }
        for t in &self.tensors {
            long("tensor name", &t.name)?;
            if t.shape.len() > 8 {
                return Err(CartError::LimitExceeded {
                    what: format!("rank of tensor {:?}", t.name),
                    limit: 8,
                });
            }
        }
        Ok(())
    }
}

fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Round up to the next multiple of [`ALIGN`]; `None` on overflow.
pub fn align_up(x: u64) -> Option<u64> {
    x.checked_add(ALIGN - 1).map(|v| v / ALIGN * ALIGN)
}

/// Format a checksum as the header writes it.
pub fn format_checksum(sum: u64) -> String {
    format!("xxh3:{sum:016x}")
}

/// Parse `xxh3:<16 hex>`.
pub fn parse_checksum(what: &str, s: &str) -> Result<u64> {
    let bad = || CartError::BadChecksumString {
        what: what.to_string(),
        found: s.chars().take(40).collect(),
    };
    let hex = s.strip_prefix("xxh3:").ok_or_else(bad)?;
    if hex.len() != 16
        || !hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(bad());
    }
    u64::from_str_radix(hex, 16).map_err(|_| bad())
}
