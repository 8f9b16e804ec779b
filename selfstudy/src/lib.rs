//! Self-study (Eyuboglu et al. 2025, "Cartridges", §4; DESIGN.md §4): turn a corpus into training
//! data for a cartridge. The teacher model plays both roles of a conversation about a random chunk
//! of the corpus — a user who writes one message from a seed prompt, and an assistant who answers
//! with the chunk in its system prompt — and the teacher's top-k log-probabilities at every answer
//! token are stored in dataset shards (`cartridge_formats::dataset`).
//!
//! - [`corpus`]: ingestion (file or folder, `.gitignore`, excludes, binary/UTF-8 handling, digest);
//! - [`chunk`]: tokenisation and random token windows;
//! - [`seeds`]: the five seed-prompt kinds;
//! - [`backend`]: the teacher interface; [`local`]: the in-process runtime teacher; [`remote`]: a
//!   teacher behind an OpenAI-compatible server;
//! - [`prompt`]: system message and conversation token ids;
//! - [`synth`]: the synthesis loop, [`synthesize`];
//! - [`summary`]: the corpus summary a soft prompt can carry.
//!
//! ```no_run
//! use cartridge_selfstudy::{corpus, local::LocalBackend, synthesize, SynthesisConfig};
//! # fn main() -> cartridge_selfstudy::Result<()> {
//! let corpus = corpus::ingest("docs/".as_ref(), &corpus::IngestOptions::default())?;
//! let loaded = cartridge_runtime::loader::load_default(&candle_core::Device::Cpu)?;
//! let mut backend = LocalBackend::new(loaded)?;
//! let config = SynthesisConfig { num_conversations: 64, ..SynthesisConfig::default() };
//! let summary = synthesize(&config, &mut backend, &corpus, "data/".as_ref(), false, |p| {
//!     eprintln!("{}/{} conversations", p.done, p.total);
//! })?;
//! println!("{} answer tokens at {:.1}/s", summary.answer_tokens, summary.answer_tokens_per_sec);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod backend;
pub mod chunk;
pub mod corpus;
pub mod error;
pub mod local;
pub mod prompt;
pub mod remote;
pub mod seeds;
pub mod summary;
pub mod synth;

pub use backend::{Backend, BackendInfo, Completion, CompletionOutput, Scoring, Timings, TopK};
pub use corpus::{ingest, Corpus, IngestOptions, InvalidUtf8};
pub use error::{Error, Result};
pub use seeds::{parse_seed_file, SeedKind, SeedWeights};
pub use synth::{synthesize, Progress, Summary, SynthesisConfig};
