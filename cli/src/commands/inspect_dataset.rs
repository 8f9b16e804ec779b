//! `cartridge inspect DIR` for a self-study dataset folder: manifest, counts, tokens, seed-kind
//! histogram, and the first conversations with `--show N`.

use std::path::{Path, PathBuf};

use cartridge_formats::dataset::{Dataset, ReadOptions, Record, Stats};
use serde_json::{json, Value};

use crate::output::human_bytes;

/// What inspecting a dataset found.
pub struct Report {
    path: PathBuf,
    dataset: Dataset,
    stats: Stats,
    samples: Vec<Record>,
}

/// Read a dataset's manifest and every record (checking each), plus `show` samples.
pub fn inspect(dir: &Path, show: usize) -> anyhow::Result<Report> {
    // A torn tail (a run killed mid-write) is reported, not fatal: `synthesize --resume` drops it.
    let dataset = Dataset::open(
        dir,
        ReadOptions {
            tolerate_torn_tail: true,
        },
    )?;
    let stats = dataset.stats()?;
    let samples = if show > 0 {
        dataset.head(show)?
    } else {
        Vec::new()
    };
    Ok(Report {
        path: dir.to_path_buf(),
        dataset,
        stats,
        samples,
    })
}

impl Report {
    /// Human-readable summary on stdout.
    pub fn print(&self) {
        let m = self.dataset.manifest();
        let s = &self.stats;
        println!("{}: self-study dataset", self.path.display());
        println!("  teacher    {}", m.teacher.short());
        println!("  corpus     {}", m.corpus_digest);
        println!("  created    {}", m.created);
        println!(
            "  records    {} conversations over {} chunks, {} shards, {} on disk",
            s.records,
            s.chunks,
            s.shards,
            human_bytes(s.bytes)
        );
        println!(
            "  tokens     {} in total, {} answer (target) tokens",
            s.tokens, s.target_tokens
        );
        let kinds: Vec<String> = s
            .seed_kinds
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("  seed kinds {}", kinds.join(", "));
        if s.torn_tail_bytes > 0 {
            println!(
                "  torn tail  {} bytes of an interrupted write (dropped by `synthesize --resume`)",
                s.torn_tail_bytes
            );
        }
        for r in &self.samples {
            println!(
                "\n--- conversation {} ({}, chunk {})",
                r.id, r.seed_kind, r.location.chunk
            );
            for msg in &r.messages {
                println!("[{}] {}", msg.role, msg.content.trim());
            }
        }
    }

    /// The same as one JSON object.
    pub fn to_json(&self) -> Value {
        let m = self.dataset.manifest();
        let s = &self.stats;
        json!({
            "path": self.path.display().to_string(),
            "ok": true,
            "kind": "dataset",
            "teacher": m.teacher,
            "corpus_digest": m.corpus_digest,
            "created": m.created,
            "settings": m.settings,
            "records": s.records,
            "chunks": s.chunks,
            "shards": s.shards,
            "bytes": s.bytes,
            "tokens": s.tokens,
            "target_tokens": s.target_tokens,
            "seed_kinds": s.seed_kinds,
            "torn_tail_bytes": s.torn_tail_bytes,
            "samples": self.samples.iter().map(|r| json!({
                "id": r.id,
                "seed_kind": r.seed_kind,
                "chunk": r.location.chunk,
                "messages": r.messages,
            })).collect::<Vec<_>>(),
        })
    }
}
