//! Exclusive lock files: one process at a time writes a dataset folder, or trains into one output.
//!
//! The lock is the operating system's advisory file lock (`flock`), held through an open file, so
//! it is released when the process ends however it ends: a killed holder leaves nothing stale. The
//! holder writes its process id into the file for the message a refused process prints.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// A held lock; dropping it releases the lock (and removes the file when asked to).
#[derive(Debug)]
pub struct LockFile {
    path: PathBuf,
    remove_on_drop: bool,
    // Closed, and so unlocked, only after `Drop::drop` has removed the path.
    _file: File,
}

/// What [`try_lock`] found.
#[derive(Debug)]
pub enum Acquired {
    /// The lock is ours until the value is dropped.
    Held(LockFile),
    /// Another process holds it; its id when the file names one.
    Busy {
        /// The holder's process id.
        holder: Option<u32>,
    },
    /// The file system cannot lock: the caller runs unguarded, as before locks existed.
    Unsupported,
}

impl Acquired {
    /// The lock when held (`None` where the file system cannot lock), else the holder's id.
    pub fn held(self) -> Result<Option<LockFile>, Option<u32>> {
        match self {
            Acquired::Held(lock) => Ok(Some(lock)),
            Acquired::Busy { holder } => Err(holder),
            Acquired::Unsupported => Ok(None),
        }
    }
}

/// Take the exclusive lock on `path` (created if missing) without waiting.
///
/// With `remove_on_drop` the file is deleted when the lock is released, so it leaves no litter
/// next to a user's files. A process that opened the file just before it was deleted could then
/// lock the deleted file while a third locks a new one; to rule that out, a lock is only taken on
/// the file that `path` still names (checked after locking, retried otherwise).
pub fn try_lock(path: &Path, remove_on_drop: bool) -> std::io::Result<Acquired> {
    // Each retry means another process removed the file between our open and our lock; a handful
    // covers any real interleaving.
    for _ in 0..16 {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Ok(Acquired::Busy { holder });
            }
            Err(TryLockError::Error(e)) if e.kind() == ErrorKind::Unsupported => {
                return Ok(Acquired::Unsupported)
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        if !still_named_by(&file, path) {
            continue;
        }
        // The id is only for the message a refused process prints; failing to write it is harmless.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        return Ok(Acquired::Held(LockFile {
            path: path.to_path_buf(),
            remove_on_drop,
            _file: file,
        }));
    }
    Err(std::io::Error::other(format!(
        "{}: the lock file keeps being replaced by another process",
        path.display()
    )))
}

/// Whether `path` still names the file `file` has open (it may have been removed by a holder
/// releasing its lock after we opened it).
#[cfg(unix)]
fn still_named_by(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn still_named_by(_file: &File, path: &Path) -> bool {
    path.exists()
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Removed while still locked, so no other process can lock this file and then lose it.
        if self.remove_on_drop {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_taker_is_refused_with_the_holders_id_and_can_take_it_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let Acquired::Held(held) = try_lock(&path, true).unwrap() else {
            panic!("the first taker must get the lock")
        };
        // flock is per open file, so a second open in the same process is refused like another
        // process would be.
        match try_lock(&path, true).unwrap() {
            Acquired::Busy { holder } => assert_eq!(holder, Some(std::process::id())),
            other => panic!("expected Busy, got {other:?}"),
        }
        drop(held);
        assert!(!path.exists(), "remove_on_drop leaves no file behind");
        let Acquired::Held(again) = try_lock(&path, false).unwrap() else {
            panic!("a released lock can be taken again")
        };
        drop(again);
        assert!(path.exists(), "without remove_on_drop the file stays");
    }
}
