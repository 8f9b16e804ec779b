//! The writer: deterministic bytes (SPEC.md §1-§3) and an atomic file write (SPEC.md §5).

use xxhash_rust::xxh3::xxh3_64;

use super::error::{CartError, Result};
use super::header::{
    align_up, format_checksum, Compression, DType, Dims, Header, PayloadInfo, Positions,
    Provenance, TensorEntry,
};
use super::parse::{MAGIC, PREAMBLE_LEN, VERSION};
use crate::fingerprint::ModelFingerprint;

/// Everything that goes into a `.cart`, with tensor data as little-endian bytes in file order
/// (`keys.0, values.0, keys.1, ...` for `kv`; `embeddings` for a soft prompt).
#[derive(Debug, Clone)]
pub struct CartContents<'a> {
    /// Kind and dimensions.
    pub dims: Dims,
    /// Element type of the tensor bytes.
    pub dtype: DType,
    /// The model this is for.
    pub model: ModelFingerprint,
    /// Where it came from.
    pub provenance: Provenance,
    /// Soft prompt summary text (must be `None` for `kv`).
    pub summary: Option<String>,
    /// Tensor bytes in file order.
    pub tensors: Vec<&'a [u8]>,
}

/// zstd level used for `--compress` (a good ratio/speed trade-off for float data).
pub const ZSTD_LEVEL: i32 = 9;

/// Encode to the exact bytes of a `.cart` file.
pub fn encode(contents: &CartContents<'_>, compression: Compression) -> Result<Vec<u8>> {
    contents.dims.validate()?;
    contents.dims.check_model(&contents.model)?;
    let expected = contents.dims.expected_tensors();
    if expected.len() != contents.tensors.len() {
        return Err(CartError::InvalidInput(format!(
            "{} tensors given, {} {} needs {}",
            contents.tensors.len(),
            contents.dims.kind().name(),
            "cartridge",
            expected.len()
        )));
    }
    let mut entries = Vec::with_capacity(expected.len());
    let mut offset = 0u64;
    for ((name, shape), data) in expected.into_iter().zip(&contents.tensors) {
        let want = shape
            .iter()
            .try_fold(contents.dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| CartError::InvalidInput(format!("{name}: size overflows")))?;
        if data.len() as u64 != want {
            return Err(CartError::InvalidInput(format!(
                "{name}: {} bytes given, shape {shape:?} x {} needs {want}",
                data.len(),
                contents.dtype.name()
            )));
        }
        entries.push(TensorEntry {
            name,
            shape,
            offset,
            len: want,
            checksum: format_checksum(xxh3_64(data)),
        });
        offset = align_up(offset + want)
            .ok_or_else(|| CartError::InvalidInput("payload size overflows".into()))?;
    }
    let raw_len = offset;
    let mut raw = vec![
        0u8;
        usize::try_from(raw_len)
            .map_err(|_| CartError::InvalidInput("payload too large".into()))?
    ];
    for (e, data) in entries.iter().zip(&contents.tensors) {
        raw[e.offset as usize..(e.offset + e.len) as usize].copy_from_slice(data);
    }
    let stored = match compression {
        Compression::None => raw,
        Compression::Zstd => zstd::bulk::compress(&raw, ZSTD_LEVEL)
            .map_err(|e| CartError::InvalidInput(format!("zstd: {e}")))?,
    };
    let header = Header {
        dims: contents.dims,
        dtype: contents.dtype,
        positions: Positions::default(),
        model: contents.model.clone(),
        provenance: contents.provenance.clone(),
        summary: contents.summary.clone(),
        tensors: entries,
        payload: PayloadInfo {
            raw_len,
            stored_len: stored.len() as u64,
            compression,
            checksum: match compression {
                Compression::None => None,
                Compression::Zstd => Some(format_checksum(xxh3_64(&stored))),
            },
        },
    };
    header.validate()?;
    let json = header.to_json()?;
    let header_end = PREAMBLE_LEN + json.len() as u64;
    let payload_offset = align_up(header_end).unwrap_or(header_end) as usize;
    let mut out = Vec::with_capacity(payload_offset + stored.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxh3_64(&json).to_le_bytes());
    out.extend_from_slice(&json);
    out.resize(payload_offset, 0);
    out.extend_from_slice(&stored);
    Ok(out)
}

/// Re-encode an existing file's bytes with another compression (tensors and metadata unchanged).
pub fn recompress(bytes: &[u8], compression: Compression) -> Result<Vec<u8>> {
    let view = super::parse::parse(bytes)?;
    view.verify()?;
    let raw = view.decompress()?;
    let h = &view.header;
    let tensors = h
        .tensors
        .iter()
        .map(|t| super::parse::tensor_bytes(t, raw.as_slice()))
        .collect::<Result<Vec<_>>>()?;
    encode(
        &CartContents {
            dims: h.dims,
            dtype: h.dtype,
            model: h.model.clone(),
            provenance: h.provenance.clone(),
            summary: h.summary.clone(),
            tensors,
        },
        compression,
    )
}
