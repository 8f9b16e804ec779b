//! Model architectures.

pub mod config;
mod llama;
mod qwen2;
mod qwen3;
pub mod transformer;

pub use config::{Architecture, ModelConfig};
pub use transformer::{Logits, Transformer};
