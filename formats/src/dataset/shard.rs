//! Shard files (SPEC.md D3): the preamble, record frames, a pure scanner that finds a torn tail,
//! and an append-only writer.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{DatasetError, Result};
use super::record::Record;
use crate::fingerprint::hex;

/// Shard magic bytes.
pub const MAGIC: [u8; 8] = *b"CARTDSS\0";
/// Shard version.
pub const VERSION: u32 = 1;
/// Length of the shard preamble.
pub const PREAMBLE_LEN: usize = 48;
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest stored or raw record size.
pub const MAX_FRAME: u32 = 64 << 20;
/// zstd level for records: fast, and top-k log-probs barely compress further at higher levels.
pub const ZSTD_LEVEL: i32 = 3;

/// The 48-byte preamble of a shard for `teacher_id`.
pub fn preamble(teacher_id: &[u8; 32]) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..8].copy_from_slice(&MAGIC);
    p[8..12].copy_from_slice(&VERSION.to_le_bytes());
    p[16..48].copy_from_slice(teacher_id);
    p
}

/// One frame's bytes: header + zstd-compressed record.
pub fn encode_frame(record: &Record) -> Result<Vec<u8>> {
    let raw = record.encode()?;
    let stored = zstd::bulk::compress(&raw, ZSTD_LEVEL)
        .map_err(|e| DatasetError::InvalidRecord(format!("zstd: {e}")))?;
    if raw.len() > MAX_FRAME as usize || stored.len() > MAX_FRAME as usize {
        return Err(DatasetError::InvalidRecord(format!(
            "record is {} bytes ({} compressed), over the {MAX_FRAME}-byte limit",
            raw.len(),
            stored.len()
        )));
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + stored.len());
    out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    let sum = frame_checksum(&out[..8], &stored);
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(&stored);
    Ok(out)
}

fn frame_checksum(lengths: &[u8], stored: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(lengths);
    h.update(stored);
    h.digest()
}

/// A frame found by [`scan`]: where it is and its still-compressed bytes.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// Offset of the frame header in the shard.
    pub offset: u64,
    /// Decompressed length.
    pub raw_len: u32,
    /// The zstd frame.
    pub stored: &'a [u8],
}

impl Frame<'_> {
    /// Decompress and decode the record (`vocab` bounds ids when given).
    pub fn decode(&self, path: &Path, vocab: Option<u32>) -> Result<Record> {
        let corrupt = |reason: String| DatasetError::CorruptRecord {
            path: path.to_path_buf(),
            offset: self.offset,
            reason,
        };
        let raw = zstd::bulk::decompress(self.stored, self.raw_len as usize)
            .map_err(|e| corrupt(format!("zstd: {e}")))?;
        if raw.len() != self.raw_len as usize {
            return Err(corrupt(format!(
                "decompresses to {} bytes, header says {}",
                raw.len(),
                self.raw_len
            )));
        }
        Record::decode(&raw, vocab).map_err(|e| corrupt(e.to_string()))
    }
}

/// The frames of one shard and, when the file ends mid-frame, where and why.
#[derive(Debug)]
pub struct Scan<'a> {
    /// Complete frames whose checksums match, in file order.
    pub frames: Vec<Frame<'a>>,
    /// `(offset, reason)` of a torn last frame (or a torn preamble at offset 0).
    pub torn: Option<(u64, String)>,
}

impl Scan<'_> {
    /// Where the good data ends (truncate here to drop a torn tail).
    pub fn good_len(&self) -> u64 {
        match &self.torn {
            Some((off, _)) => *off,
            None => u64::MAX,
        }
    }
}

/// Scan a shard's bytes: check the preamble against `teacher_id`, walk the frames and verify
/// their checksums. Pure: `path` only labels errors. A torn tail is reported in [`Scan::torn`],
/// not as an error; whether it is acceptable depends on the shard being the last one.
pub fn scan<'a>(path: &Path, bytes: &'a [u8], teacher_id: &[u8; 32]) -> Result<Scan<'a>> {
    let bad = |message: String| DatasetError::BadShard {
        path: path.to_path_buf(),
        message,
    };
    let Some(pre) = bytes.get(..PREAMBLE_LEN) else {
        // Only a prefix of a preamble: the writer died creating the shard, if the prefix agrees.
        if preamble(teacher_id).starts_with(bytes)
            || MAGIC.starts_with(&bytes[..bytes.len().min(8)])
        {
            return Ok(Scan {
                frames: Vec::new(),
                torn: Some((0, format!("preamble has only {} of 48 bytes", bytes.len()))),
            });
        }
        return Err(bad(format!(
            "{} bytes, shorter than the preamble",
            bytes.len()
        )));
    };
    if pre[..8] != MAGIC {
        return Err(bad(format!(
            "magic bytes are {:02x?}, expected \"CARTDSS\\0\"",
            &pre[..8]
        )));
    }
    let version = u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]);
    if version != VERSION {
        return Err(bad(format!(
            "unsupported shard version {version} (this build reads version {VERSION})"
        )));
    }
    if pre[12..16] != [0, 0, 0, 0] {
        return Err(bad("reserved field is not zero".into()));
    }
    if pre[16..48] != teacher_id[..] {
        return Err(DatasetError::ForeignShard {
            path: path.to_path_buf(),
            found: hex(&pre[16..48]),
            expected: hex(teacher_id),
        });
    }
    let mut frames = Vec::new();
    let mut pos = PREAMBLE_LEN;
    let len = bytes.len();
    while pos < len {
        let offset = pos as u64;
        let Some(h) = bytes.get(pos..pos + FRAME_HEADER_LEN) else {
            return Ok(Scan {
                frames,
                torn: Some((
                    offset,
                    format!("frame header has {} of 16 bytes", len - pos),
                )),
            });
        };
        let stored_len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let raw_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let sum = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let body_start = pos + FRAME_HEADER_LEN;
        let corrupt = |reason: String| DatasetError::CorruptRecord {
            path: path.to_path_buf(),
            offset,
            reason,
        };
        let sizes_ok = (1..=MAX_FRAME).contains(&stored_len) && (1..=MAX_FRAME).contains(&raw_len);
        let end = body_start + stored_len as usize;
        if sizes_ok && end > len {
            return Ok(Scan {
                frames,
                torn: Some((
                    offset,
                    format!(
                        "frame needs {} stored bytes, {} remain",
                        stored_len,
                        len - body_start
                    ),
                )),
            });
        }
        let stored = bytes.get(body_start..end.min(len)).unwrap_or(&[]);
        let ok = sizes_ok && frame_checksum(&h[..8], stored) == sum;
        if !ok {
            // A bad frame that runs to the end of the file may be a partly flushed append.
            let at_end = !sizes_ok || end == len;
            let reason = if sizes_ok {
                "checksum mismatch".to_string()
            } else {
                format!("impossible lengths (stored {stored_len}, raw {raw_len})")
            };
            if at_end && (sizes_ok || !frames_follow(bytes, body_start)) {
                return Ok(Scan {
                    frames,
                    torn: Some((offset, reason)),
                });
            }
            return Err(corrupt(reason));
        }
        frames.push(Frame {
            offset,
            raw_len,
            stored,
        });
        pos = end;
    }
    Ok(Scan { frames, torn: None })
}

/// Whether anything but zeros follows `from` (a torn append leaves zeros or nothing; real
/// corruption of a length field in the middle leaves data behind).
fn frames_follow(bytes: &[u8], from: usize) -> bool {
    bytes
        .get(from..)
        .is_some_and(|rest| rest.iter().any(|&b| b != 0))
}

/// Appends frames to one shard file.
#[derive(Debug)]
pub struct ShardWriter {
    path: PathBuf,
    file: File,
    len: u64,
}

impl ShardWriter {
    /// Create a new shard (fails if the file exists) and write its preamble.
    pub fn create(path: &Path, teacher_id: &[u8; 32]) -> Result<Self> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| DatasetError::io(path, e))?;
        file.write_all(&preamble(teacher_id))
            .map_err(|e| DatasetError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len: PREAMBLE_LEN as u64,
        })
    }

    /// Append one record as one frame, in one write.
    pub fn append(&mut self, record: &Record) -> Result<u64> {
        let frame = encode_frame(record)?;
        self.file
            .write_all(&frame)
            .map_err(|e| DatasetError::io(&self.path, e))?;
        self.len += frame.len() as u64;
        Ok(frame.len() as u64)
    }

    /// Flush to stable storage.
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| DatasetError::io(&self.path, e))
    }

    /// Bytes written so far, preamble included.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether only the preamble has been written.
    pub fn is_empty(&self) -> bool {
        self.len <= PREAMBLE_LEN as u64
    }

    /// The shard's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
