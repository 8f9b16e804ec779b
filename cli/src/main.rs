//! `cartridge`: build, inspect and use cartridges (trained KV caches that stand in for a corpus).

mod commands;
mod config_file;
mod output;
mod progress;
mod session;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Turn a corpus into a cartridge, and use it.
#[derive(Debug, Parser)]
// Flags may repeat and the last one wins: that is how the command line overrides `--config`.
#[command(name = "cartridge", version, about, long_about = None, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a cartridge from a corpus: self-study, then distillation, then write the .cart.
    Build(commands::build::Args),
    /// Show what a .cart file or dataset folder holds; --verify checks every checksum.
    Inspect(commands::inspect::Args),
    /// Self-study: synthesise conversations about a corpus with the teacher's top-k log-probs.
    Synthesize(commands::synthesize::Args),
    /// Distil a self-study dataset into a KV cartridge (or a soft prompt).
    Train(commands::train::Args),
    /// Generate a completion for one prompt, optionally with cartridges and a soft prompt in front.
    Generate(commands::generate::Args),
    /// Chat interactively with the model (and its cartridges); /reset, /exit.
    Chat(commands::chat::Args),
    /// Serve the model over an OpenAI-compatible HTTP API; requests name cartridges to compose.
    Serve(commands::serve::Args),
    /// Compare the bare model, the corpus in context, cartridges and soft prompts on questions and
    /// held-out conversations: answer log-likelihood, accuracy, KL to the teacher, KV memory, latency.
    Eval(commands::eval::Args),
    /// Concatenate cartridges into one .cart, exactly as they compose at request time.
    Compose(commands::compose::Args),
    /// Write a .cart as a Hugging Face PEFT adapter (CARTRIDGE or PROMPT_TUNING).
    Export(commands::export::Args),
    /// Turn a PEFT adapter or a reference-trainer torch cartridge into a .cart for a model.
    Import(commands::import::Args),
}

/// Exit status for bad input (a corrupt or foreign file, a model mismatch); usage errors also give 2.
pub const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    // Before any thread starts: candle otherwise re-reads /proc/cpuinfo on every op.
    cartridge_runtime::ops::pin_thread_count();
    cartridge_runtime::malloc::keep_freed_memory();
    let argv = match config_file::expand::<Cli>(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let cli = Cli::parse_from(argv);
    let result = match cli.command {
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Synthesize(args) => commands::synthesize::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Build(args) => commands::build::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Compose(args) => commands::compose::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Import(args) => commands::import::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            if is_bad_input(&e) {
                ExitCode::from(EXIT_BAD_INPUT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, each said once. Most errors here already end with their
/// cause (`path: reason`), which anyhow's `{:#}` would print a second time.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Whether an error is about the user's input (a corrupt or foreign `.cart`, a model mismatch, a
/// `--device` this binary or machine cannot provide).
fn is_bad_input(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.is::<cartridge_formats::cart::CartError>()
            || cause.is::<cartridge_runtime::interchange::InterchangeError>()
            || cause.is::<cartridge_runtime::device::DeviceError>()
            || matches!(
                cause.downcast_ref::<cartridge_eval::Error>(),
                Some(cartridge_eval::Error::QaLine { .. } | cartridge_eval::Error::Reuse { .. })
            )
            || matches!(
                cause.downcast_ref::<cartridge_runtime::Error>(),
                Some(cartridge_runtime::Error::Cart(_))
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_that_ends_with_its_cause_says_it_once_and_context_is_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(cartridge_compiler::Error::io("/x/y.lock", io));
        assert_eq!(describe(&e), "/x/y.lock: No such file");
        let e = e.context("training");
        assert_eq!(describe(&e), "training: /x/y.lock: No such file");
        let plain = anyhow::anyhow!("a").context("b");
        assert_eq!(describe(&plain), "b: a");
    }
}
