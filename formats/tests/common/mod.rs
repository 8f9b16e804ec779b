//! Sample cartridges and byte surgery shared by the format tests.
#![allow(dead_code)]

use cartridge_formats::cart::{
    self, CartContents, Compression, DType, Dims, KvDims, Provenance, SoftPromptDims,
};
use cartridge_formats::fingerprint::sha256_hex;
use cartridge_formats::ModelFingerprint;

pub fn model(layers: u32, kv_heads: u32, head_dim: u32, hidden: u32) -> ModelFingerprint {
    ModelFingerprint {
        architecture: "llama".into(),
        num_layers: layers,
        hidden_size: hidden,
        num_attention_heads: kv_heads * 3,
        num_kv_heads: kv_heads,
        head_dim,
        vocab_size: 49152,
        rope_theta: 100000.0,
        rope_scaling: None,
        tokenizer_hash: sha256_hex(b"tokenizer"),
        weights_hash: sha256_hex(b"weights"),
    }
}

pub fn provenance() -> Provenance {
    let mut p = Provenance {
        created: "2026-11-29T00:00:00Z".into(),
        corpus_digest: Some(sha256_hex(b"corpus")),
        ..Provenance::default()
    };
    p.training = serde_json::json!({"lr": 0.02, "steps": 10});
    p.metadata.insert("name".into(), "test".into());
    p
}

/// Values of a sample KV cartridge: 3 layers, 2 heads, 5 tokens, head_dim 4 (tensors not multiples of 64).
pub fn kv_values() -> (KvDims, Vec<Vec<f32>>) {
    let dims = KvDims {
        layers: 3,
        kv_heads: 2,
        head_dim: 4,
        tokens: 5,
        frozen_tokens: 1,
        biased: false,
    };
    let n = 2 * 5 * 4;
    let tensors = (0..6)
        .map(|t| (0..n).map(|i| (t * 1000 + i) as f32 * 0.25 - 3.0).collect())
        .collect();
    (dims, tensors)
}

pub fn kv_bytes(compression: Compression) -> Vec<u8> {
    let (dims, tensors) = kv_values();
    let m = model(3, 2, 4, 24);
    cart::encode(
        &CartContents {
            dims: Dims::Kv(dims),
            dtype: DType::F32,
            model: m,
            provenance: provenance(),
            summary: None,
            tensors: tensors.iter().map(|t| bytemuck::cast_slice(t)).collect(),
        },
        compression,
    )
    .expect("encode sample")
}

pub fn soft_prompt_bytes() -> Vec<u8> {
    let values: Vec<f32> = (0..3 * 24).map(|i| i as f32).collect();
    cart::encode(
        &CartContents {
            dims: Dims::SoftPrompt(SoftPromptDims {
                hidden: 24,
                tokens: 3,
            }),
            dtype: DType::F32,
            model: model(3, 2, 4, 24),
            provenance: provenance(),
            summary: Some("A corpus about ships.".into()),
            tensors: vec![bytemuck::cast_slice(&values)],
        },
        Compression::None,
    )
    .expect("encode soft prompt")
}

/// Offsets of the sections of an encoded file: (header_end, payload_offset).
pub fn sections(bytes: &[u8]) -> (usize, usize) {
    let h = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let end = 32 + h;
    (end, end.div_ceil(64) * 64)
}

/// Rewrite the header JSON with `edit`, keeping the payload bytes and fixing the header checksum.
pub fn with_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let (header_end, payload_offset) = sections(bytes);
    let mut json: serde_json::Value = serde_json::from_slice(&bytes[32..header_end]).unwrap();
    edit(&mut json);
    let text = serde_json::to_vec(&json).unwrap();
    with_raw_header(&text, &bytes[payload_offset..])
}

/// A file with these exact header bytes (checksum fixed) and this payload.
pub fn with_raw_header(header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"CARTRDG\0");
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(header).to_le_bytes());
    out.extend_from_slice(header);
    out.resize(out.len().div_ceil(64) * 64, 0);
    out.extend_from_slice(payload);
    out
}
