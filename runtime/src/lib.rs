//! Runtime: our own Llama / Qwen2 / Qwen3 forward with a prefix stack (KV cartridges, then soft
//! prompts, then the user's tokens), model loading (Hugging Face folders, GGUF), tokenizer and chat
//! template, generation.

pub mod models;
