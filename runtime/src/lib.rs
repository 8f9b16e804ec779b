//! Runtime: our own Llama / Qwen2 / Qwen3 forward with a prefix stack (KV cartridges, then soft
//! prompts, then the user's tokens), model loading (Hugging Face folders, GGUF), tokenizer and chat
//! template, generation.

pub mod models;

pub mod chat_template;
pub mod error;
pub mod gguf;
pub mod loader;
pub mod model_fingerprint;
pub mod tokenizer;

pub use error::{Error, Result};
