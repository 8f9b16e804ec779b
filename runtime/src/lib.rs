//! Runtime: our own Llama / Qwen2 / Qwen3 forward with a prefix stack (KV cartridges, then soft
//! prompts, then the user's tokens), model loading (Hugging Face folders, GGUF), tokenizer and chat
//! template, generation.

pub mod models;

pub mod cartridge_file;
pub mod chat_template;
pub mod device;
pub mod error;
pub mod gguf;
pub mod interchange;
pub mod loader;
pub mod model_fingerprint;
pub mod tokenizer;

pub mod attention;
pub mod batch_decoder;
mod cpu_kernel;
mod decode_attention;
pub mod fused;
pub mod generate;
pub mod kernels;
pub mod kv_cache;
pub mod malloc;
pub mod ops;
pub mod prefix;
pub mod safetensors_dir;
mod small_matmul;

#[cfg(feature = "testing")]
pub mod testing;

pub use batch_decoder::BatchDecoder;
pub use error::{Error, Result};
pub use kv_cache::KvCache;
pub use models::{Logits, Transformer};
pub use ops::Path;
pub use prefix::{Composition, PrefixKv, PrefixLayer, PrefixStack};
pub use small_matmul::LinearProducts;
