//! `cartridge generate` on the real default model: JSON output, a cartridge equal to the text it
//! was made from, and clear refusals (exit 2) of a foreign or corrupt cartridge.
//!
//! Needs the default model (`scripts/fetch-model.sh`); without it these tests print a note and pass,
//! except under CI (`CI` set), where a missing model is a failure.

mod common;

use std::path::Path;
use std::process::Output;

use candle_core::Device;
use cartridge_formats::cart::{Compression, Provenance};
use cartridge_runtime::cartridge_file::save_cartridge;
use cartridge_runtime::{loader, Transformer};

use common::{cartridge, model_path};

fn json_of(out: &Output) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

const TEXT: &str =
    "The lighthouse of Velmora, called the Gray Needle, is 41 meters tall. It was rebuilt in 1788.";
const QUESTION: &str = "\nQuestion: How tall is the Gray Needle?\nAnswer: The Gray Needle is";

/// Write the KV of `TEXT` as a cartridge, optionally for a model with another weights hash.
fn write_text_cartridge(model: &Path, out: &Path, foreign: bool) -> usize {
    let loaded = loader::load(model, &Device::Cpu).expect("load model");
    let transformer = Transformer::load(loaded.var_builder(), &loaded.config).expect("build");
    let ids = loaded.tokenizer.encode(TEXT, false).unwrap();
    // The split between text and question must fall on a token boundary for the comparison.
    let q = loaded.tokenizer.encode(QUESTION, false).unwrap();
    let joined = loaded
        .tokenizer
        .encode(&format!("{TEXT}{QUESTION}"), false)
        .unwrap();
    assert_eq!(
        [ids.clone(), q].concat(),
        joined,
        "text/question split is not a token boundary"
    );
    let kv = transformer.prefix_kv(None, &ids).unwrap();
    let mut fp = loaded.fingerprint.clone();
    if foreign {
        fp.weights_hash = cartridge_formats::fingerprint::sha256_hex(b"another model");
    }
    save_cartridge(out, &kv, 1, &fp, Provenance::default(), Compression::None).unwrap();
    ids.len()
}

#[test]
fn json_output_is_consistent() {
    let Some(model) = model_path() else { return };
    let out = cartridge(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--raw",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
        "--top-logprobs",
        "3",
        "--json",
    ]);
    let v = json_of(&out);
    let ids = v["ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 6);
    let top = v["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), ids.len());
    for (pos, id) in top.iter().zip(ids) {
        let pairs = pos.as_array().unwrap();
        assert_eq!(pairs.len(), 3);
        // Greedy: the generated token is the most probable one.
        assert_eq!(&pairs[0][0], id);
        let lps: Vec<f64> = pairs.iter().map(|p| p[1].as_f64().unwrap()).collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0,
            "{lps:?}"
        );
    }
    assert!(
        v["text"].as_str().unwrap().contains("Paris"),
        "{}",
        v["text"]
    );
    assert_eq!(v["prefix_tokens"], 0);
}

#[test]
fn cartridge_of_a_text_equals_the_text_in_the_prompt() {
    let Some(model) = model_path() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cart = dir.path().join("text.cart");
    let p = write_text_cartridge(&model, &cart, false);
    let m = model.to_str().unwrap();
    let with_cart = json_of(&cartridge(&[
        "generate",
        "--model",
        m,
        "--raw",
        "--prompt",
        QUESTION,
        "--max-tokens",
        "8",
        "--json",
        "--cartridge",
        cart.to_str().unwrap(),
    ]));
    let with_text = json_of(&cartridge(&[
        "generate",
        "--model",
        m,
        "--raw",
        "--prompt",
        &format!("{TEXT}{QUESTION}"),
        "--max-tokens",
        "8",
        "--json",
    ]));
    assert_eq!(with_cart["prefix_tokens"], p);
    assert_eq!(with_cart["ids"], with_text["ids"]);
    assert!(
        with_cart["text"].as_str().unwrap().contains("41"),
        "{}",
        with_cart["text"]
    );
}

/// `--dtype bf16` converts the f32 cartridge when loading it and still reads the fact from it;
/// the log-probs stay close to f32's (bf16 keeps about 3 significant digits of each weight).
#[test]
fn a_bf16_model_serves_an_f32_cartridge() {
    let Some(model) = model_path() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cart = dir.path().join("text.cart");
    write_text_cartridge(&model, &cart, false);
    let run = |dtype: &str| {
        json_of(&cartridge(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--raw",
            "--prompt",
            QUESTION,
            "--max-tokens",
            "4",
            "--top-logprobs",
            "1",
            "--json",
            "--dtype",
            dtype,
            "--cartridge",
            cart.to_str().unwrap(),
        ]))
    };
    let (f32_run, bf16_run) = (run("f32"), run("bf16"));
    assert!(
        bf16_run["text"].as_str().unwrap().contains("41"),
        "{}",
        bf16_run["text"]
    );
    let first = |o: &serde_json::Value| o["top_logprobs"][0][0][1].as_f64().unwrap();
    let diff = (first(&f32_run) - first(&bf16_run)).abs();
    eprintln!("first-token log-prob, bf16 vs f32: {diff:.4}");
    assert!(
        diff < 0.1,
        "first token's log-prob: f32 {f32_run} vs bf16 {bf16_run}"
    );
}

#[test]
fn foreign_and_corrupt_cartridges_are_refused() {
    let Some(model) = model_path() else { return };
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("foreign.cart");
    write_text_cartridge(&model, &foreign, true);
    let m = model.to_str().unwrap();
    let out = cartridge(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "hi",
        "--cartridge",
        foreign.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("model mismatch (weights_hash)"), "{err}");
    assert!(
        err.contains("cartridge is for [") && err.contains("model is ["),
        "{err}"
    );

    let corrupt = dir.path().join("corrupt.cart");
    let mut bytes = std::fs::read(&foreign).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 1;
    std::fs::write(&corrupt, bytes).unwrap();
    let out = cartridge(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "hi",
        "--cartridge",
        corrupt.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checksum mismatch") && err.contains("corrupt.cart"),
        "{err}"
    );
}
