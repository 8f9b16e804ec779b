//! Every kind of bad `.cart` input gets its own clear error (issue #2, "Bad input").

mod common;

use cartridge_formats::cart::{self, CartError, Compression};
use common::*;
use serde_json::json;

fn err(bytes: &[u8]) -> CartError {
    match cart::parse(bytes) {
        Ok(_) => panic!("parse accepted bad input"),
        Err(e) => e,
    }
}

#[test]
fn good_files_parse_and_verify() {
    for bytes in [
        kv_bytes(Compression::None),
        kv_bytes(Compression::Zstd),
        soft_prompt_bytes(),
    ] {
        let view = cart::parse(&bytes).expect("parse");
        view.verify().expect("verify");
    }
}

#[test]
fn empty_file() {
    assert!(matches!(
        err(&[]),
        CartError::Truncated {
            section: "magic",
            needed: 8,
            available: 0
        }
    ));
}

#[test]
fn truncated_at_every_section_boundary() {
    let bytes = kv_bytes(Compression::None);
    let (header_end, payload_offset) = sections(&bytes);
    let cases: &[(usize, &str)] = &[
        (0, "magic"),
        (7, "magic"),
        (8, "preamble (version)"),
        (12, "preamble (reserved)"),
        (16, "preamble (header length)"),
        (24, "preamble (header checksum)"),
        (32, "header"),
        (header_end - 1, "header"),
        (header_end, "padding"),
        (payload_offset - 1, "padding"),
        (payload_offset, "payload"),
        (payload_offset + 64, "payload"),
        (bytes.len() - 1, "payload"),
    ];
    assert!(header_end < payload_offset, "sample must have padding");
    for &(cut, want) in cases {
        match err(&bytes[..cut]) {
            CartError::Truncated {
                section, available, ..
            } => {
                assert_eq!(section, want, "cut at {cut}");
                assert_eq!(available, cut as u64);
            }
            other => panic!("cut at {cut}: expected truncation in {want}, got {other}"),
        }
    }
    // And every single length short of the full file is refused.
    for cut in 0..bytes.len() {
        assert!(
            cart::parse(&bytes[..cut]).is_err(),
            "accepted a file cut at {cut}"
        );
    }
}

#[test]
fn wrong_magic() {
    let mut bytes = kv_bytes(Compression::None);
    bytes[..8].copy_from_slice(b"GGUF\x03\0\0\0");
    assert!(matches!(err(&bytes), CartError::BadMagic { .. }));
    let msg = err(&bytes).to_string();
    assert!(msg.contains("not a .cart file"), "{msg}");
}

#[test]
fn future_version() {
    let mut bytes = kv_bytes(Compression::None);
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    match err(&bytes) {
        e @ CartError::UnsupportedVersion {
            found: 2,
            supported: 1,
        } => {
            assert!(e.to_string().contains("version 2"))
        }
        other => panic!("{other}"),
    }
}

#[test]
fn reserved_field_not_zero() {
    let mut bytes = kv_bytes(Compression::None);
    bytes[12] = 1;
    assert!(matches!(err(&bytes), CartError::ReservedNotZero(1)));
}

#[test]
fn header_length_over_cap() {
    let mut bytes = kv_bytes(Compression::None);
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(err(&bytes), CartError::HeaderTooLarge { .. }));
}

#[test]
fn flipped_bit_in_header() {
    let bytes = kv_bytes(Compression::None);
    let (header_end, _) = sections(&bytes);
    for pos in (32..header_end).step_by(7) {
        let mut b = bytes.clone();
        b[pos] ^= 0x10;
        assert!(
            matches!(err(&b), CartError::HeaderChecksum { .. }),
            "flip at {pos}"
        );
    }
}

#[test]
fn invalid_utf8_header() {
    let bytes = kv_bytes(Compression::None);
    let (_, payload_offset) = sections(&bytes);
    let bad = with_raw_header(b"{\"kind\":\"\xff\xfe\"}", &bytes[payload_offset..]);
    assert!(matches!(
        err(&bad),
        CartError::HeaderUtf8 { valid_up_to: 9 }
    ));
}

#[test]
fn invalid_json_header() {
    let bytes = kv_bytes(Compression::None);
    let (_, payload_offset) = sections(&bytes);
    let bad = with_raw_header(b"{\"kind\": kv", &bytes[payload_offset..]);
    assert!(matches!(err(&bad), CartError::HeaderJson(_)));
    let unknown = with_header(&bytes, |h| h["surprise"] = json!(1));
    match err(&unknown) {
        CartError::HeaderJson(m) => assert!(m.contains("surprise"), "{m}"),
        other => panic!("{other}"),
    }
    let missing = with_header(&bytes, |h| {
        h.as_object_mut().unwrap().remove("model");
    });
    assert!(matches!(err(&missing), CartError::HeaderJson(_)));
}

#[test]
fn offsets_past_the_end() {
    let bytes = kv_bytes(Compression::None);
    let bad = with_header(&bytes, |h| h["tensors"][5]["offset"] = json!(1 << 20));
    assert!(
        matches!(err(&bad), CartError::OutOfBounds { ref tensor, .. } if tensor == "values.2"),
        "{}",
        err(&bad)
    );
    // stored_len pointing past the end of the file.
    let bad = with_header(&bytes, |h| {
        let n = h["payload"]["raw_len"].as_u64().unwrap() + 64;
        h["payload"]["raw_len"] = json!(n);
        h["payload"]["stored_len"] = json!(n);
    });
    // raw_len no longer matches the tensors: caught before any payload access.
    assert!(matches!(err(&bad), CartError::RawLenMismatch { .. }));
}

#[test]
fn overlapping_tensors() {
    let bytes = kv_bytes(Compression::None);
    let bad = with_header(&bytes, |h| h["tensors"][1]["offset"] = json!(0));
    assert!(
        matches!(err(&bad), CartError::Overlap { ref tensor, ref previous, .. } if tensor == "values.0" && previous == "keys.0"),
        "{}",
        err(&bad)
    );
}

#[test]
fn gap_and_misalignment() {
    let bytes = kv_bytes(Compression::None);
    let bad = with_header(&bytes, |h| h["tensors"][1]["offset"] = json!(256));
    assert!(matches!(err(&bad), CartError::Gap { .. }), "{}", err(&bad));
    let bad = with_header(&bytes, |h| h["tensors"][1]["offset"] = json!(160));
    assert!(
        matches!(err(&bad), CartError::Misaligned { .. }),
        "{}",
        err(&bad)
    );
}

#[test]
fn dimensions_whose_product_overflows() {
    let bytes = kv_bytes(Compression::None);
    let big = 1u64 << 24;
    let bad = with_header(&bytes, |h| {
        h["dims"]["kv_heads"] = json!(big);
        h["dims"]["tokens"] = json!(big);
        h["dims"]["head_dim"] = json!(big);
        h["model"]["num_kv_heads"] = json!(big);
        h["model"]["head_dim"] = json!(big);
        for t in h["tensors"].as_array_mut().unwrap() {
            t["shape"] = json!([big, big, big]);
        }
    });
    assert!(
        matches!(err(&bad), CartError::DimensionOverflow { .. }),
        "{}",
        err(&bad)
    );
    let zero = with_header(&bytes, |h| h["dims"]["tokens"] = json!(0));
    assert!(matches!(err(&zero), CartError::InvalidDims(_)));
    let frozen = with_header(&bytes, |h| h["dims"]["frozen_tokens"] = json!(6));
    assert!(matches!(err(&frozen), CartError::InvalidDims(_)));
}

#[test]
fn payload_size_disagrees_with_dims() {
    let bytes = kv_bytes(Compression::None);
    let bad = with_header(&bytes, |h| h["tensors"][0]["len"] = json!(16));
    assert!(matches!(
        err(&bad),
        CartError::SizeMismatch {
            expected: 160,
            found: 16,
            ..
        }
    ));
    let bad = with_header(&bytes, |h| h["tensors"][0]["shape"] = json!([2, 4, 5]));
    assert!(matches!(err(&bad), CartError::ShapeMismatch { .. }));
    let bad = with_header(&bytes, |h| h["dims"]["tokens"] = json!(4));
    assert!(matches!(err(&bad), CartError::ShapeMismatch { .. }));
    let bad = with_header(&bytes, |h| {
        h["tensors"].as_array_mut().unwrap().pop();
    });
    assert!(matches!(
        err(&bad),
        CartError::UnexpectedTensor { index: 5, .. }
    ));
    let bad = with_header(&bytes, |h| h["tensors"][2]["name"] = json!("keys.9"));
    assert!(matches!(
        err(&bad),
        CartError::UnexpectedTensor { index: 2, .. }
    ));
}

#[test]
fn dims_disagree_with_model_fingerprint() {
    let bytes = kv_bytes(Compression::None);
    let bad = with_header(&bytes, |h| h["model"]["num_layers"] = json!(30));
    assert!(matches!(err(&bad), CartError::ModelDimsMismatch(_)));
}

#[test]
fn unsupported_position_layout_and_summary_on_kv() {
    let bytes = kv_bytes(Compression::None);
    let bad = with_header(&bytes, |h| {
        h["positions"]["rope_layout"] = json!("interleaved")
    });
    assert!(matches!(err(&bad), CartError::UnsupportedLayout(_)));
    let bad = with_header(&bytes, |h| h["summary"] = json!("text"));
    assert!(matches!(err(&bad), CartError::HeaderJson(_)));
}

#[test]
fn limits_on_strings_and_metadata() {
    let bytes = kv_bytes(Compression::None);
    let bad = with_header(&bytes, |h| {
        h["provenance"]["tool"] = json!("x".repeat(70_000))
    });
    assert!(matches!(err(&bad), CartError::LimitExceeded { .. }));
    let bad = with_header(&bytes, |h| {
        let mut v = json!(1);
        for _ in 0..20 {
            v = json!([v]);
        }
        h["provenance"]["training"] = json!({ "deep": v });
    });
    assert!(matches!(err(&bad), CartError::LimitExceeded { .. }));
    let bad = with_header(&bytes, |h| h["tensors"][0]["checksum"] = json!("crc:1"));
    assert!(matches!(err(&bad), CartError::BadChecksumString { .. }));
}

#[test]
fn padding_and_trailing_bytes() {
    let bytes = kv_bytes(Compression::None);
    let (header_end, _) = sections(&bytes);
    let mut b = bytes.clone();
    b[header_end] = 1;
    assert!(matches!(err(&b), CartError::PaddingNotZero { offset } if offset == header_end as u64));
    let mut b = bytes.clone();
    b.extend_from_slice(&[0; 3]);
    assert!(matches!(err(&b), CartError::TrailingBytes { extra: 3, .. }));
}

#[test]
fn flipped_bit_anywhere_in_payload_is_caught_by_verify() {
    for compression in [Compression::None, Compression::Zstd] {
        let bytes = kv_bytes(compression);
        let (_, payload_offset) = sections(&bytes);
        for pos in payload_offset..bytes.len() {
            let mut b = bytes.clone();
            b[pos] ^= 1 << (pos % 8);
            // Opening is cheap and does not read the payload; verify must catch the flip.
            let view = cart::parse(&b).expect("open reads no payload byte");
            let e = view.verify().expect_err("verify missed a flipped bit");
            let ok = match compression {
                Compression::Zstd => matches!(e, CartError::PayloadChecksum { .. }),
                Compression::None => matches!(
                    e,
                    CartError::TensorChecksum { .. } | CartError::TensorPaddingNotZero { .. }
                ),
            };
            assert!(ok, "{compression:?} flip at {pos}: {e}");
        }
    }
}

#[test]
fn tensor_checksum_names_the_tensor() {
    let bytes = kv_bytes(Compression::None);
    let (_, payload_offset) = sections(&bytes);
    let mut b = bytes.clone();
    b[payload_offset + 64 * 3 + 4] ^= 0x80; // inside values.0 (tensors are 160 bytes, padded to 192)
    let e = cart::parse(&b).unwrap().verify().unwrap_err();
    assert!(
        matches!(e, CartError::TensorChecksum { ref tensor, offset: 192, .. } if tensor == "values.0"),
        "{e}"
    );
    let mut b = bytes.clone();
    b[payload_offset + 170] = 1; // padding after keys.0
    let e = cart::parse(&b).unwrap().verify().unwrap_err();
    assert!(
        matches!(e, CartError::TensorPaddingNotZero { ref tensor, offset: 170 } if tensor == "keys.0"),
        "{e}"
    );
}

#[test]
fn payload_checksum_presence_follows_compression() {
    let plain = kv_bytes(Compression::None);
    let bad = with_header(&plain, |h| {
        h["payload"]["checksum"] = json!("xxh3:0000000000000000")
    });
    assert!(matches!(err(&bad), CartError::HeaderJson(_)));
    let z = kv_bytes(Compression::Zstd);
    let bad = with_header(&z, |h| h["payload"]["checksum"] = json!(null));
    assert!(matches!(err(&bad), CartError::HeaderJson(_)));
}

#[test]
fn compressed_payload_of_wrong_size() {
    let bytes = kv_bytes(Compression::Zstd);
    let view = cart::parse(&bytes).unwrap();
    let raw = view.decompress().unwrap();
    for delta in [-64i64, 64] {
        let mut other = raw.as_slice().to_vec();
        other.resize((other.len() as i64 + delta) as usize, 0);
        let frame = zstd::bulk::compress(&other, 3).unwrap();
        let mut header: serde_json::Value =
            serde_json::from_slice(&bytes[32..sections(&bytes).0]).unwrap();
        header["payload"]["stored_len"] = json!(frame.len());
        header["payload"]["checksum"] =
            json!(format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(&frame)));
        let b = with_raw_header(&serde_json::to_vec(&header).unwrap(), &frame);
        let e = cart::parse(&b).unwrap().decompress().unwrap_err();
        assert!(
            matches!(e, CartError::DecompressedSize { .. }),
            "delta {delta}: {e}"
        );
    }
    // Not a zstd frame at all.
    let garbage = vec![7u8; 100];
    let mut header: serde_json::Value =
        serde_json::from_slice(&bytes[32..sections(&bytes).0]).unwrap();
    header["payload"]["stored_len"] = json!(100);
    header["payload"]["checksum"] = json!(format!(
        "xxh3:{:016x}",
        xxhash_rust::xxh3::xxh3_64(&garbage)
    ));
    let b = with_raw_header(&serde_json::to_vec(&header).unwrap(), &garbage);
    assert!(matches!(
        cart::parse(&b).unwrap().decompress().unwrap_err(),
        CartError::Decompress(_)
    ));
}

#[test]
fn uncompressed_stored_len_must_equal_raw_len() {
    let bytes = kv_bytes(Compression::None);
    let bad = with_header(&bytes, |h| h["payload"]["stored_len"] = json!(64));
    assert!(matches!(err(&bad), CartError::StoredLenMismatch { .. }));
}
