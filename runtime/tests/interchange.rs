//! Interchange: `.cart` -> PEFT adapter -> `.cart` gives back identical tensor bytes; the PEFT
//! layout is the documented one; the reference trainer's pickled torch cartridges
//! (`tests/fixtures/torch_cartridges`, written by real torch) import to the expected tensors; foreign
//! files with wrong shapes, missing tensors or another model's dimensions get clear errors.

use std::path::{Path, PathBuf};

use cartridge_formats::cart::{
    self, CartFile, Compression, DType, Dims, KvDims, Provenance, SoftPromptDims,
};
use cartridge_formats::ModelFingerprint;
use cartridge_runtime::interchange::{peft, torch_pickle, ImportedPrefix, InterchangeError};

/// The tiny Llama the fixtures were made for: 3 layers, 2 KV heads of 8, hidden 32.
fn model() -> ModelFingerprint {
    ModelFingerprint {
        architecture: "llama".into(),
        num_layers: 3,
        hidden_size: 32,
        num_attention_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        vocab_size: 61,
        rope_theta: 1e4,
        rope_scaling: None,
        tokenizer_hash: "sha256:aa".into(),
        weights_hash: "sha256:bb".into(),
    }
}

/// The fixtures' element (layer l, key/value kv, head h, token t, dim d), as torch computed it.
fn fixture_value(l: usize, kv: usize, h: usize, t: usize, d: usize) -> f32 {
    (l * 1000 + kv * 100 + h * 10 + t) as f32 + d as f32 / 16.0
}

fn encode_value(v: f32, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => v.to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
        DType::Bf16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
    }
}

/// `.cart` tensors `[H, p, D]` per layer (keys, values) filled by `value`.
fn kv_tensors(
    p: usize,
    dtype: DType,
    value: impl Fn(usize, usize, usize, usize, usize) -> f32,
) -> Vec<Vec<u8>> {
    let m = model();
    let mut out = Vec::new();
    for l in 0..m.num_layers as usize {
        for kv in 0..2 {
            let mut b = Vec::new();
            for h in 0..m.num_kv_heads as usize {
                for t in 0..p {
                    for d in 0..m.head_dim as usize {
                        b.extend(encode_value(value(l, kv, h, t, d), dtype));
                    }
                }
            }
            out.push(b);
        }
    }
    out
}

fn write_cart(path: &Path, dims: Dims, dtype: DType, tensors: &[Vec<u8>], summary: Option<&str>) {
    let contents = cart::CartContents {
        dims,
        dtype,
        model: model(),
        provenance: Provenance::default(),
        summary: summary.map(str::to_string),
        tensors: tensors.iter().map(Vec::as_slice).collect(),
    };
    cart::write_file(path, &contents, Compression::None).expect("write cart");
}

/// Every tensor's bytes of a `.cart`, in file order.
fn cart_tensors(path: &Path) -> (Dims, DType, Vec<Vec<u8>>, Option<String>) {
    let f = CartFile::open(path).expect("open");
    f.verify().expect("verify");
    let tensors = (0..f.tensor_count())
        .map(|i| f.tensor(i).expect("tensor").bytes.to_vec())
        .collect();
    let h = f.header();
    (h.dims, h.dtype, tensors, h.summary.clone())
}

fn export(cart_path: &Path, dir: &Path) {
    let f = CartFile::open(cart_path).expect("open");
    f.verify().expect("verify");
    peft::export(f.header(), f.raw_payload(), dir, Some("tiny/llama")).expect("export");
}

fn reimport(imported: &ImportedPrefix, path: &Path) -> (Dims, DType, Vec<Vec<u8>>, Option<String>) {
    imported
        .write_cart(
            path,
            &model(),
            "2026-11-29T00:00:00Z".into(),
            Compression::None,
        )
        .expect("write");
    cart_tensors(path)
}

fn kv_dims(p: u32, frozen: u32) -> Dims {
    Dims::Kv(KvDims {
        layers: 3,
        kv_heads: 2,
        head_dim: 8,
        tokens: p,
        frozen_tokens: frozen,
        biased: false,
    })
}

#[test]
fn kv_cart_round_trips_through_peft_with_identical_tensor_bytes() {
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, adapter, back) = (
            dir.path().join("a.cart"),
            dir.path().join("adapter"),
            dir.path().join("back.cart"),
        );
        let tensors = kv_tensors(5, dtype, |l, kv, h, t, d| {
            ((l * 7 + kv * 5 + h * 3 + t) as f32 * 0.37 + d as f32).sin()
        });
        write_cart(&src, kv_dims(5, 1), dtype, &tensors, None);
        export(&src, &adapter);

        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join(peft::CONFIG_FILE)).expect("config"),
        )
        .expect("json");
        assert_eq!(config["peft_type"], "CARTRIDGE");
        assert_eq!(config["num_virtual_tokens"], 5);
        assert_eq!(config["num_frozen_tokens"], 1);
        assert_eq!(config["num_layers"], 3);
        assert_eq!(config["num_attention_heads"], 2);
        assert_eq!(config["token_dim"], 16);
        assert_eq!(config["base_model_name_or_path"], "tiny/llama");

        // The documented layout: row t, column ((2l + kv) * H + h) * D + d.
        let bytes = std::fs::read(adapter.join(peft::WEIGHTS_FILE)).expect("weights");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let pe = st.tensor(peft::TENSOR).expect("prompt_embeddings");
        assert_eq!(pe.shape(), &[5, 3 * 2 * 2 * 8]);
        let es = dtype.size() as usize;
        let (l, kv, h, t, d) = (2, 1, 1, 3, 5);
        let col = ((2 * l + kv) * 2 + h) * 8 + d;
        let at = (t * 96 + col) * es;
        let want = &tensors[2 * l + kv][((h * 5 + t) * 8 + d) * es..][..es];
        assert_eq!(&pe.data()[at..at + es], want, "{dtype:?}: layout");

        let imported = peft::import(&adapter, &model()).expect("import");
        let (dims, got_dtype, got, _) = reimport(&imported, &back);
        assert_eq!((dims, got_dtype), (kv_dims(5, 1), dtype));
        assert_eq!(got, tensors, "{dtype:?}: tensor bytes after the round trip");
        // Import also accepts one of the adapter's files.
        peft::import(&adapter.join(peft::CONFIG_FILE), &model()).expect("via the config file");
    }
}

#[test]
fn soft_prompt_round_trips_through_peft_prompt_tuning_with_its_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, adapter, back) = (
        dir.path().join("s.cart"),
        dir.path().join("adapter"),
        dir.path().join("back.cart"),
    );
    let values: Vec<u8> = (0..4 * 32)
        .flat_map(|i| (i as f32 * 0.01 - 0.5).to_le_bytes())
        .collect();
    let dims = Dims::SoftPrompt(SoftPromptDims {
        hidden: 32,
        tokens: 4,
    });
    write_cart(
        &src,
        dims,
        DType::F32,
        std::slice::from_ref(&values),
        Some("About Velmora."),
    );
    export(&src, &adapter);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join(peft::CONFIG_FILE)).expect("config"),
    )
    .expect("json");
    assert_eq!(config["peft_type"], "PROMPT_TUNING");
    assert_eq!(config["token_dim"], 32);
    let imported = peft::import(&adapter, &model()).expect("import");
    let (got_dims, _, got, summary) = reimport(&imported, &back);
    assert_eq!(got_dims, dims);
    assert_eq!(got, vec![values]);
    assert_eq!(summary.as_deref(), Some("About Velmora."));

    // Re-exporting a prompt without a summary into the same folder leaves no stale summary.
    let plain = dir.path().join("plain.cart");
    write_cart(&plain, dims, DType::F32, &[vec![0; 4 * 32 * 4]], None);
    export(&plain, &adapter);
    assert!(peft::import(&adapter, &model())
        .expect("import")
        .summary
        .is_none());
}

/// An adapter folder with this config and one tensor.
fn write_adapter(dir: &Path, config: serde_json::Value, name: &str, shape: Vec<usize>) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join(peft::CONFIG_FILE), config.to_string()).expect("config");
    let data = vec![0u8; shape.iter().product::<usize>() * 4];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &data).expect("view");
    let bytes = safetensors::serialize([(name, view)], None).expect("serialize");
    std::fs::write(dir.join(peft::WEIGHTS_FILE), bytes).expect("weights");
}

fn cartridge_config(p: usize) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "CARTRIDGE", "task_type": "CAUSAL_LM", "num_virtual_tokens": p,
        "num_frozen_tokens": 1, "num_layers": 3, "num_attention_heads": 2, "token_dim": 16,
        "num_transformer_submodules": 1,
    })
}

fn import_error(dir: &Path, model: &ModelFingerprint) -> String {
    let err = peft::import(dir, model).expect_err("must be refused");
    err.to_string()
}

#[test]
fn foreign_peft_adapters_with_wrong_shapes_tensors_or_model_are_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let case = |name: &str| root.path().join(name);

    write_adapter(&case("ok"), cartridge_config(4), peft::TENSOR, vec![4, 96]);
    peft::import(&case("ok"), &model()).expect("a well-formed adapter imports");

    write_adapter(
        &case("width"),
        cartridge_config(4),
        peft::TENSOR,
        vec![4, 95],
    );
    let msg = import_error(&case("width"), &model());
    assert!(
        msg.contains("[4, 95]") && msg.contains("prompt_embeddings"),
        "{msg}"
    );

    write_adapter(
        &case("rows"),
        cartridge_config(5),
        peft::TENSOR,
        vec![4, 96],
    );
    assert!(import_error(&case("rows"), &model()).contains("num_virtual_tokens"));

    write_adapter(&case("missing"), cartridge_config(4), "other", vec![4, 96]);
    assert!(import_error(&case("missing"), &model()).contains("missing tensor prompt_embeddings"));

    let wider = ModelFingerprint {
        num_layers: 4,
        ..model()
    };
    let msg = import_error(&case("ok"), &wider);
    assert!(
        msg.contains("another model") && msg.contains("num_layers = 3"),
        "{msg}"
    );

    let mut lora = cartridge_config(4);
    lora["peft_type"] = "LORA".into();
    write_adapter(&case("lora"), lora, peft::TENSOR, vec![4, 96]);
    assert!(import_error(&case("lora"), &model()).contains("LORA"));

    std::fs::create_dir_all(case("empty")).expect("mkdir");
    assert!(import_error(&case("empty"), &model()).contains("missing adapter_config.json"));

    write_adapter(
        &case("garbage"),
        cartridge_config(4),
        peft::TENSOR,
        vec![4, 96],
    );
    std::fs::write(case("garbage").join(peft::WEIGHTS_FILE), b"not safetensors").expect("w");
    assert!(import_error(&case("garbage"), &model()).contains("not a safetensors file"));
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch_cartridges")
        .join(name)
}

/// Import fixture `name` and check it holds tokens `0..p` of the fixture cache, `frozen` frozen.
fn check_pickle(name: &str, p: u32, frozen: u32, dtype: DType) {
    let imported = torch_pickle::import(&fixture(name), &model()).expect(name);
    assert_eq!(imported.dims, kv_dims(p, frozen), "{name}");
    assert_eq!(imported.dtype, dtype, "{name}");
    let want = kv_tensors(p as usize, dtype, fixture_value);
    assert_eq!(imported.tensors, want, "{name}: tensors");
    // And it survives .cart -> PEFT -> .cart unchanged.
    let dir = tempfile::tempdir().expect("tempdir");
    let (cart_path, adapter) = (dir.path().join("t.cart"), dir.path().join("adapter"));
    let (_, _, tensors, _) = reimport(&imported, &cart_path);
    assert_eq!(tensors, want, "{name}: written .cart");
    export(&cart_path, &adapter);
    let again = peft::import(&adapter, &model()).expect("peft import");
    assert_eq!(again.tensors, want, "{name}: after PEFT");
    assert_eq!(again.dims, kv_dims(p, frozen), "{name}: dims after PEFT");
}

#[test]
fn reference_pickles_import_to_the_expected_tensors() {
    // ParameterLists of contiguous parameters, the reference trainer's `save`, old key names.
    check_pickle("fixed_f32.pt", 5, 1, DType::F32);
    // Newer key names (frozen_*), bf16, two frozen tokens.
    check_pickle("frozen_bf16.pt", 4, 2, DType::Bf16);
    // No frozen tokens (empty ParameterLists); f16 views at offsets into one storage.
    check_pickle("no_frozen_f16.pt", 3, 0, DType::F16);
    // Plain lists of strided views into one shared storage.
    check_pickle("lists_f32.pt", 4, 1, DType::F32);
}

fn pickle_error(path: &Path, model: &ModelFingerprint) -> InterchangeError {
    torch_pickle::import(path, model).expect_err("must be refused")
}

#[test]
fn foreign_pickles_are_refused_with_clear_errors() {
    let err = pickle_error(&fixture("missing_values.pt"), &model());
    assert!(
        matches!(&err, InterchangeError::Missing { what, .. } if what.contains("trainable_values")),
        "{err}"
    );
    let err = pickle_error(&fixture("state_dict.pt"), &model());
    assert!(err.to_string().contains("missing trainable_keys"), "{err}");
    let err = pickle_error(&fixture("broadcast_f32.pt"), &model());
    assert!(err.to_string().contains("broadcast view"), "{err}");
    let other_heads = ModelFingerprint {
        head_dim: 16,
        ..model()
    };
    let err = pickle_error(&fixture("fixed_f32.pt"), &other_heads);
    assert!(matches!(err, InterchangeError::WrongModel { .. }), "{err}");
    assert!(err.to_string().contains("head_dim 8"), "{err}");
    let fewer_layers = ModelFingerprint {
        num_layers: 2,
        ..model()
    };
    let err = pickle_error(&fixture("fixed_f32.pt"), &fewer_layers);
    assert!(err.to_string().contains("3 layers, the model 2"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("not_a_zip.pt");
    std::fs::write(&text, b"hello").expect("write");
    let err = pickle_error(&text, &model());
    assert!(
        err.to_string().contains("not a torch.save zip archive"),
        "{err}"
    );

    // Every truncation of a real file is an error, never a panic.
    let bytes = std::fs::read(fixture("fixed_f32.pt")).expect("fixture");
    let cut = dir.path().join("cut.pt");
    for len in (0..bytes.len()).step_by(97) {
        std::fs::write(&cut, &bytes[..len]).expect("write");
        assert!(
            torch_pickle::import(&cut, &model()).is_err(),
            "cut at {len}"
        );
    }
    // Flipped bytes inside the pickle stream: an error or (if the flip is harmless) a result.
    for at in (0..bytes.len()).step_by(13) {
        let mut bad = bytes.clone();
        bad[at] ^= 0x5a;
        std::fs::write(&cut, &bad).expect("write");
        let _ = torch_pickle::import(&cut, &model());
    }
}
