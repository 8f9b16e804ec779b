//! Count a corpus's tokens with a model's own tokenizer, file by file.
//!
//! ```sh
//! cargo run --release -p cartridge-examples --example count_tokens -- examples/corpora/quenmar [MODEL.gguf]
//! ```
//!
//! A corpus's size in tokens decides whether it fits the model's window (in-context learning) and
//! how much a cartridge of `p` tokens has to compress it; word counts are a poor guide because
//! numbers and names split into many tokens. Only the tokenizer is read, not the weights.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cartridge_runtime::gguf::GgufFile;
use cartridge_runtime::loader;
use cartridge_runtime::tokenizer::Tokenizer;

/// The files of `path`: itself, or the files directly inside it (sorted by name).
fn files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
        let p = entry?.path();
        if p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(corpus) = args.first().map(PathBuf::from) else {
        bail!("usage: count_tokens CORPUS [MODEL.gguf]");
    };
    let model = loader::resolve_model_path(args.get(1).map(Path::new))?;
    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&model)?)?;
    let mut total = 0;
    for f in files(&corpus)? {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let n = tokenizer.encode(&text, false)?.len();
        println!("{n:>7}  {}", f.display());
        total += n;
    }
    println!("{total:>7}  total");
    Ok(())
}
