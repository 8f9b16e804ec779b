//! `cartridge import SRC -o F.cart --model M`: turn a Hugging Face PEFT adapter or a pickled torch
//! cartridge of the reference implementation into a `.cart` for model M.
//!
//! Foreign files carry no model fingerprint: every shape is checked against M, whose fingerprint
//! the `.cart` then carries.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::Device;
use cartridge_formats::cart::{Compression, Dims};
use cartridge_runtime::interchange::{peft, torch_pickle, InterchangeError};
use cartridge_runtime::loader;

/// What `import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// Tell from the path: a folder or adapter_*.json/.safetensors is PEFT, a zip archive torch.
    Auto,
    /// A Hugging Face PEFT adapter (CARTRIDGE, PREFIX_TUNING or PROMPT_TUNING).
    Peft,
    /// A torch.save file of the reference trainer (trainable_keys, trainable_values, fixed_* or
    /// frozen_*).
    Torch,
}

/// Options of `cartridge import`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A PEFT adapter folder (or one of its files), or a pickled torch cartridge (.pt).
    #[arg(value_name = "SRC")]
    input: PathBuf,
    /// Where to write the `.cart`.
    #[arg(short, long, value_name = "OUT.cart")]
    output: PathBuf,
    /// The model the cartridge is for: shapes are checked against it and its fingerprint is
    /// recorded [default: SmolLM2-135M-Instruct fetched by scripts/fetch-model.sh, or
    /// $CARTRIDGE_MODEL].
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// What SRC is.
    #[arg(long = "from", value_enum, default_value_t = Source::Auto)]
    source: Source,
    /// Compress the payload with zstd (smaller; decompressed at load instead of memory-mapped).
    #[arg(long)]
    compress: bool,
}

/// Run the subcommand.
pub fn run(args: Args) -> Result<ExitCode> {
    let source = match args.source {
        Source::Auto => detect(&args.input)?,
        other => other,
    };
    let model_path = loader::resolve_model_path(args.model.as_deref())?;
    let model = loader::load(&model_path, &Device::Cpu)
        .with_context(|| format!("loading model {}", model_path.display()))?;
    let fingerprint = &model.fingerprint;
    let imported = match source {
        Source::Peft => peft::import(&args.input, fingerprint)?,
        _ => torch_pickle::import(&args.input, fingerprint)?,
    };
    let compression = if args.compress {
        Compression::Zstd
    } else {
        Compression::None
    };
    let created = cartridge_formats::time::now_rfc3339();
    imported.write_cart(&args.output, fingerprint, created, compression)?;
    let what = match imported.dims {
        Dims::Kv(d) => format!(
            "KV cartridge, {} tokens ({} frozen)",
            d.tokens, d.frozen_tokens
        ),
        Dims::SoftPrompt(d) => format!("soft prompt, {} embeddings", d.tokens),
    };
    println!(
        "{}: {what}, {}, for {}",
        args.output.display(),
        imported.dtype.name(),
        fingerprint.short()
    );
    Ok(ExitCode::SUCCESS)
}

/// PEFT for a folder or an adapter file; torch for a zip archive (what `torch.save` writes).
fn detect(path: &Path) -> Result<Source, InterchangeError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if path.is_dir() || name == peft::CONFIG_FILE || name == peft::WEIGHTS_FILE {
        return Ok(Source::Peft);
    }
    let mut file = std::fs::File::open(path).map_err(|source| InterchangeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_ok() && magic == *b"PK\x03\x04" {
        return Ok(Source::Torch);
    }
    Err(InterchangeError::Malformed {
        path: path.to_path_buf(),
        message: "neither a PEFT adapter nor a torch.save archive (say which with --from)".into(),
    })
}
