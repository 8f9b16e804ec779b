//! Test helpers: a tiny random chat model (`cartridge_runtime::testing`: config.json,
//! model.safetensors, a byte-level tokenizer.json with ChatML special tokens, and a ChatML
//! template) written into a folder — the same model the self-study tests use.
#![allow(dead_code)]

use std::path::Path;

use cartridge_runtime::testing::TinySpec;

/// Write a tiny random Llama chat model into `dir`.
pub fn write_tiny_chat_model(dir: &Path, seed: u64) {
    TinySpec::llama_chat()
        .write(dir, seed)
        .expect("write tiny chat model");
}
