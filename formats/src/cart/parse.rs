//! The pure parser: `&[u8]` in, a validated view out (SPEC.md §1-§4). No I/O, no unchecked offsets.

use xxhash_rust::xxh3::xxh3_64;

use super::error::{CartError, Result};
use super::header::{align_up, parse_checksum, Compression, DType, Header, TensorEntry};

/// The eight magic bytes.
pub const MAGIC: [u8; 8] = *b"CARTRDG\0";
/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Fixed preamble length.
pub const PREAMBLE_LEN: u64 = 32;
/// Cap on the header length.
pub const MAX_HEADER_LEN: u64 = 16 * 1024 * 1024;

/// A parsed `.cart` over borrowed bytes: the validated header and the stored payload bytes.
///
/// Parsing reads the preamble and header only; no payload byte is touched until [`CartView::verify`],
/// [`CartView::tensor`] data access or [`CartView::decompress`].
#[derive(Debug, Clone)]
pub struct CartView<'a> {
    /// The validated header.
    pub header: Header,
    /// File offset of the payload.
    pub payload_offset: u64,
    /// The payload bytes as stored (raw, or the zstd frame).
    pub stored: &'a [u8],
}

/// A typed window on one tensor's bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// The tensor's header entry.
    pub entry: &'a TensorEntry,
    /// Element type.
    pub dtype: DType,
    /// The tensor's bytes (little-endian, row-major).
    pub bytes: &'a [u8],
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

fn to_usize(v: u64, section: &'static str, available: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| CartError::Truncated {
        section,
        needed: v,
        available,
    })
}

/// Parse and validate a whole `.cart` file's bytes (the stored form; see [`CartView`]).
pub fn parse(bytes: &[u8]) -> Result<CartView<'_>> {
    let file_len = bytes.len() as u64;
    let truncated = |section, needed| CartError::Truncated {
        section,
        needed,
        available: file_len,
    };
    let magic: [u8; 8] = match bytes.get(..8) {
        Some(m) => m.try_into().map_err(|_| truncated("magic", 8))?,
        None => return Err(truncated("magic", 8)),
    };
    if magic != MAGIC {
        return Err(CartError::BadMagic { found: magic });
    }
    let version = read_u32(bytes, 8).ok_or_else(|| truncated("preamble (version)", 12))?;
    if version != VERSION {
        return Err(CartError::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    let reserved = read_u32(bytes, 12).ok_or_else(|| truncated("preamble (reserved)", 16))?;
    if reserved != 0 {
        return Err(CartError::ReservedNotZero(reserved));
    }
    let header_len =
        read_u64(bytes, 16).ok_or_else(|| truncated("preamble (header length)", 24))?;
    let header_sum =
        read_u64(bytes, 24).ok_or_else(|| truncated("preamble (header checksum)", 32))?;
    if header_len > MAX_HEADER_LEN {
        return Err(CartError::HeaderTooLarge {
            len: header_len,
            max: MAX_HEADER_LEN,
        });
    }
    let header_end = PREAMBLE_LEN + header_len; // both bounded: no overflow
    let header_bytes = bytes
        .get(PREAMBLE_LEN as usize..to_usize(header_end, "header", file_len)?)
        .ok_or_else(|| truncated("header", header_end))?;
    let computed = xxh3_64(header_bytes);
    if computed != header_sum {
        return Err(CartError::HeaderChecksum {
            stored: header_sum,
            computed,
        });
    }
    let header = Header::from_json(header_bytes)?;

    let payload_offset = align_up(header_end).ok_or_else(|| truncated("padding", u64::MAX))?;
    let padding = bytes
        .get(header_end as usize..to_usize(payload_offset, "padding", file_len)?)
        .ok_or_else(|| truncated("padding", payload_offset))?;
    if let Some(i) = padding.iter().position(|&b| b != 0) {
        return Err(CartError::PaddingNotZero {
            offset: header_end + i as u64,
        });
    }
    let end = payload_offset
        .checked_add(header.payload.stored_len)
        .ok_or_else(|| truncated("payload", u64::MAX))?;
    if end > file_len {
        return Err(truncated("payload", end));
    }
    if end < file_len {
        return Err(CartError::TrailingBytes {
            expected: end,
            actual: file_len,
            extra: file_len - end,
        });
    }
    let stored = bytes
        .get(payload_offset as usize..end as usize)
        .ok_or_else(|| truncated("payload", end))?;
    Ok(CartView {
        header,
        payload_offset,
        stored,
    })
}

impl<'a> CartView<'a> {
    /// Whether the tensors can be viewed straight from the stored bytes.
    pub fn is_compressed(&self) -> bool {
        self.header.payload.compression == Compression::Zstd
    }

    /// Check the stored payload's checksum: for a compressed file this catches a flipped bit
    /// without decompressing; an uncompressed file has no such checksum (its tensors do).
    pub fn verify_stored(&self) -> Result<()> {
        verify_stored(&self.header, self.stored)
    }

    /// Decompress a zstd payload into a 64-byte-aligned buffer of exactly `raw_len` bytes.
    /// For an uncompressed payload this copies it (callers normally use the bytes in place).
    pub fn decompress(&self) -> Result<AlignedBytes> {
        let raw_len = self.header.payload.raw_len;
        let len = usize::try_from(raw_len).map_err(|_| CartError::DecompressedSize {
            expected: raw_len,
            found: 0,
        })?;
        let mut out = AlignedBytes::zeroed(len);
        match self.header.payload.compression {
            Compression::None => out.as_mut_slice().copy_from_slice(self.stored),
            Compression::Zstd => decompress_exact(self.stored, out.as_mut_slice(), raw_len)?,
        }
        Ok(out)
    }

    /// Verify everything: for a compressed file the stored checksum, then (decompressed) every
    /// tensor; for an uncompressed one every tensor and the zero padding between them.
    pub fn verify(&self) -> Result<()> {
        match self.header.payload.compression {
            Compression::None => verify_raw(&self.header, self.stored),
            Compression::Zstd => {
                self.verify_stored()?;
                verify_raw(&self.header, self.decompress()?.as_slice())
            }
        }
    }
}

/// Check a compressed payload's stored checksum (a no-op for an uncompressed payload).
pub fn verify_stored(header: &Header, stored: &[u8]) -> Result<()> {
    let Some(sum) = &header.payload.checksum else {
        return Ok(());
    };
    let want = parse_checksum("payload", sum)?;
    let computed = xxh3_64(stored);
    if want != computed {
        return Err(CartError::PayloadChecksum {
            stored: want,
            computed,
        });
    }
    Ok(())
}

/// Check every tensor checksum and the zero padding of a raw payload, so every byte is covered.
/// Large payloads are split in two halves hashed on two threads: verify is memory-bound and a
/// second core nearly doubles it.
pub fn verify_raw(header: &Header, raw: &[u8]) -> Result<()> {
    verify_padding(header, raw)?;
    let tensors = &header.tensors;
    if raw.len() < (4 << 20) || tensors.len() < 2 {
        return verify_tensors(tensors, raw);
    }
    // Split where half the bytes are behind us.
    let half = raw.len() as u64 / 2;
    let split = tensors
        .iter()
        .position(|t| t.offset >= half)
        .unwrap_or(tensors.len() - 1)
        .max(1);
    let (first, second) = tensors.split_at(split);
    std::thread::scope(|s| {
        let other = s.spawn(|| verify_tensors(second, raw));
        let a = verify_tensors(first, raw);
        // The hashing thread cannot panic short of a bug; a panic there is re-raised here.
        let b = other
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        a.and(b)
    })
}

/// The padding after each tensor (up to the next multiple of 64) must be zero bytes.
fn verify_padding(header: &Header, raw: &[u8]) -> Result<()> {
    for t in &header.tensors {
        let end = t.offset.saturating_add(t.len);
        let padded = align_up(end).unwrap_or(end).min(raw.len() as u64);
        if let Some(pad) = raw.get(end as usize..padded as usize) {
            if let Some(i) = pad.iter().position(|&b| b != 0) {
                return Err(CartError::TensorPaddingNotZero {
                    tensor: t.name.clone(),
                    offset: end + i as u64,
                });
            }
        }
    }
    Ok(())
}

fn decompress_exact(frame: &[u8], out: &mut [u8], expected: u64) -> Result<()> {
    use std::io::Read;
    let mut decoder = zstd::stream::read::Decoder::with_buffer(frame)
        .map_err(|e| CartError::Decompress(e.to_string()))?;
    let mut filled = 0usize;
    while filled < out.len() {
        match decoder.read(&mut out[filled..]) {
            Ok(0) => {
                return Err(CartError::DecompressedSize {
                    expected,
                    found: filled as u64,
                })
            }
            Ok(n) => filled += n,
            Err(e) => return Err(CartError::Decompress(e.to_string())),
        }
    }
    // The frame must end here: one more byte means it decompresses to more than declared.
    let mut extra = [0u8; 1];
    match decoder.read(&mut extra) {
        Ok(0) => Ok(()),
        Ok(_) => Err(CartError::DecompressedSize {
            expected,
            found: expected + 1,
        }),
        Err(e) => Err(CartError::Decompress(e.to_string())),
    }
}

/// Check every tensor's checksum against the raw payload bytes.
pub fn verify_tensors(tensors: &[TensorEntry], raw: &[u8]) -> Result<()> {
    for t in tensors {
        let bytes = tensor_bytes(t, raw)?;
        let stored = parse_checksum(&t.name, &t.checksum)?;
        let computed = xxh3_64(bytes);
        if stored != computed {
            return Err(CartError::TensorChecksum {
                tensor: t.name.clone(),
                offset: t.offset,
                stored,
                computed,
            });
        }
    }
    Ok(())
}

/// The bytes of one tensor inside a raw payload (bounds were validated with the header; checked again).
pub fn tensor_bytes<'a>(t: &TensorEntry, raw: &'a [u8]) -> Result<&'a [u8]> {
    let oob = || CartError::OutOfBounds {
        tensor: t.name.clone(),
        end: t.offset.saturating_add(t.len),
        payload_len: raw.len() as u64,
    };
    let start = usize::try_from(t.offset).map_err(|_| oob())?;
    let end = start
        .checked_add(usize::try_from(t.len).map_err(|_| oob())?)
        .ok_or_else(oob)?;
    raw.get(start..end).ok_or_else(oob)
}

impl<'a> TensorView<'a> {
    /// The tensor's name.
    pub fn name(&self) -> &'a str {
        &self.entry.name
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &'a [u64] {
        &self.entry.shape
    }

    fn cast<T: bytemuck::Pod>(&self, want: DType) -> Result<&'a [T]> {
        if self.dtype != want || cfg!(target_endian = "big") {
            return Err(CartError::WrongDType {
                tensor: self.entry.name.clone(),
                actual: self.dtype.name(),
                requested: want.name(),
            });
        }
        bytemuck::try_cast_slice(self.bytes).map_err(|e| CartError::Misaligned {
            tensor: format!("{} ({e})", self.entry.name),
            offset: self.entry.offset,
        })
    }

    /// Zero-copy view as f32 (dtype must be f32).
    pub fn as_f32(&self) -> Result<&'a [f32]> {
        self.cast(DType::F32)
    }

    /// Zero-copy view as f16 (dtype must be f16).
    pub fn as_f16(&self) -> Result<&'a [half::f16]> {
        self.cast(DType::F16)
    }

    /// Zero-copy view as bf16 (dtype must be bf16).
    pub fn as_bf16(&self) -> Result<&'a [half::bf16]> {
        self.cast(DType::Bf16)
    }

    /// The values converted to f32, whatever the stored dtype (a copy).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::Bf16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

/// Build the view of tensor `index` over a raw payload.
pub(crate) fn view<'a>(header: &'a Header, raw: &'a [u8], index: usize) -> Result<TensorView<'a>> {
    let entry = header
        .tensors
        .get(index)
        .ok_or_else(|| CartError::NoSuchTensor(format!("#{index}")))?;
    Ok(TensorView {
        entry,
        dtype: header.dtype,
        bytes: tensor_bytes(entry, raw)?,
    })
}

/// A heap buffer aligned to 64 bytes (decompressed payloads keep the zero-copy view rules).
pub struct AlignedBytes {
    blocks: Vec<Block>,
    len: usize,
}

/// 64 bytes aligned to 64: the allocation unit of [`AlignedBytes`].
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; 64]);

// SAFETY: `Block` is 64 plain bytes with alignment 64 and no padding; every bit pattern is valid.
unsafe impl bytemuck::Zeroable for Block {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for Block {}

impl AlignedBytes {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        Self {
            blocks: vec![Block([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.blocks)[..self.len]
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.blocks)[..self.len]
    }
}

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}
