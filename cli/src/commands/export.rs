//! `cartridge export --to peft F.cart DIR`: write a `.cart` as a Hugging Face PEFT adapter
//! (`CARTRIDGE` for a KV cartridge, `PROMPT_TUNING` for a soft prompt).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cartridge_formats::cart::{CartFile, Dims};
use cartridge_runtime::interchange::peft;

/// Formats `export` writes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Target {
    /// A Hugging Face PEFT adapter folder: adapter_config.json + adapter_model.safetensors.
    Peft,
}

/// Options of `cartridge export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The format to write.
    #[arg(long, value_enum)]
    to: Target,
    /// The `.cart` to export (verified first).
    #[arg(value_name = "FILE.cart")]
    input: PathBuf,
    /// The adapter folder to write (created if needed; its adapter files are replaced).
    #[arg(value_name = "DIR")]
    output: PathBuf,
    /// Recorded as base_model_name_or_path, where PEFT loads the base model from (e.g.
    /// HuggingFaceTB/SmolLM2-135M-Instruct).
    #[arg(long, value_name = "NAME")]
    base_model: Option<String>,
}

/// Run the subcommand.
pub fn run(args: Args) -> Result<ExitCode> {
    let file = CartFile::open(&args.input)?;
    file.verify()?;
    match args.to {
        Target::Peft => peft::export(
            file.header(),
            file.raw_payload(),
            &args.output,
            args.base_model.as_deref(),
        )
        .with_context(|| format!("exporting {}", args.input.display()))?,
    }
    let (peft_type, what) = match file.header().dims {
        Dims::Kv(d) => (
            "CARTRIDGE",
            format!("{} virtual tokens ({} frozen)", d.tokens, d.frozen_tokens),
        ),
        Dims::SoftPrompt(d) => ("PROMPT_TUNING", format!("{} virtual tokens", d.tokens)),
    };
    println!(
        "{}: PEFT {peft_type} adapter, {what}, from {}",
        args.output.display(),
        args.input.display()
    );
    Ok(ExitCode::SUCCESS)
}
