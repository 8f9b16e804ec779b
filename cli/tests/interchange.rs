//! `cartridge compose`, `export` and `import` end to end: an offline composition generates exactly
//! what the same cartridges stacked per request generate; `.cart` -> PEFT -> `.cart` keeps every
//! tensor byte; foreign or mismatched inputs exit 2 with a message naming the file.
//!
//! The generation and import tests need the default model (`scripts/fetch-model.sh`); without it
//! they print a note and pass, except under CI.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::Device;
use cartridge_formats::cart::{self, CartFile, Compression, DType, Dims, KvDims, Provenance};
use cartridge_formats::ModelFingerprint;
use cartridge_runtime::cartridge_file::save_cartridge;
use cartridge_runtime::{loader, Transformer};

use common::{cartridge, model_path};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(out));
}

/// Exit 2 (bad input) with every one of `needles` in the message.
fn assert_refused(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn tiny_fingerprint(weights_hash: &str) -> ModelFingerprint {
    ModelFingerprint {
        architecture: "llama".into(),
        num_layers: 2,
        hidden_size: 8,
        num_attention_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        vocab_size: 32,
        rope_theta: 1e4,
        rope_scaling: None,
        tokenizer_hash: "sha256:aa".into(),
        weights_hash: weights_hash.into(),
    }
}

/// A small KV `.cart` for `model` whose values start at `base`.
fn write_small_cart(path: &Path, model: ModelFingerprint, tokens: u32, base: f32) {
    let n = (model.num_kv_heads * tokens * model.head_dim) as usize;
    let tensors: Vec<Vec<u8>> = (0..2 * model.num_layers as usize)
        .map(|i| {
            (0..n)
                .flat_map(|j| (base + (i * 100 + j) as f32).to_le_bytes())
                .collect()
        })
        .collect();
    let contents = cart::CartContents {
        dims: Dims::Kv(KvDims {
            layers: model.num_layers,
            kv_heads: model.num_kv_heads,
            head_dim: model.head_dim,
            tokens,
            frozen_tokens: 1,
            biased: false,
        }),
        dtype: DType::F32,
        model,
        provenance: Provenance::default(),
        summary: None,
        tensors: tensors.iter().map(Vec::as_slice).collect(),
    };
    cart::write_file(path, &contents, Compression::None).expect("write");
}

fn tensors_of(path: &Path) -> Vec<Vec<u8>> {
    let f = CartFile::open(path).expect("open");
    f.verify().expect("verify");
    (0..f.tensor_count())
        .map(|i| f.tensor(i).expect("tensor").bytes.to_vec())
        .collect()
}

#[test]
fn compose_concatenates_in_order_and_refuses_other_models_naming_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |n: &str| dir.path().join(n);
    write_small_cart(&path("a.cart"), tiny_fingerprint("sha256:bb"), 2, 0.0);
    write_small_cart(&path("b.cart"), tiny_fingerprint("sha256:bb"), 3, 0.5);
    write_small_cart(&path("z.cart"), tiny_fingerprint("sha256:cc"), 3, 0.5);

    let out = cartridge(&[
        "compose",
        s(&path("a.cart")),
        s(&path("b.cart")),
        "-o",
        s(&path("ab.cart")),
    ]);
    assert_ok(&out);
    let file = CartFile::open(&path("ab.cart")).expect("open");
    file.verify().expect("verify");
    let Dims::Kv(d) = file.header().dims else {
        panic!("not kv")
    };
    assert_eq!((d.tokens, d.frozen_tokens), (5, 1));
    let parts = &file.header().provenance.training["composition"]["parts"];
    assert_eq!(parts[0]["label"], "a.cart");
    assert_eq!(parts[1]["slots"], serde_json::json!([2, 5]));
    // One KV head: a tensor is a's rows then b's rows.
    let (a, b, ab) = (
        tensors_of(&path("a.cart")),
        tensors_of(&path("b.cart")),
        tensors_of(&path("ab.cart")),
    );
    for i in 0..ab.len() {
        assert_eq!(ab[i], [a[i].clone(), b[i].clone()].concat(), "tensor {i}");
    }

    let out = cartridge(&[
        "compose",
        s(&path("a.cart")),
        s(&path("z.cart")),
        "-o",
        s(&path("az.cart")),
    ]);
    assert_refused(&out, &["a.cart", "z.cart", "weights_hash"]);
    assert!(!path("az.cart").exists());

    std::fs::write(path("junk.cart"), b"not a cartridge").expect("write");
    let out = cartridge(&[
        "compose",
        s(&path("a.cart")),
        s(&path("junk.cart")),
        "-o",
        s(&path("aj.cart")),
    ]);
    assert_refused(&out, &["junk.cart"]);
}

#[test]
fn export_writes_a_peft_adapter_and_refuses_a_corrupt_cart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cart_path, adapter) = (dir.path().join("a.cart"), dir.path().join("adapter"));
    write_small_cart(&cart_path, tiny_fingerprint("sha256:bb"), 3, 0.0);
    let out = cartridge(&["export", "--to", "peft", s(&cart_path), s(&adapter)]);
    assert_ok(&out);
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(adapter.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(config["peft_type"], "CARTRIDGE");
    assert_eq!(config["num_virtual_tokens"], 3);
    assert!(adapter.join("adapter_model.safetensors").is_file());

    let mut bytes = std::fs::read(&cart_path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let bad = dir.path().join("bad.cart");
    std::fs::write(&bad, bytes).expect("write");
    let out = cartridge(&["export", "--to", "peft", s(&bad), s(&adapter)]);
    assert_refused(&out, &["bad.cart", "corrupted"]);
}

const TEXT_A: &str = "The lighthouse of Velmora, called the Gray Needle, is 41 meters tall.";
const TEXT_B: &str = "Velmora's harbour freezes every winter, so ships dock at Orlen instead.";

/// KV cartridges of two texts, each prefilled alone (positions 0..p-1), for the real model.
fn write_text_cartridges(model: &Path, a: &Path, b: &Path) {
    let loaded = loader::load(model, &Device::Cpu).expect("load model");
    let transformer = Transformer::load(loaded.var_builder(), &loaded.config).expect("build");
    for (text, path) in [(TEXT_A, a), (TEXT_B, b)] {
        let ids = loaded.tokenizer.encode(text, false).expect("encode");
        let kv = transformer.prefix_kv(None, &ids).expect("kv");
        let fp = &loaded.fingerprint;
        save_cartridge(path, &kv, 1, fp, Provenance::default(), Compression::None).expect("save");
    }
}

fn generated(out: &Output) -> serde_json::Value {
    assert_ok(out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    serde_json::json!({
        "ids": v["ids"],
        "prefix_tokens": v["prefix_tokens"],
        "prompt_ids": v["prompt_ids"],
        "top": v["top_logprobs"],
    })
}

#[test]
fn composed_file_generates_what_the_online_stack_generates_and_round_trips_through_peft() {
    let Some(model) = model_path() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |n: &str| dir.path().join(n);
    let (a, b, ab) = (path("a.cart"), path("b.cart"), path("ab.cart"));
    write_text_cartridges(&model, &a, &b);
    assert_ok(&cartridge(&["compose", s(&a), s(&b), "-o", s(&ab)]));

    let run = |carts: &[&PathBuf]| {
        let mut args = vec!["generate", "--model", s(&model), "--json", "--raw"];
        for c in carts {
            args.extend(["--cartridge", s(c)]);
        }
        args.extend([
            "--prompt",
            "Question: Where do ships dock in winter?\nAnswer:",
            "--max-tokens",
            "8",
            "--top-logprobs",
            "3",
        ]);
        generated(&cartridge(&args))
    };
    let online = run(&[&a, &b]);
    assert!(online["ids"].as_array().is_some_and(|a| !a.is_empty()));
    assert_eq!(online, run(&[&ab]), "[A, B] per request vs AB.cart");

    // .cart -> PEFT -> .cart keeps every tensor byte and the frozen count.
    let (adapter, back) = (path("adapter"), path("back.cart"));
    assert_ok(&cartridge(&["export", "--to", "peft", s(&ab), s(&adapter)]));
    assert_ok(&cartridge(&[
        "import",
        s(&adapter),
        "-o",
        s(&back),
        "--model",
        s(&model),
    ]));
    assert_eq!(tensors_of(&back), tensors_of(&ab));
    let (h1, h2) = (
        CartFile::open(&ab).expect("ab").header().clone(),
        CartFile::open(&back).expect("back").header().clone(),
    );
    assert_eq!((h1.dims, &h1.model), (h2.dims, &h2.model));

    // Foreign files: another model's shapes, an unknown file, a missing adapter file.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../runtime/tests/fixtures/torch_cartridges/fixed_f32.pt");
    let out = cartridge(&[
        "import",
        s(&fixture),
        "-o",
        s(&path("t.cart")),
        "--model",
        s(&model),
    ]);
    assert_refused(
        &out,
        &["fixed_f32.pt", "another model", "3 layers, the model 30"],
    );
    std::fs::write(path("notes.txt"), b"hello").expect("write");
    let out = cartridge(&[
        "import",
        s(&path("notes.txt")),
        "-o",
        s(&path("n.cart")),
        "--model",
        s(&model),
    ]);
    assert_refused(&out, &["notes.txt", "--from"]);
    std::fs::remove_file(adapter.join("adapter_model.safetensors")).expect("rm");
    let out = cartridge(&[
        "import",
        s(&adapter),
        "-o",
        s(&path("m.cart")),
        "--model",
        s(&model),
    ]);
    assert_refused(&out, &["missing adapter_model.safetensors"]);
}
