//! The torch-cartridge importer on hand-made `torch.save` archives: a tiny pickle writer builds
//! the same opcodes torch emits, then bends them (storage keys that escape the archive, views past
//! their storage, short argument tuples, unknown opcodes, missing storages). Every one must give an
//! error, never a panic or an out-of-bounds read; the well-formed one must import exactly.

use std::io::Write;
use std::path::Path;

use cartridge_formats::cart::{DType, Dims, KvDims};
use cartridge_formats::ModelFingerprint;
use cartridge_runtime::interchange::torch_pickle;

/// One layer, one KV head of width 2: tensors are `[1, 1, n, 2]`.
fn model() -> ModelFingerprint {
    ModelFingerprint {
        architecture: "llama".into(),
        num_layers: 1,
        hidden_size: 4,
        num_attention_heads: 2,
        num_kv_heads: 1,
        head_dim: 2,
        vocab_size: 8,
        rope_theta: 1e4,
        rope_scaling: None,
        tokenizer_hash: "sha256:aa".into(),
        weights_hash: "sha256:bb".into(),
    }
}

/// Pickle protocol-2 opcodes, as `torch.save` writes them.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn start() -> Self {
        Pickle(vec![0x80, 2])
    }
    fn op(&mut self, code: u8) -> &mut Self {
        self.0.push(code);
        self
    }
    fn text(&mut self, s: &str) -> &mut Self {
        self.op(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b'c');
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn int(&mut self, v: i32) -> &mut Self {
        self.op(b'J');
        self.0.extend(v.to_le_bytes());
        self
    }
    fn ints(&mut self, vs: &[i32]) -> &mut Self {
        self.op(b'(');
        for &v in vs {
            self.int(v);
        }
        self.op(b't')
    }
}

/// How one tensor is described.
#[derive(Clone)]
struct Spec {
    key: &'static str,
    class: &'static str,
    numel: i32,
    offset: i32,
    size: Vec<i32>,
    stride: Vec<i32>,
}

fn spec(key: &'static str, numel: i32, offset: i32, tokens: i32) -> Spec {
    Spec {
        key,
        class: "FloatStorage",
        numel,
        offset,
        size: vec![1, 1, tokens, 2],
        stride: vec![2 * tokens, 2 * tokens, 2, 1],
    }
}

/// `_rebuild_tensor_v2(("storage", torch.<class>, key, "cpu", numel), offset, size, stride, False, {})`.
fn tensor(p: &mut Pickle, s: &Spec) {
    p.global("torch._utils", "_rebuild_tensor_v2").op(b'(');
    p.op(b'(')
        .text("storage")
        .global("torch", s.class)
        .text(s.key)
        .text("cpu")
        .int(s.numel)
        .op(b't')
        .op(b'Q');
    p.int(s.offset).ints(&s.size).ints(&s.stride);
    p.op(0x89).op(b'}').op(b't').op(b'R');
}

/// `{name: [tensor], ...}` for the four lists, in the reference trainer's order.
fn cartridge_pickle(parts: &[(&str, Option<Spec>)]) -> Vec<u8> {
    let mut p = Pickle::start();
    p.op(b'}').op(b'(');
    for (name, t) in parts {
        p.text(name).op(b']');
        if let Some(t) = t {
            p.op(b'(');
            tensor(&mut p, t);
            p.op(b'e');
        }
    }
    p.op(b'u').op(b'.');
    p.0
}

/// A stored-entry zip like `torch.save`'s: `c/data.pkl` and `c/data/<key>` for each storage.
fn write_archive(path: &Path, pickle: &[u8], storages: &[(&str, Vec<f32>)]) {
    let file = std::fs::File::create(path).expect("create");
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("c/data.pkl", opts).expect("start");
    zip.write_all(pickle).expect("pickle");
    for (key, values) in storages {
        zip.start_file(format!("c/data/{key}"), opts)
            .expect("start");
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        zip.write_all(&bytes).expect("storage");
    }
    zip.finish().expect("finish");
}

/// Storage "0" holds 0..6: frozen token at elements 0..2, two trainable tokens at 2..6.
fn storage() -> Vec<(&'static str, Vec<f32>)> {
    vec![("0", (0..6).map(|i| i as f32).collect())]
}

fn parts(keys: Spec) -> Vec<(&'static str, Option<Spec>)> {
    vec![
        ("trainable_keys", Some(keys)),
        ("trainable_values", Some(spec("0", 6, 2, 2))),
        ("fixed_keys", Some(spec("0", 6, 0, 1))),
        ("fixed_values", Some(spec("0", 6, 0, 1))),
    ]
}

fn import_error(dir: &Path, pickle: &[u8], storages: &[(&str, Vec<f32>)]) -> String {
    let path = dir.join("c.pt");
    write_archive(&path, pickle, storages);
    match torch_pickle::import(&path, &model()) {
        Ok(p) => panic!("imported a bad archive: {:?}", p.dims),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_well_formed_hand_made_archive_imports_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.pt");
    write_archive(
        &path,
        &cartridge_pickle(&parts(spec("0", 6, 2, 2))),
        &storage(),
    );
    let imported = torch_pickle::import(&path, &model()).expect("import");
    assert_eq!(
        imported.dims,
        Dims::Kv(KvDims {
            layers: 1,
            kv_heads: 1,
            head_dim: 2,
            tokens: 3,
            frozen_tokens: 1,
            biased: false,
        })
    );
    assert_eq!(imported.dtype, DType::F32);
    let values: Vec<f32> = (0..6).map(|i| i as f32).collect();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(imported.tensors, vec![bytes.clone(), bytes]);
}

#[test]
fn crafted_archives_give_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let bad = |keys: Spec| cartridge_pickle(&parts(keys));

    let escape = Spec {
        key: "../0",
        ..spec("0", 6, 2, 2)
    };
    assert!(import_error(d, &bad(escape), &storage()).contains("not a plain name"));

    let past_end = spec("0", 6, 4, 2);
    assert!(import_error(d, &bad(past_end), &storage()).contains("reaches element 7"));

    let claims_more = spec("0", 600, 2, 2);
    assert!(import_error(d, &bad(claims_more), &storage()).contains("600 elements"));

    let longs = Spec {
        class: "LongStorage",
        ..spec("0", 6, 2, 2)
    };
    assert!(import_error(d, &bad(longs), &storage()).contains("LongStorage"));

    let negative = Spec {
        stride: vec![4, 4, -2, 1],
        ..spec("0", 6, 2, 2)
    };
    assert!(import_error(d, &bad(negative), &storage()).contains("malformed"));

    let missing_storage = spec("7", 6, 2, 2);
    assert!(import_error(d, &bad(missing_storage), &storage()).contains("storage data/7"));

    let rank3 = Spec {
        size: vec![1, 2, 2],
        stride: vec![4, 2, 1],
        ..spec("0", 6, 2, 2)
    };
    assert!(import_error(d, &bad(rank3), &storage()).contains("[1, kv_heads, tokens, head_dim]"));

    // A tensor call with only the storage argument.
    let mut short = Pickle::start();
    short.op(b'}').text("trainable_keys").op(b']').op(b'(');
    short
        .global("torch._utils", "_rebuild_tensor_v2")
        .op(b'(')
        .text("x")
        .op(b't');
    short.op(b'R').op(b'e').op(b's').op(b'.');
    assert!(import_error(d, &short.0, &storage()).contains("malformed"));

    // Not a dict at the top; an unknown opcode; a stream without STOP; nothing at all.
    let mut list = Pickle::start();
    list.op(b']').op(b'.');
    assert!(import_error(d, &list.0, &storage()).contains("not a dict"));
    assert!(import_error(d, &[0x80, 2, 0xff], &storage()).contains("data.pkl"));
    let unfinished = &bad(spec("0", 6, 2, 2))[..40];
    assert!(import_error(d, unfinished, &storage()).contains("data.pkl"));
    assert!(import_error(d, &[], &storage()).contains("data.pkl"));

    // A LONG1 of 255 bytes (more than any integer holds): whatever it decodes to, no panic.
    let mut huge = Pickle::start();
    huge.op(b'}').text("trainable_keys").op(0x8a).op(255);
    huge.0.extend([0xffu8; 255]);
    huge.op(b's').op(b'.');
    let path = d.join("huge.pt");
    write_archive(&path, &huge.0, &storage());
    assert!(torch_pickle::import(&path, &model()).is_err());
}
