//! A tiny random chat model (`cartridge_runtime::testing`: config.json, model.safetensors, a
//! byte-level tokenizer.json with ChatML special tokens, a ChatML template) written into a folder:
//! the same model as the server tests', for CLI tests that must not need the real model.
#![allow(dead_code)]

use std::path::Path as FsPath;

use cartridge_runtime::testing::TinySpec;

/// Write a tiny random Llama chat model into `dir` (embeddings in [-0.3, 0.3]).
pub fn write_tiny_chat_model(dir: &FsPath, seed: u64) {
    TinySpec::llama_chat()
        .with_embed_scale(0.3)
        .write(dir, seed)
        .expect("write tiny chat model");
}
