//! Every way a `.cart` file can be wrong, one variant each.

use std::path::PathBuf;

/// Result alias for the container.
pub type Result<T> = std::result::Result<T, CartError>;

/// Why a `.cart` could not be read, written or trusted. Messages say what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum CartError {
    /// The file ends before a section does.
    #[error("truncated {section}: needs bytes up to offset {needed}, file has {available}")]
    Truncated {
        /// Which part was cut off.
        section: &'static str,
        /// Offset the section ends at.
        needed: u64,
        /// Length of the file.
        available: u64,
    },
    /// Not a `.cart` file.
    #[error("not a .cart file: magic bytes are {found:02x?}, expected \"CARTRDG\\0\"")]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// Written by a newer (or unknown) version of the format.
    #[error("unsupported .cart format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this reader implements.
        supported: u32,
    },
    /// The reserved preamble field is not zero.
    #[error("reserved field at offset 12 is {0:#x}, must be 0")]
    ReservedNotZero(u32),
    /// The header length exceeds the cap.
    #[error("header length {len} bytes exceeds the {max}-byte limit")]
    HeaderTooLarge {
        /// Declared length.
        len: u64,
        /// Cap.
        max: u64,
    },
    /// The header bytes do not match their checksum.
    #[error("header checksum mismatch: stored {stored:016x}, computed {computed:016x} (header corrupted)")]
    HeaderChecksum {
        /// Checksum in the preamble.
        stored: u64,
        /// Checksum of the bytes read.
        computed: u64,
    },
    /// The header is not UTF-8.
    #[error("header is not valid UTF-8 (first bad byte at header offset {valid_up_to})")]
    HeaderUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// The header is not the JSON this version expects.
    #[error("header JSON: {0}")]
    HeaderJson(String),
    /// Padding between header and payload holds non-zero bytes.
    #[error("padding byte at offset {offset} is not zero")]
    PaddingNotZero {
        /// File offset of the first bad byte.
        offset: u64,
    },
    /// Bytes after the declared end of the payload.
    #[error(
        "file is {actual} bytes but its header says it ends at {expected}: {extra} trailing bytes"
    )]
    TrailingBytes {
        /// Where the file should end.
        expected: u64,
        /// Actual length.
        actual: u64,
        /// Difference.
        extra: u64,
    },
    /// A dimension is zero, too large, or inconsistent.
    #[error("invalid dimensions: {0}")]
    InvalidDims(String),
    /// A shape's byte size does not fit in 64 bits.
    #[error("tensor {tensor:?}: shape {shape:?} overflows a 64-bit byte count")]
    DimensionOverflow {
        /// Tensor name.
        tensor: String,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// The tensor list is not the one the kind and dims require.
    #[error("tensor #{index}: expected {expected:?}, found {found:?}")]
    UnexpectedTensor {
        /// Position in the list.
        index: usize,
        /// What the spec requires there.
        expected: String,
        /// What the file has.
        found: String,
    },
    /// A tensor's shape disagrees with the header's dims.
    #[error("tensor {tensor:?}: shape {found:?} disagrees with the dims, which give {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        tensor: String,
        /// Shape the dims imply.
        expected: Vec<u64>,
        /// Shape in the file.
        found: Vec<u64>,
    },
    /// A tensor's byte length disagrees with its shape and dtype.
    #[error("tensor {tensor:?}: length {found} bytes, but shape and dtype give {expected}")]
    SizeMismatch {
        /// Tensor name.
        tensor: String,
        /// Bytes implied by shape x dtype.
        expected: u64,
        /// Length in the file.
        found: u64,
    },
    /// A tensor offset is not a multiple of 64.
    #[error("tensor {tensor:?}: offset {offset} is not a multiple of 64")]
    Misaligned {
        /// Tensor name.
        tensor: String,
        /// Its offset in the payload.
        offset: u64,
    },
    /// A tensor starts before the previous one ends (padded to 64).
    #[error("tensor {tensor:?} at payload offset {offset} overlaps {previous:?}, which ends (padded) at {previous_end}")]
    Overlap {
        /// Tensor name.
        tensor: String,
        /// Its offset.
        offset: u64,
        /// The tensor before it.
        previous: String,
        /// Where the previous tensor ends, padded to 64.
        previous_end: u64,
    },
    /// A tensor leaves a hole after the previous one (the spec allows no holes beyond padding).
    #[error(
        "tensor {tensor:?} at payload offset {offset} leaves a gap: it must start at {expected}"
    )]
    Gap {
        /// Tensor name.
        tensor: String,
        /// Its offset.
        offset: u64,
        /// Where it must start.
        expected: u64,
    },
    /// A tensor extends past the payload.
    #[error(
        "tensor {tensor:?} ends at payload offset {end}, past the payload's {payload_len} bytes"
    )]
    OutOfBounds {
        /// Tensor name.
        tensor: String,
        /// End offset.
        end: u64,
        /// Payload length.
        payload_len: u64,
    },
    /// The declared payload length disagrees with the tensors.
    #[error("payload: raw_len is {found}, but the tensors end at {expected}")]
    RawLenMismatch {
        /// Length implied by the tensors.
        expected: u64,
        /// Declared raw length.
        found: u64,
    },
    /// Uncompressed payload whose stored and raw lengths differ.
    #[error("payload: uncompressed but stored_len {stored} != raw_len {raw}")]
    StoredLenMismatch {
        /// Declared stored length.
        stored: u64,
        /// Declared raw length.
        raw: u64,
    },
    /// A layout this version does not know.
    #[error("unsupported position layout: {0}")]
    UnsupportedLayout(String),
    /// Dims disagree with the model fingerprint inside the same header.
    #[error("dims disagree with the model fingerprint: {0}")]
    ModelDimsMismatch(String),
    /// A string, list or nesting exceeds its cap.
    #[error("{what} exceeds the limit of {limit}")]
    LimitExceeded {
        /// What was too big.
        what: String,
        /// The cap.
        limit: u64,
    },
    /// A checksum string is not `xxh3:` + 16 hex digits.
    #[error("{what}: malformed checksum {found:?} (expected \"xxh3:\" + 16 hex digits)")]
    BadChecksumString {
        /// Whose checksum.
        what: String,
        /// The string.
        found: String,
    },
    /// The stored payload does not match its checksum.
    #[error("payload checksum mismatch: stored {stored:016x}, computed {computed:016x} (payload corrupted)")]
    PayloadChecksum {
        /// Declared.
        stored: u64,
        /// Computed.
        computed: u64,
    },
    /// A tensor does not match its checksum.
    #[error("tensor {tensor:?} (payload offset {offset}) checksum mismatch: stored {stored:016x}, computed {computed:016x}")]
    TensorChecksum {
        /// Tensor name.
        tensor: String,
        /// Its payload offset.
        offset: u64,
        /// Declared.
        stored: u64,
        /// Computed.
        computed: u64,
    },
    /// Padding after a tensor holds non-zero bytes (corruption outside every tensor checksum).
    #[error("padding after tensor {tensor:?} at payload offset {offset} is not zero (payload corrupted)")]
    TensorPaddingNotZero {
        /// The tensor the padding follows.
        tensor: String,
        /// Payload offset of the first bad byte.
        offset: u64,
    },
    /// The zstd frame is not valid.
    #[error("compressed payload: {0}")]
    Decompress(String),
    /// The zstd frame decompresses to the wrong size.
    #[error("compressed payload decompresses to {found} bytes, header says {expected}")]
    DecompressedSize {
        /// Declared raw length.
        expected: u64,
        /// Actual (or a lower bound, when it is too long).
        found: u64,
    },
    /// A typed view was requested with the wrong element type.
    #[error("tensor {tensor:?} is {actual}, not {requested}")]
    WrongDType {
        /// Tensor name.
        tensor: String,
        /// Stored dtype.
        actual: &'static str,
        /// Requested dtype.
        requested: &'static str,
    },
    /// No tensor by that name.
    #[error("no tensor named {0:?}")]
    NoSuchTensor(String),
    /// The writer was given data that does not fit the dims.
    #[error("cannot write: {0}")]
    InvalidInput(String),
    /// The cartridge was made for another model.
    #[error("model mismatch ({fields}): cartridge is for [{cartridge}], model is [{model}]")]
    ModelMismatch {
        /// Names of the differing fingerprint fields.
        fields: String,
        /// The cartridge's fingerprint, short form.
        cartridge: String,
        /// The model's fingerprint, short form.
        model: String,
    },
    /// Parts of a composition that cannot be concatenated (SPEC.md §6).
    #[error("cannot compose {other} with {first}: {reason}")]
    CompositionMismatch {
        /// The part the others are checked against.
        first: String,
        /// The part that does not fit.
        other: String,
        /// Why.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A format error, located in a file.
    #[error("{path}: {source}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: Box<CartError>,
    },
}
