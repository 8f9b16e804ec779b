//! Writing a dataset folder: create with a manifest, append records to size-capped shards, and
//! resume after a crash without losing or duplicating a conversation (SPEC.md D5).

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use super::error::{DatasetError, Result};
use super::manifest::{Manifest, MANIFEST_FILE};
use super::reader::{list_shards, shard_name};
use super::record::Record;
use super::shard::{self, ShardWriter};
use crate::fingerprint::ModelFingerprint;
use crate::lock::{self, LockFile};

/// Default shard size cap: a new shard starts once the current one is larger.
pub const DEFAULT_SHARD_BYTES: u64 = 64 << 20;

/// The file whose exclusive lock marks a dataset folder as being written (SPEC.md D5).
pub const WRITER_LOCK_FILE: &str = "writer.lock";

/// What was found when resuming.
#[derive(Debug, Clone, Default)]
pub struct ResumeState {
    /// Conversation ids already stored.
    pub ids: BTreeSet<u64>,
    /// Bytes of a torn last record that were truncated away (0 when none).
    pub dropped_torn_bytes: u64,
    /// Target tokens already stored.
    pub target_tokens: u64,
}

/// Appends records to a dataset folder.
#[derive(Debug)]
pub struct DatasetWriter {
    dir: PathBuf,
    manifest: Manifest,
    teacher_id: [u8; 32],
    shard_cap: u64,
    next_shard: u64,
    current: Option<ShardWriter>,
    records: u64,
    /// Held for the writer's life: a second writer would truncate the shard this one appends to
    /// as a "torn tail" and write the same conversation ids again.
    _lock: Option<LockFile>,
}

impl DatasetWriter {
    /// Create a new dataset in `dir` (created if missing). Refuses a folder that already holds a
    /// manifest or shards.
    pub fn create(dir: &Path, manifest: Manifest) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| DatasetError::io(dir, e))?;
        let lock = lock_writer(dir)?;
        if dir.join(MANIFEST_FILE).exists() || !list_shards(dir)?.is_empty() {
            return Err(DatasetError::AlreadyExists {
                dir: dir.to_path_buf(),
            });
        }
        manifest.write(dir)?;
        Ok(Self::new(dir, manifest, 0, lock))
    }

    /// Reopen `dir` to append: refuse another teacher or corpus, truncate a torn tail of the
    /// last shard, collect the ids present. New records go to a new shard. Refused while another
    /// writer holds the folder.
    pub fn resume(
        dir: &Path,
        teacher: &ModelFingerprint,
        corpus_digest: &str,
    ) -> Result<(Self, ResumeState)> {
        let manifest = Manifest::read(dir)?;
        let lock = lock_writer(dir)?;
        manifest.check_teacher(teacher)?;
        if manifest.corpus_digest != corpus_digest {
            return Err(DatasetError::Manifest {
                path: dir.join(MANIFEST_FILE),
                message: format!(
                    "the dataset was made from corpus {}, this corpus is {corpus_digest}: \
                     resume with the same corpus, or start a new dataset",
                    manifest.corpus_digest
                ),
            });
        }
        let teacher_id = manifest.teacher_id();
        let shards = list_shards(dir)?;
        let mut state = ResumeState::default();
        for (i, (_, path)) in shards.iter().enumerate() {
            let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
            let scan = shard::scan(path, &bytes, &teacher_id)?;
            if let Some((offset, reason)) = &scan.torn {
                if i + 1 != shards.len() {
                    return Err(DatasetError::CorruptRecord {
                        path: path.clone(),
                        offset: *offset,
                        reason: format!("{reason}, in a shard that is not the last"),
                    });
                }
                state.dropped_torn_bytes = bytes.len() as u64 - offset;
            }
            for frame in &scan.frames {
                let rec = frame.decode(path, Some(manifest.teacher.vocab_size))?;
                if !state.ids.insert(rec.id) {
                    return Err(DatasetError::DuplicateId {
                        id: rec.id,
                        first: "an earlier record".into(),
                        second: format!("{} offset {}", path.display(), frame.offset),
                    });
                }
                state.target_tokens += rec.num_targets() as u64;
            }
            match scan.torn {
                // The writer died creating this shard: remove it, or it would become a torn
                // shard that is no longer the last one.
                Some((0, _)) => {
                    std::fs::remove_file(path).map_err(|e| DatasetError::io(path, e))?
                }
                Some((offset, _)) => truncate(path, offset)?,
                None => {}
            }
        }
        let next = shards.last().map_or(0, |(n, _)| n + 1);
        let mut w = Self::new(dir, manifest, next, lock);
        w.records = state.ids.len() as u64;
        Ok((w, state))
    }

    fn new(dir: &Path, manifest: Manifest, next_shard: u64, lock: Option<LockFile>) -> Self {
        let teacher_id = manifest.teacher_id();
        Self {
            dir: dir.to_path_buf(),
            manifest,
            teacher_id,
            shard_cap: DEFAULT_SHARD_BYTES,
            next_shard,
            current: None,
            records: 0,
            _lock: lock,
        }
    }

    /// Start a new shard once the current one exceeds `bytes`.
    pub fn with_shard_cap(mut self, bytes: u64) -> Self {
        self.shard_cap = bytes.max(1);
        self
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Records in the dataset (including those found on resume).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Append one record (checked against the teacher's vocabulary first).
    pub fn append(&mut self, record: &Record) -> Result<()> {
        record
            .validate(Some(self.manifest.teacher.vocab_size))
            .map_err(DatasetError::InvalidRecord)?;
        let full = self
            .current
            .as_ref()
            .is_some_and(|s| s.len() >= self.shard_cap);
        if full {
            self.sync()?;
            self.current = None;
        }
        if self.current.is_none() {
            let path = self.dir.join(shard_name(self.next_shard));
            self.current = Some(ShardWriter::create(&path, &self.teacher_id)?);
            self.next_shard += 1;
            // Make the new directory entry durable.
            if let Ok(d) = std::fs::File::open(&self.dir) {
                let _ = d.sync_all();
            }
        }
        if let Some(s) = self.current.as_mut() {
            s.append(record)?;
        }
        self.records += 1;
        Ok(())
    }

    /// Flush the current shard to stable storage.
    pub fn sync(&mut self) -> Result<()> {
        match self.current.as_mut() {
            Some(s) => s.sync(),
            None => Ok(()),
        }
    }
}

/// Take the exclusive lock on `dir`'s [`WRITER_LOCK_FILE`] (kept in the folder; SPEC.md D5).
/// `None` where the file system cannot lock (the writer then runs unguarded, as before locks
/// existed).
fn lock_writer(dir: &Path) -> Result<Option<LockFile>> {
    let path = dir.join(WRITER_LOCK_FILE);
    let acquired = lock::try_lock(&path, false).map_err(|e| DatasetError::io(&path, e))?;
    acquired.held().map_err(|holder| DatasetError::Busy {
        dir: dir.to_path_buf(),
        holder,
    })
}

fn truncate(path: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| DatasetError::io(path, e))?;
    f.set_len(len).map_err(|e| DatasetError::io(path, e))?;
    f.sync_all().map_err(|e| DatasetError::io(path, e))
}
