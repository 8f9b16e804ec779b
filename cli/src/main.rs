//! `cartridge`: build, inspect and use cartridges (trained KV caches that stand in for a corpus).

mod commands;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Turn a corpus into a cartridge, and use it.
#[derive(Debug, Parser)]
#[command(name = "cartridge", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show what a .cart file holds (kind, model, dims, sizes, provenance); --verify checks every checksum.
    Inspect(commands::inspect::Args),
}

/// Exit status for bad input (a corrupt or foreign file, a model mismatch); usage errors also give 2.
pub const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => commands::inspect::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
