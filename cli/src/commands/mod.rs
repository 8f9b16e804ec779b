//! One module per subcommand.

pub mod build;
pub mod chat;
pub mod compose;
pub mod eval;
pub mod export;
pub mod generate;
pub mod import;
pub mod inspect;
pub mod inspect_dataset;
pub mod serve;
pub mod synthesize;
pub mod train;
