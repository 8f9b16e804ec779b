//! Model architectures.

pub mod config;

pub use config::{Architecture, ModelConfig};
