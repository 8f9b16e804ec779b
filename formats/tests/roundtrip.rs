//! Write -> read gives identical tensors and metadata; writing is deterministic and atomic.

mod common;

use cartridge_formats::cart::{
    self, CartContents, CartFile, Compression, DType, Dims, KvDims, Provenance, SoftPromptDims,
};
use common::*;
use proptest::prelude::*;

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::Bf16)]
}

fn dims_strategy() -> impl Strategy<Value = Dims> {
    prop_oneof![
        (1u32..4, 1u32..4, 1u32..9, 1u32..12).prop_flat_map(|(l, h, d, p)| (0..=p).prop_map(
            move |f| Dims::Kv(KvDims {
                layers: l,
                kv_heads: h,
                head_dim: d * 2,
                tokens: p,
                frozen_tokens: f,
                biased: false,
            })
        )),
        (1u32..40, 1u32..12)
            .prop_map(|(hidden, tokens)| Dims::SoftPrompt(SoftPromptDims { hidden, tokens })),
    ]
}

fn model_for(dims: &Dims) -> cartridge_formats::ModelFingerprint {
    match dims {
        Dims::Kv(d) => model(d.layers, d.kv_heads, d.head_dim, 64),
        Dims::SoftPrompt(d) => model(2, 1, 4, d.hidden),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn write_read_identical(
        dims in dims_strategy(),
        dtype in dtype_strategy(),
        seed in any::<u64>(),
        compress in any::<bool>(),
        meta in proptest::collection::btree_map("[a-z]{1,8}", "\\PC{0,20}", 0..4),
        summary in proptest::option::of("\\PC{0,40}"),
    ) {
        let expected = dims.expected_tensors();
        let mut state = seed | 1;
        let tensors: Vec<Vec<u8>> = expected
            .iter()
            .map(|(_, shape)| {
                let n = shape.iter().product::<u64>() * dtype.size();
                (0..n).map(|_| { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state as u8 }).collect()
            })
            .collect();
        let mut provenance = provenance();
        provenance.metadata = meta;
        let summary = if matches!(dims, Dims::SoftPrompt(_)) { summary } else { None };
        let contents = CartContents {
            dims, dtype, model: model_for(&dims), provenance, summary,
            tensors: tensors.iter().map(|t| t.as_slice()).collect(),
        };
        let compression = if compress { Compression::Zstd } else { Compression::None };
        let bytes = cart::encode(&contents, compression).unwrap();
        prop_assert_eq!(&bytes, &cart::encode(&contents, compression).unwrap(), "not deterministic");

        let view = cart::parse(&bytes).unwrap();
        view.verify().unwrap();
        let h = &view.header;
        prop_assert_eq!(h.dims, contents.dims);
        prop_assert_eq!(h.dtype, dtype);
        prop_assert_eq!(&h.model, &contents.model);
        prop_assert_eq!(&h.provenance, &contents.provenance);
        prop_assert_eq!(&h.summary, &contents.summary);
        let raw = view.decompress().unwrap();
        for (i, t) in tensors.iter().enumerate() {
            let entry = &h.tensors[i];
            prop_assert_eq!(&entry.name, &expected[i].0);
            prop_assert_eq!(&entry.shape, &expected[i].1);
            prop_assert_eq!(cart::parse::tensor_bytes(entry, raw.as_slice()).unwrap(), t.as_slice());
        }
    }
}

#[test]
fn file_open_is_zero_copy_and_typed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.cart");
    let (dims, values) = kv_values();
    let contents = CartContents {
        dims: Dims::Kv(dims),
        dtype: DType::F32,
        model: model(3, 2, 4, 24),
        provenance: provenance(),
        summary: None,
        tensors: values.iter().map(|t| bytemuck::cast_slice(t)).collect(),
    };
    cart::write_file(&path, &contents, Compression::None).unwrap();
    let file = CartFile::open(&path).unwrap();
    assert!(file.is_zero_copy());
    file.verify().unwrap();
    for (i, want) in values.iter().enumerate() {
        let view = file.tensor(i).unwrap();
        let got = view.as_f32().unwrap();
        assert_eq!(got, want.as_slice());
        assert_eq!(
            got.as_ptr() as usize % 64,
            0,
            "tensor {i} not 64-byte aligned"
        );
        // The slice points into the map: within the file's mapped range.
        assert!(view.as_f16().is_err());
    }
    assert_eq!(
        file.tensor_by_name("values.2").unwrap().to_f32_vec(),
        values[5]
    );

    // Overwriting the path while mapped replaces the file; the old map stays valid.
    let zst = dir.path().join("b.cart");
    cart::write_file(&zst, &contents, Compression::Zstd).unwrap();
    let zfile = CartFile::open(&zst).unwrap();
    assert!(!zfile.is_zero_copy());
    zfile.verify().unwrap();
    assert_eq!(
        zfile.tensor(3).unwrap().as_f32().unwrap(),
        values[3].as_slice()
    );
    cart::write_file(&path, &contents, Compression::Zstd).unwrap();
    assert_eq!(
        file.tensor(0).unwrap().as_f32().unwrap(),
        values[0].as_slice()
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left behind");
}

#[test]
fn model_mismatch_names_both_fingerprints() {
    let bytes = kv_bytes(Compression::None);
    let view = cart::parse(&bytes).unwrap();
    let mut other = view.header.model.clone();
    other.weights_hash = cartridge_formats::fingerprint::sha256_hex(b"other weights");
    cart::check_model(&view.header.model, &view.header.model).unwrap();
    let e = cart::check_model(&view.header.model, &other).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("weights_hash"), "{msg}");
    assert!(
        msg.contains("cartridge is for [") && msg.contains("model is ["),
        "{msg}"
    );
}

#[test]
fn recompress_keeps_contents() {
    let plain = kv_bytes(Compression::None);
    let z = cart::recompress(&plain, Compression::Zstd).unwrap();
    assert_eq!(z, kv_bytes(Compression::Zstd));
    assert_eq!(cart::recompress(&z, Compression::None).unwrap(), plain);
}

#[test]
fn writer_rejects_data_that_does_not_fit() {
    let (dims, values) = kv_values();
    let mut tensors: Vec<&[u8]> = values.iter().map(|t| bytemuck::cast_slice(t)).collect();
    tensors.pop();
    let contents = CartContents {
        dims: Dims::Kv(dims),
        dtype: DType::F32,
        model: model(3, 2, 4, 24),
        provenance: Provenance::default(),
        summary: None,
        tensors,
    };
    assert!(cart::encode(&contents, Compression::None).is_err());
}
