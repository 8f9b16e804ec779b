//! `cartridge inspect PATH...`: a summary of each `.cart` (optionally verified) or self-study
//! dataset folder (counts, tokens, seed kinds, `--show N` samples).
//!
//! Exit 0 when every file is good, 2 when any is not (one line per bad file on stderr, saying what
//! is wrong and where).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cartridge_formats::cart::{CartFile, Compression, Dims, Header};
use serde_json::json;

use super::inspect_dataset as dataset;
use crate::output::human_bytes;
use crate::EXIT_BAD_INPUT;

/// Options of `cartridge inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `.cart` files or dataset folders (from `cartridge synthesize`) to inspect.
    #[arg(required = true, value_name = "PATH")]
    files: Vec<PathBuf>,
    /// For a dataset folder, also print the first N conversations.
    #[arg(long, value_name = "N", default_value_t = 0)]
    show: usize,
    /// Also check every checksum (payload and each tensor).
    #[arg(long)]
    verify: bool,
    /// Print one JSON array (an object per file) instead of text.
    #[arg(long)]
    json: bool,
}

/// What inspecting one file found.
struct Report {
    path: PathBuf,
    outcome: Result<(Summary, bool), String>,
}

struct Summary {
    header: Header,
    file_len: u64,
}

fn inspect_one(path: &Path, verify: bool) -> Result<(Summary, bool), String> {
    if path.is_dir() {
        return Err(format!("{}: is a folder", path.display()));
    }
    let file = CartFile::open(path).map_err(|e| e.to_string())?;
    if verify {
        file.verify().map_err(|e| e.to_string())?;
    }
    Ok((
        Summary {
            header: file.header().clone(),
            file_len: file.file_len(),
        },
        verify,
    ))
}

/// Run the subcommand.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (dirs, files): (Vec<PathBuf>, Vec<PathBuf>) =
        args.files.iter().cloned().partition(|p| p.is_dir());
    let mut any_bad = false;
    let mut json_items = Vec::new();
    for dir in &dirs {
        match dataset::inspect(dir, args.show) {
            Ok(report) => {
                if args.json {
                    json_items.push(report.to_json());
                } else {
                    report.print();
                }
            }
            Err(e) => {
                any_bad = true;
                if args.json {
                    json_items.push(json!({ "path": dir.display().to_string(), "ok": false, "error": e.to_string() }));
                }
                eprintln!("error: {e}");
            }
        }
    }
    let args = Args { files, ..args };
    let reports: Vec<Report> = args
        .files
        .iter()
        .map(|path| Report {
            path: path.clone(),
            outcome: inspect_one(path, args.verify),
        })
        .collect();
    any_bad |= reports.iter().any(|r| r.outcome.is_err());
    if args.json {
        json_items.extend(reports.iter().map(to_json));
        println!("{}", serde_json::to_string_pretty(&json_items)?);
    } else {
        for r in &reports {
            if let Ok((s, verified)) = &r.outcome {
                print_text(&r.path, s, *verified);
            }
        }
    }
    for r in &reports {
        if let Err(e) = &r.outcome {
            // CartFile errors already start with the path.
            eprintln!("error: {e}");
        }
    }
    Ok(if any_bad {
        ExitCode::from(EXIT_BAD_INPUT)
    } else {
        ExitCode::SUCCESS
    })
}

fn dims_text(dims: &Dims) -> String {
    match dims {
        Dims::Kv(d) => format!(
            "{} layers x {} KV heads x {} head dim, {} tokens ({} frozen){}",
            d.layers,
            d.kv_heads,
            d.head_dim,
            d.tokens,
            d.frozen_tokens,
            if d.biased {
                ", a logit bias per slot"
            } else {
                ""
            }
        ),
        Dims::SoftPrompt(d) => format!("{} embeddings x {} hidden", d.tokens, d.hidden),
    }
}

fn print_text(path: &Path, s: &Summary, verified: bool) {
    let h = &s.header;
    let kind = match h.dims {
        Dims::Kv(_) => "KV cartridge",
        Dims::SoftPrompt(_) => "soft prompt",
    };
    println!("{}: {kind}", path.display());
    println!("  model      {}", h.model.short());
    println!("  dims       {}", dims_text(&h.dims));
    println!("  dtype      {}", h.dtype.name());
    let codec = match h.payload.compression {
        Compression::None => "uncompressed, zero-copy",
        Compression::Zstd => "zstd",
    };
    println!(
        "  size       {} on disk ({codec}), {} in memory",
        human_bytes(s.file_len),
        human_bytes(h.memory_bytes())
    );
    let p = &h.provenance;
    println!("  created    {} by {}", non_empty(&p.created), p.tool);
    if let Some(c) = &p.corpus_digest {
        println!("  corpus     {c}");
    }
    if p.training.as_object().is_some_and(|o| !o.is_empty()) {
        println!("  training   {}", p.training);
    }
    for (k, v) in &p.metadata {
        println!("  meta       {k} = {v}");
    }
    if let Some(summary) = &h.summary {
        println!("  summary    {summary}");
    }
    if verified {
        println!(
            "  verified   header, payload and {} tensor checksums OK",
            h.tensors.len()
        );
    }
}

fn non_empty(s: &str) -> &str {
    if s.is_empty() {
        "(unknown time)"
    } else {
        s
    }
}

fn to_json(r: &Report) -> serde_json::Value {
    let path = r.path.display().to_string();
    match &r.outcome {
        Err(e) => json!({ "path": path, "ok": false, "error": e }),
        Ok((s, verified)) => {
            let h = &s.header;
            let dims = match &h.dims {
                Dims::Kv(d) => serde_json::to_value(d),
                Dims::SoftPrompt(d) => serde_json::to_value(d),
            }
            .unwrap_or_default();
            json!({
                "path": path,
                "ok": true,
                "kind": h.kind().name(),
                "dtype": h.dtype.name(),
                "dims": dims,
                "model": h.model,
                "provenance": h.provenance,
                "summary": h.summary,
                "tensors": h.tensors.len(),
                "file_bytes": s.file_len,
                "memory_bytes": h.memory_bytes(),
                "compression": h.payload.compression,
                "verified": verified,
            })
        }
    }
}
