//! The fuzz target's property on mutated valid files, inside the normal test suite: parsing,
//! verifying and decompressing never panic, and an accepted file's tensors are in bounds.

mod common;

use cartridge_formats::cart::{self, Compression};
use proptest::prelude::*;

fn check(bytes: &[u8]) {
    if let Ok(view) = cart::parse(bytes) {
        let _ = view.verify();
        if let Ok(raw) = view.decompress() {
            for t in &view.header.tensors {
                let b = cart::parse::tensor_bytes(t, raw.as_slice()).expect("in bounds");
                assert_eq!(b.len() as u64, t.len);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn mutated_files_never_panic(
        compressed in any::<bool>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = common::kv_bytes(if compressed { Compression::Zstd } else { Compression::None });
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Some(c) = cut {
            let n = c.index(bytes.len());
            bytes.truncate(n);
        }
        check(&bytes);
    }

    /// Edits inside the header with its checksum fixed up, so the JSON and layout rules are exercised.
    #[test]
    fn mutated_headers_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let bytes = common::kv_bytes(Compression::None);
        let (header_end, payload_offset) = common::sections(&bytes);
        let mut header = bytes[32..header_end].to_vec();
        for (at, value) in edits {
            let i = at.index(header.len());
            // Mostly digits, so numbers change and the JSON stays parseable.
            header[i] = if value < 200 { b'0' + value % 10 } else { value };
        }
        check(&common::with_raw_header(&header, &bytes[payload_offset..]));
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes);
        let mut with_magic = b"CARTRDG\0\x01\0\0\0".to_vec();
        with_magic.extend_from_slice(&bytes);
        check(&with_magic);
    }
}
