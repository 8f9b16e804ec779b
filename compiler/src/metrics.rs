//! Metrics as JSON lines next to the output: one object per training step, held-out evaluation
//! and checkpoint. On resume the lines past the checkpoint's step are dropped first, so a resumed
//! run's file reads like an uninterrupted one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An append-only JSONL writer.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Start a fresh log (truncating), or continue one after `resume_step`, keeping only the lines
    /// whose `step` is at most that.
    pub fn open(path: &Path, resume_step: Option<usize>) -> Result<Self> {
        let io = |e| Error::io(path, e);
        if let Some(step) = resume_step {
            let kept: String = match std::fs::read_to_string(path) {
                Ok(text) => text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<serde_json::Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                            .is_some_and(|s| s as usize <= step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(io(e)),
            };
            std::fs::write(path, kept).map_err(io)?;
        } else {
            std::fs::write(path, b"").map_err(io)?;
        }
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Append one record.
    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{value}").map_err(|e| Error::io(&self.path, e))
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
