//! `cartridge inspect`: summaries, --json, --verify, and one clear line (exit 2) for bad files.

mod common;

use std::path::Path;

use cartridge_formats::cart::{self, CartContents, Compression, DType, Dims, KvDims, Provenance};
use cartridge_formats::fingerprint::sha256_hex;
use cartridge_formats::ModelFingerprint;

use common::cartridge;

fn write_sample(path: &Path, compression: Compression) {
    let model = ModelFingerprint {
        architecture: "llama".into(),
        num_layers: 2,
        hidden_size: 16,
        num_attention_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        vocab_size: 100,
        rope_theta: 1e4,
        rope_scaling: None,
        tokenizer_hash: sha256_hex(b"t"),
        weights_hash: sha256_hex(b"w"),
    };
    let values: Vec<f32> = (0..2 * 8 * 4).map(|i| i as f32).collect();
    let bytes: &[u8] = bytemuck::cast_slice(&values);
    let provenance = Provenance {
        created: "2026-11-29T00:00:00Z".into(),
        corpus_digest: Some(sha256_hex(b"corpus")),
        ..Provenance::default()
    };
    cart::write_file(
        path,
        &CartContents {
            dims: Dims::Kv(KvDims {
                layers: 2,
                kv_heads: 2,
                head_dim: 4,
                tokens: 8,
                frozen_tokens: 1,
                biased: false,
            }),
            dtype: DType::F32,
            model,
            provenance,
            summary: None,
            tensors: vec![bytes; 4],
        },
        compression,
    )
    .expect("write sample");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn good_file_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.cart");
    let z = dir.path().join("z.cart");
    write_sample(&a, Compression::None);
    write_sample(&z, Compression::Zstd);
    let out = cartridge(&[
        "inspect",
        "--verify",
        a.to_str().unwrap(),
        z.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("KV cartridge"), "{stdout}");
    assert!(
        stdout.contains("2 layers x 2 KV heads x 4 head dim, 8 tokens (1 frozen)"),
        "{stdout}"
    );
    assert!(stdout.contains("zstd"), "{stdout}");
    assert!(stdout.contains("4 tensor checksums OK"), "{stdout}");

    let out = cartridge(&["inspect", "--json", z.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v[0]["ok"], true);
    assert_eq!(v[0]["kind"], "kv");
    assert_eq!(v[0]["compression"], "zstd");
    assert_eq!(v[0]["memory_bytes"], 4 * 2 * 8 * 4 * 4);
    assert!(v[0]["file_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v[0]["model"]["num_layers"], 2);
}

#[test]
fn bad_files_exit_2_with_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.cart");
    write_sample(&good, Compression::None);
    let bytes = std::fs::read(&good).unwrap();

    let empty = dir.path().join("empty.cart");
    std::fs::write(&empty, b"").unwrap();
    let flipped = dir.path().join("flipped.cart");
    let mut b = bytes.clone();
    let last = b.len() - 1;
    b[last] ^= 4;
    std::fs::write(&flipped, &b).unwrap();
    let foreign = dir.path().join("foreign.cart");
    std::fs::write(&foreign, b"GGUF\x03\0\0\0 not a cartridge").unwrap();
    let missing = dir.path().join("missing.cart");

    let cases = [
        (&empty, "truncated magic"),
        (&foreign, "not a .cart file"),
        (&missing, "No such file"),
    ];
    for (path, want) in cases {
        let out = cartridge(&["inspect", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", path.display());
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(want) && err.contains(path.to_str().unwrap()),
            "{err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{err}"
        );
    }

    // A flipped payload bit opens fine (no payload read) and is caught by --verify.
    let out = cartridge(&["inspect", flipped.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let out = cartridge(&["inspect", "--verify", flipped.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("checksum mismatch"), "{err}");

    // Mixed good and bad: the good one is reported, the exit says something failed.
    let out = cartridge(&[
        "inspect",
        "--json",
        good.to_str().unwrap(),
        empty.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["ok"], true);
    assert_eq!(v[1]["ok"], false);
    assert!(v[1]["error"].as_str().unwrap().contains("truncated"));
}

#[test]
fn usage_error_is_not_a_panic() {
    let out = cartridge(&["inspect"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("Usage"));
}
