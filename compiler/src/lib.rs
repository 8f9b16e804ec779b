//! The trainer: synthesised conversations in, a `.cart` out (Eyuboglu et al. 2025, "Cartridges";
//! DESIGN.md §5).
//!
//! A KV cartridge (per layer K/V for `p` slots, the first frozen) or a soft prompt is trained so
//! that the frozen model *with it and without the corpus* reproduces the teacher's top-k
//! distributions recorded by self-study. Training sequences carry no BOS or system prompt and
//! start at position `p`, exactly as the runtime serves the cartridge.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use cartridge_compiler::{train, ModelRef, RunOptions, TrainConfig, TrainData};
//! use cartridge_formats::dataset::{Dataset, ReadOptions};
//! let loaded = cartridge_runtime::loader::load_default(&candle_core::Device::Cpu)?;
//! let net = loaded.transformer()?;
//! let ds = Dataset::open(std::path::Path::new("data/"), ReadOptions::default())?;
//! let data = TrainData::from_dataset(&ds)?;
//! let corpus_ids: Vec<u32> = vec![/* the corpus's tokens */];
//! let model = ModelRef { transformer: &net, fingerprint: &loaded.fingerprint };
//! let summary = train(&TrainConfig::default(), model, &data, Some(&corpus_ids),
//!     std::path::Path::new("corpus.cart"), &RunOptions::default(), &mut |_| {})?;
//! println!("gap closed: {:?}", summary.final_eval.map(|e| e.gap_closed));
//! # Ok(()) }
//! ```
//!
//! Files: [`params`] (what is trained), [`init`] (where it starts), [`data`] (examples, split,
//! order), [`objective`] (the loss), [`optim`] (Adam), [`schedule`] (learning rate),
//! [`checkpoint`] (save/resume), [`eval`] (held-out gap), [`metrics`] (JSONL), [`plot`] (PNG), [`train()`] (the loop).

pub mod checkpoint;
pub mod config;
pub mod coverage;
pub mod data;
pub mod error;
pub mod eval;
pub mod fused_loss;
pub mod init;
pub mod key_fit;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod params;
pub mod plot;
pub mod schedule;
mod train;
pub mod value_fit;

pub use config::{ArtifactKind, ComputeDtype, RunOptions, TrainConfig};
pub use data::PromptSummary;
pub use error::{Error, Result};
pub use eval::EvalPoint;
pub use init::{InitKind, InitProgress, InitStage, InitialParams};
pub use objective::Objective;
pub use optim::{Adam, AdamParams};
pub use schedule::Schedule;
pub use train::{
    step_gradients, train, train_loaded, ModelRef, Progress, StepInfo, TrainData, TrainSummary,
};
