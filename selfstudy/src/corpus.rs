//! Corpus ingestion: a file or a folder walked recursively (honouring `.gitignore` and exclude
//! globs), text kept as UTF-8 with relative paths and file boundaries, binary files skipped and
//! counted, and a stable digest over paths and contents.

use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Default cap on the corpus's total text: 256 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

/// Bytes inspected to tell text from binary (as git and ripgrep do: a NUL byte means binary).
const SNIFF_BYTES: usize = 8192;

/// What to do with text files that are not valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidUtf8 {
    /// Fail, naming every such file (the default: nothing is silently altered).
    #[default]
    Error,
    /// Skip them and list them in [`Corpus::invalid_utf8`].
    Skip,
    /// Decode with U+FFFD replacement and list them in [`Corpus::invalid_utf8`].
    Lossy,
}

/// How to read a corpus.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Globs (matched against `/`-separated paths relative to the corpus root, and against every
    /// parent folder) of files and folders to leave out.
    pub exclude: Vec<String>,
    /// Honour `.gitignore`, `.ignore` and `.git/info/exclude` files (also outside a git repo).
    pub gitignore: bool,
    /// Include hidden files and folders (names starting with `.`); `.git` is always skipped.
    pub hidden: bool,
    /// Invalid UTF-8 handling.
    pub invalid_utf8: InvalidUtf8,
    /// Cap on the total bytes of text.
    pub max_bytes: u64,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            exclude: Vec::new(),
            gitignore: true,
            hidden: false,
            invalid_utf8: InvalidUtf8::Error,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// One text file of the corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorpusFile {
    /// Path relative to the corpus root, `/`-separated (the file name for a single-file corpus).
    pub path: String,
    /// Its text.
    pub text: String,
}

/// A corpus ready for tokenisation.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Where it was read from.
    pub root: PathBuf,
    /// Text files in path order.
    pub files: Vec<CorpusFile>,
    /// Binary files skipped.
    pub skipped_binary: usize,
    /// Files with invalid UTF-8 that were skipped or decoded lossily: `(path, first bad byte)`.
    pub invalid_utf8: Vec<(String, usize)>,
    /// `sha256:<hex>` over paths and contents (see [`digest`]).
    pub digest: String,
}

impl Corpus {
    /// Total bytes of text.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.text.len() as u64).sum()
    }

    /// Build a corpus from in-memory files (sorted by path; used by tests and embedders).
    pub fn from_files(root: impl Into<PathBuf>, mut files: Vec<CorpusFile>) -> Result<Self> {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let root = root.into();
        if files.iter().all(|f| f.text.is_empty()) {
            return Err(Error::EmptyCorpus {
                path: root,
                detail: "no text".into(),
            });
        }
        let digest = digest(&files);
        Ok(Self {
            root,
            files,
            skipped_binary: 0,
            invalid_utf8: Vec::new(),
            digest,
        })
    }
}

/// `sha256:<hex>` over, for each file in path order, the path's length (u64 LE), the path, the
/// text's length (u64 LE) and the text. Renaming, moving, editing or adding a file changes it;
/// where the corpus lives on disk does not.
pub fn digest(files: &[CorpusFile]) -> String {
    let mut h = Sha256::new();
    h.update(b"cartridge-corpus-v1");
    for f in files {
        h.update((f.path.len() as u64).to_le_bytes());
        h.update(f.path.as_bytes());
        h.update((f.text.len() as u64).to_le_bytes());
        h.update(f.text.as_bytes());
    }
    format!(
        "sha256:{}",
        cartridge_formats::fingerprint::hex(&h.finalize())
    )
}

/// Whether bytes look binary: a NUL byte in the first 8 KiB.
pub fn looks_binary(bytes: &[u8]) -> bool {
    bytes[..bytes.len().min(SNIFF_BYTES)].contains(&0)
}

fn build_excludes(globs: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob = Glob::new(g).map_err(|e| Error::BadGlob {
            glob: g.clone(),
            message: e.to_string(),
        })?;
        b.add(glob);
    }
    b.build().map_err(|e| Error::BadGlob {
        glob: globs.join(" "),
        message: e.to_string(),
    })
}

/// Whether `rel` or any of its parent folders matches an exclude glob.
fn excluded(set: &GlobSet, rel: &str) -> bool {
    if set.is_empty() {
        return false;
    }
    let mut prefix = String::new();
    for (i, part) in rel.split('/').enumerate() {
        if i > 0 {
            prefix.push('/');
        }
        prefix.push_str(part);
        if set.is_match(&prefix) || set.is_match(part) {
            return true;
        }
    }
    false
}

/// `/`-separated path of `path` relative to `root`.
fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Read a corpus: `path` is a file or a folder.
pub fn ingest(path: &Path, options: &IngestOptions) -> Result<Corpus> {
    if !path.exists() {
        return Err(Error::CorpusNotFound(path.to_path_buf()));
    }
    let excludes = build_excludes(&options.exclude)?;
    let mut candidates: Vec<(String, PathBuf)> = Vec::new();
    if path.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        candidates.push((name, path.to_path_buf()));
    } else {
        let root = path.to_path_buf();
        let filter_root = root.clone();
        let filter_set = excludes.clone();
        let walker = ignore::WalkBuilder::new(path)
            .standard_filters(false)
            .hidden(!options.hidden)
            .git_ignore(options.gitignore)
            .git_exclude(options.gitignore)
            .ignore(options.gitignore)
            .parents(options.gitignore)
            .require_git(false)
            .follow_links(false)
            .sort_by_file_name(|a, b| a.cmp(b))
            .filter_entry(move |e| {
                if e.file_name() == ".git" {
                    return false;
                }
                let rel = relative(&filter_root, e.path());
                rel.is_empty() || !excluded(&filter_set, &rel)
            })
            .build();
        for entry in walker {
            let entry = entry.map_err(|e| Error::Walk(e.to_string()))?;
            if entry.file_type().is_some_and(|t| t.is_file()) {
                candidates.push((relative(&root, entry.path()), entry.into_path()));
            }
        }
    }
    candidates.sort();

    let mut files = Vec::new();
    let mut skipped_binary = 0;
    let mut invalid = Vec::new();
    let mut total = 0u64;
    for (rel, full) in candidates {
        let bytes = std::fs::read(&full).map_err(|e| Error::io(&full, e))?;
        if looks_binary(&bytes) {
            skipped_binary += 1;
            continue;
        }
        total += bytes.len() as u64;
        if total > options.max_bytes {
            return Err(Error::CorpusTooLarge {
                path: path.to_path_buf(),
                cap: options.max_bytes,
                at: rel,
            });
        }
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                invalid.push((rel.clone(), at));
                match options.invalid_utf8 {
                    InvalidUtf8::Error | InvalidUtf8::Skip => continue,
                    InvalidUtf8::Lossy => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                }
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        files.push(CorpusFile { path: rel, text });
    }
    if options.invalid_utf8 == InvalidUtf8::Error && !invalid.is_empty() {
        return Err(Error::InvalidUtf8 { files: invalid });
    }
    if files.is_empty() {
        let mut why = vec!["no text files found".to_string()];
        if skipped_binary > 0 {
            why.push(format!("{skipped_binary} binary file(s) skipped"));
        }
        if !invalid.is_empty() {
            why.push(format!("{} non-UTF-8 file(s) skipped", invalid.len()));
        }
        return Err(Error::EmptyCorpus {
            path: path.to_path_buf(),
            detail: why.join(", "),
        });
    }
    let digest = digest(&files);
    Ok(Corpus {
        root: path.to_path_buf(),
        files,
        skipped_binary,
        invalid_utf8: invalid,
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_match_files_and_parent_folders() {
        let set = build_excludes(&["target".into(), "*.lock".into(), "docs/private/**".into()])
            .expect("globs");
        assert!(excluded(&set, "target/debug/x.rs"));
        assert!(excluded(&set, "a/Cargo.lock"));
        assert!(excluded(&set, "docs/private/a.md"));
        assert!(!excluded(&set, "docs/public/a.md"));
        assert!(!excluded(&set, "src/target_x.rs"));
    }

    #[test]
    fn digest_depends_on_paths_and_contents() {
        let f = |p: &str, t: &str| CorpusFile {
            path: p.into(),
            text: t.into(),
        };
        let a = digest(&[f("a", "xy")]);
        assert_ne!(a, digest(&[f("b", "xy")]));
        assert_ne!(a, digest(&[f("a", "xz")]));
        // Boundaries matter: ("a","bc") is not ("ab","c").
        assert_ne!(digest(&[f("a", "bc")]), digest(&[f("ab", "c")]));
    }
}
