//! Evaluation: does a cartridge replace the corpus, and at what cost? (issue #7; the comparisons of
//! Eyuboglu et al. 2025, "Cartridges", §5.)
//!
//! Modes side by side ([`mode`]): the bare model, the whole corpus in context (ICL: the self-study
//! teacher's own system message, [`corpus_context`]), the corpus cut to a KV budget, cartridges
//! (composed), a soft prompt (with its summary text). Per mode:
//!
//! - on questions with reference answers ([`qa`]): the mean log-likelihood per answer token and
//!   its perplexity, multiple-choice accuracy from the options' log-likelihoods ([`score`]), and
//!   with generation, exact match, contains-match and chrF of greedy answers ([`answers`],
//!   [`text_match`]);
//! - on held-out self-study conversations: the KL from the teacher's recorded top-k ([`kl`]);
//! - KV memory of the prefix and the time to the first answer token;
//! - derived: the share of the bare -> ICL gap a mode closes ([`report`]), and how sure the
//!   accuracy figures are: 95% intervals, and each mode's answers against ICL's question by
//!   question ([`stats`]);
//! - reuse: the reference modes (bare, ICL) of an earlier report stand in for measuring them
//!   again when nothing they depend on changed ([`reuse`]).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use cartridge_eval::{evaluate, qa, EvalData, EvalModel, EvalOptions, Mode};
//! let loaded = cartridge_runtime::loader::load_default(&candle_core::Device::Cpu)?;
//! let net = loaded.transformer()?;
//! let template = loaded.chat_template.as_ref().ok_or("no chat template")?;
//! let model = EvalModel { transformer: &net, tokenizer: &loaded.tokenizer, template };
//! let data = EvalData { qa: qa::read_qa("examples/evals/quenmar.jsonl".as_ref())?, ..EvalData::default() };
//! let report = evaluate(model, &loaded.fingerprint.short(), &[Mode::bare()], &data,
//!     &EvalOptions::default(), |line| eprintln!("{line}"))?;
//! println!("{}", serde_json::to_string_pretty(&report)?);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod answers;
pub mod corpus_context;
pub mod error;
pub mod kl;
pub mod mode;
pub mod qa;
pub mod report;
pub mod reuse;
mod run;
pub mod score;
pub mod stats;
pub mod text_match;

pub use corpus_context::CorpusContext;
pub use error::{Error, Result};
pub use mode::{EvalModel, Mode, ModeKind, PreparedMode};
pub use report::{ModeReport, Report};
pub use run::{data_digest, evaluate, EvalData, EvalOptions};
