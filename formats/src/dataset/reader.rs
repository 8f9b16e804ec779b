//! Reading a dataset folder: the manifest, the shards in order, records, and summary statistics
//! (what `cartridge inspect DIR` prints and what the trainer iterates).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::error::{DatasetError, Result};
use super::manifest::Manifest;
use super::record::Record;
use super::shard::{self, Scan};

/// Shard file name for number `n`.
pub fn shard_name(n: u64) -> String {
    format!("shard-{n:05}.cds")
}

/// The number of a shard file name, if it is one (`shard-NNNNN.cds`, five or more digits).
pub fn shard_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("shard-")?.strip_suffix(".cds")?;
    if digits.len() < 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The shards of `dir`, in increasing number.
pub fn list_shards(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DatasetError::io(dir, e))? {
        let entry = entry.map_err(|e| DatasetError::io(dir, e))?;
        let name = entry.file_name();
        if let Some(n) = name.to_str().and_then(shard_number) {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// How strict reading is.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Ignore a torn last record of the last shard instead of failing (e.g. to read a dataset
    /// while it is being written, or one whose run was killed and not resumed).
    pub tolerate_torn_tail: bool,
}

/// An open dataset folder.
#[derive(Debug, Clone)]
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<PathBuf>,
    options: ReadOptions,
}

/// Counts over a whole dataset.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Conversations.
    pub records: u64,
    /// Shard files.
    pub shards: u64,
    /// Bytes on disk (shards).
    pub bytes: u64,
    /// Token ids over all records (what training reads).
    pub tokens: u64,
    /// Target (answer) positions over all records.
    pub target_tokens: u64,
    /// Conversations per seed kind.
    pub seed_kinds: BTreeMap<String, u64>,
    /// Distinct chunks.
    pub chunks: u64,
    /// Bytes of a torn tail that was ignored (0 when none).
    pub torn_tail_bytes: u64,
}

impl Dataset {
    /// Open `dir`: read and check the manifest, list the shards. Shards are read lazily.
    pub fn open(dir: &Path, options: ReadOptions) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let shards = list_shards(dir)?.into_iter().map(|(_, p)| p).collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            options,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Shard paths in read order.
    pub fn shards(&self) -> &[PathBuf] {
        &self.shards
    }

    /// Visit every record in order. Checks every frame, the teacher id of every shard, record
    /// layouts, ids against the teacher's vocabulary, and that no conversation id repeats.
    pub fn for_each(&self, f: impl FnMut(Record) -> Result<()>) -> Result<Stats> {
        self.walk(None, f)
    }

    /// The first `n` records (e.g. samples for `inspect --show N`); reads only as far as needed.
    pub fn head(&self, n: usize) -> Result<Vec<Record>> {
        let mut out = Vec::with_capacity(n.min(1024));
        if n > 0 {
            self.walk(Some(n), |r| {
                out.push(r);
                Ok(())
            })?;
        }
        Ok(out)
    }

    fn walk(&self, limit: Option<usize>, mut f: impl FnMut(Record) -> Result<()>) -> Result<Stats> {
        let mut stats = Stats::default();
        let teacher_id = self.manifest.teacher_id();
        let vocab = Some(self.manifest.teacher.vocab_size);
        let mut seen: HashMap<u64, (usize, u64)> = HashMap::new();
        let mut chunks = std::collections::HashSet::new();
        for (i, path) in self.shards.iter().enumerate() {
            let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
            stats.shards += 1;
            stats.bytes += bytes.len() as u64;
            let scan: Scan<'_> = shard::scan(path, &bytes, &teacher_id)?;
            if let Some((offset, reason)) = &scan.torn {
                let last = i + 1 == self.shards.len();
                if !last {
                    return Err(DatasetError::CorruptRecord {
                        path: path.clone(),
                        offset: *offset,
                        reason: format!("{reason}, in a shard that is not the last"),
                    });
                }
                if !self.options.tolerate_torn_tail {
                    return Err(DatasetError::TornTail {
                        path: path.clone(),
                        offset: *offset,
                        reason: reason.clone(),
                    });
                }
                stats.torn_tail_bytes = bytes.len() as u64 - offset;
            }
            for frame in &scan.frames {
                let rec = frame.decode(path, vocab)?;
                if let Some((si, off)) = seen.insert(rec.id, (i, frame.offset)) {
                    return Err(DatasetError::DuplicateId {
                        id: rec.id,
                        first: format!("{} offset {off}", self.shards[si].display()),
                        second: format!("{} offset {}", path.display(), frame.offset),
                    });
                }
                stats.records += 1;
                stats.tokens += rec.tokens.len() as u64;
                stats.target_tokens += rec.num_targets() as u64;
                *stats.seed_kinds.entry(rec.seed_kind.clone()).or_default() += 1;
                chunks.insert(rec.location.chunk);
                f(rec)?;
                if limit.is_some_and(|l| stats.records as usize >= l) {
                    stats.chunks = chunks.len() as u64;
                    return Ok(stats);
                }
            }
        }
        stats.chunks = chunks.len() as u64;
        Ok(stats)
    }

    /// Every record, in order (loads them all; use [`Dataset::for_each`] to stream).
    pub fn records(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        self.for_each(|r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// Counts, token totals and the seed-kind histogram (reads every record).
    pub fn stats(&self) -> Result<Stats> {
        self.for_each(|_| Ok(()))
    }
}
