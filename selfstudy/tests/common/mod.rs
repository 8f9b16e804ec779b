//! Test helpers: a tiny random chat model (`cartridge_runtime::testing`: config.json,
//! model.safetensors, a byte-level tokenizer.json with ChatML special tokens, and a ChatML
//! template) written into a folder, and small corpus folders.
#![allow(dead_code)]

use std::path::Path;

use cartridge_runtime::testing::{self, TinySpec};

/// `<|im_start|>`, the chat model's BOS token.
pub const IM_START: u32 = testing::IM_START;

/// Write a tiny random Llama chat model into `dir`.
pub fn write_tiny_chat_model(dir: &Path, seed: u64) {
    TinySpec::llama_chat()
        .write(dir, seed)
        .expect("write tiny chat model");
}

/// Write `files` (relative path, bytes) under `root`.
pub fn write_files(root: &Path, files: &[(&str, &[u8])]) {
    for (rel, bytes) in files {
        let p = root.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, bytes).expect("write");
    }
}
