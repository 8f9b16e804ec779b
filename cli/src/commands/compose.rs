//! `cartridge compose A.cart B.cart [...] -o AB.cart`: concatenate cartridges offline, exactly as
//! the runtime composes them per request (`formats/SPEC.md` §6).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use cartridge_formats::cart::{self, Compression, Dims};

use crate::output::human_bytes;

/// How positions and sinks work, shown by `cartridge compose --help`.
const NOTES: &str = "\
Composition concatenates the cartridges along the token axis in the order given, exactly as
`--cartridge A.cart --cartridge B.cart` does at request time, so the model computes the same
logits with AB.cart as with A and B stacked.

Positions: keys are stored after RoPE and are never re-rotated. Each part keeps the positions it
was trained at (0..p_i-1 for a cartridge trained alone); the user's first token takes position
P = p_A + p_B + ...

Attention sinks: the result's frozen_tokens is the first part's (the leading sink). Each later
part's sink stays in place at the start of its slots; the provenance records every part, its slots
and its own frozen count.

All parts must be for the same model (equal fingerprints) and of one kind (KV cartridges, or soft
prompts with at most one summary). Soft prompts are not merged into KV: stack them at request time.
See formats/SPEC.md section 6.";

/// Options of `cartridge compose`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = NOTES)]
pub struct Args {
    /// The cartridges to compose, in order (at least two).
    #[arg(required = true, num_args = 2.., value_name = "FILE.cart")]
    inputs: Vec<PathBuf>,
    /// Where to write the composed cartridge.
    #[arg(short, long, value_name = "OUT.cart")]
    output: PathBuf,
    /// Compress the payload with zstd (smaller; decompressed at load instead of memory-mapped).
    #[arg(long)]
    compress: bool,
}

/// Run the subcommand.
pub fn run(args: Args) -> Result<ExitCode> {
    let inputs: Vec<&Path> = args.inputs.iter().map(PathBuf::as_path).collect();
    let created = cartridge_formats::time::now_rfc3339();
    let composed = cart::compose_files(&inputs, &created)?;
    let compression = if args.compress {
        Compression::Zstd
    } else {
        Compression::None
    };
    cart::write_file(&args.output, &composed.contents(), compression)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let size = std::fs::metadata(&args.output)
        .map(|m| m.len())
        .unwrap_or(0);
    let what = match composed.dims {
        Dims::Kv(d) => format!("{} tokens ({} frozen)", d.tokens, d.frozen_tokens),
        Dims::SoftPrompt(d) => format!("{} soft-prompt embeddings", d.tokens),
    };
    println!(
        "{}: {} parts composed, {what}, {}",
        args.output.display(),
        args.inputs.len(),
        human_bytes(size)
    );
    Ok(ExitCode::SUCCESS)
}
