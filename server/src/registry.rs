//! The served cartridge folder: request ids resolve only to `.cart` files directly inside it,
//! each file is verified (checksums, model fingerprint) once when first used, shared by every
//! request through an [`Arc`], and evicted least-recently-used when the loaded bytes pass a
//! budget. Requests in flight keep their `Arc`, so eviction never pulls data from under them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use cartridge_formats::cart::{CartFile, Kind};
use cartridge_formats::ModelFingerprint;
use cartridge_runtime::cartridge_file::{load_cartridge, load_soft_prompt};
use cartridge_runtime::PrefixKv;

use crate::error::ApiError;

/// Longest accepted id.
const MAX_ID_LEN: usize = 200;

/// A loaded, verified file.
#[derive(Debug, Clone)]
pub enum Loaded {
    /// A KV cartridge.
    Cartridge(Arc<PrefixKv>),
    /// A soft prompt `[n, hidden]` and its summary text.
    SoftPrompt(Arc<Tensor>, Option<String>),
}

impl Loaded {
    /// Bytes held in memory.
    pub fn bytes(&self) -> u64 {
        let elems = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        match self {
            Loaded::Cartridge(kv) => kv.layers().iter().map(|(k, v)| elems(k) + elems(v)).sum(),
            Loaded::SoftPrompt(t, _) => elems(t),
        }
    }
}

struct Entry {
    loaded: Loaded,
    bytes: u64,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    clock: u64,
    bytes: u64,
    loads: u64,
    evictions: u64,
}

/// Counts for `/metrics` and `/v1/cartridges`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RegistryStats {
    /// Files in memory.
    pub loaded: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Files loaded (and verified) since start.
    pub loads: u64,
    /// Files evicted since start.
    pub evictions: u64,
}

/// One `.cart` file of the folder, as listed by `/v1/cartridges`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listing {
    /// The id requests use.
    pub id: String,
    /// `kv` or `soft_prompt` (absent when the header does not parse).
    pub kind: Option<&'static str>,
    /// Prefix tokens it adds.
    pub tokens: Option<u32>,
    /// Size of the file.
    pub file_bytes: u64,
    /// Whether it is in memory now.
    pub loaded: bool,
}

/// The folder of servable cartridges; see the module docs.
pub struct Registry {
    dir: PathBuf,
    model: ModelFingerprint,
    device: Device,
    budget: u64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("dir", &self.dir)
            .field("budget", &self.budget)
            .finish()
    }
}

/// Whether `id` is a plain file name: no separators, no `..`, no leading dot, printable ASCII
/// from a small set. Anything else is refused before the file system is touched.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && !id.contains("..")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Registry {
    /// Serve the `.cart` files of `dir` for `model`, keeping at most about `budget` bytes loaded
    /// (a single file larger than the budget is still served, alone).
    pub fn new(
        dir: &Path,
        model: ModelFingerprint,
        device: Device,
        budget: u64,
    ) -> std::io::Result<Self> {
        let dir = dir.canonicalize()?;
        if !dir.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("{} is not a folder", dir.display()),
            ));
        }
        Ok(Self {
            dir,
            model,
            device,
            budget,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The served folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `id` (`name` or `name.cart`), checked to be a regular file inside the folder
    /// after following links.
    fn path_of(&self, param: &str, id: &str) -> Result<PathBuf, ApiError> {
        if !valid_id(id) {
            return Err(ApiError::invalid_param(
                param,
                format!("invalid cartridge id {id:?}: use the file name of a .cart in the served folder"),
            ));
        }
        let name = if id.ends_with(".cart") {
            id.to_string()
        } else {
            format!("{id}.cart")
        };
        let not_found = || {
            ApiError::not_found(
                param,
                "cartridge_not_found",
                format!("no cartridge {id:?} in the served folder"),
            )
        };
        let path = self
            .dir
            .join(name)
            .canonicalize()
            .map_err(|_| not_found())?;
        if path.parent() != Some(self.dir.as_path()) || !path.is_file() {
            return Err(not_found());
        }
        Ok(path)
    }

    /// The loaded file of `id`, verifying and loading it on first use (blocking: call from a
    /// blocking thread). `param` names the request field for errors; `want` the kind required.
    pub fn get(&self, param: &str, id: &str, want: Kind) -> Result<Loaded, ApiError> {
        let path = self.path_of(param, id)?;
        let key = path.to_string_lossy().into_owned();
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| ApiError::internal("cartridge registry lock poisoned"))?;
        inner.clock += 1;
        let now = inner.clock;
        if let Some(e) = inner.entries.get_mut(&key) {
            e.last_used = now;
            return check_kind(param, id, e.loaded.clone(), want);
        }
        // Loading under the lock: each file is read and verified exactly once, even when many
        // requests ask for it at the same moment.
        let refused = |e: cartridge_runtime::Error| {
            ApiError::invalid_param(param, format!("cartridge {id:?} cannot be used: {e}"))
        };
        let kind = CartFile::open(&path)
            .map_err(|e| refused(e.into()))?
            .header()
            .kind();
        let loaded = match kind {
            Kind::Kv => Loaded::Cartridge(Arc::new(
                load_cartridge(&path, &self.model, &self.device).map_err(refused)?,
            )),
            Kind::SoftPrompt => {
                let sp = load_soft_prompt(&path, &self.model, &self.device).map_err(refused)?;
                Loaded::SoftPrompt(Arc::new(sp.embeddings), sp.summary)
            }
        };
        let bytes = loaded.bytes();
        inner.loads += 1;
        inner.bytes += bytes;
        inner.entries.insert(
            key.clone(),
            Entry {
                loaded: loaded.clone(),
                bytes,
                last_used: now,
            },
        );
        evict(&mut inner, self.budget, &key);
        check_kind(param, id, loaded, want)
    }

    /// Counts for metrics.
    pub fn stats(&self) -> RegistryStats {
        match self.inner.lock() {
            Ok(i) => RegistryStats {
                loaded: i.entries.len(),
                bytes: i.bytes,
                loads: i.loads,
                evictions: i.evictions,
            },
            Err(_) => RegistryStats::default(),
        }
    }

    /// The `.cart` files of the folder, sorted by id.
    pub fn list(&self) -> std::io::Result<Vec<Listing>> {
        let loaded: Vec<String> = match self.inner.lock() {
            Ok(i) => i.entries.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(id) = name.strip_suffix(".cart") else {
                continue;
            };
            if !valid_id(name) || !path.is_file() {
                continue;
            }
            let header = CartFile::open(&path).ok().map(|f| {
                let h = f.header();
                let tokens = match h.dims {
                    cartridge_formats::cart::Dims::Kv(d) => d.tokens,
                    cartridge_formats::cart::Dims::SoftPrompt(d) => d.tokens,
                };
                (h.kind(), tokens)
            });
            let key = path
                .canonicalize()
                .map(|p| p.to_string_lossy().into_owned());
            out.push(Listing {
                id: id.to_string(),
                kind: header.map(|(k, _)| match k {
                    Kind::Kv => "kv",
                    Kind::SoftPrompt => "soft_prompt",
                }),
                tokens: header.map(|(_, t)| t),
                file_bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                loaded: key.map(|k| loaded.contains(&k)).unwrap_or(false),
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

fn check_kind(param: &str, id: &str, loaded: Loaded, want: Kind) -> Result<Loaded, ApiError> {
    let ok = matches!(
        (&loaded, want),
        (Loaded::Cartridge(_), Kind::Kv) | (Loaded::SoftPrompt(..), Kind::SoftPrompt)
    );
    if ok {
        Ok(loaded)
    } else {
        Err(ApiError::invalid_param(
            param,
            format!(
                "{id:?} is a {} file, expected a {}",
                kind_of(&loaded).name(),
                want.name()
            ),
        ))
    }
}

fn kind_of(l: &Loaded) -> Kind {
    match l {
        Loaded::Cartridge(_) => Kind::Kv,
        Loaded::SoftPrompt(..) => Kind::SoftPrompt,
    }
}

/// Drop least-recently-used entries (never `keep`) until the bytes fit the budget.
fn evict(inner: &mut Inner, budget: u64, keep: &str) {
    while inner.bytes > budget {
        let victim = inner
            .entries
            .iter()
            .filter(|(k, _)| k.as_str() != keep)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone());
        let Some(victim) = victim else {
            break;
        };
        if let Some(e) = inner.entries.remove(&victim) {
            inner.bytes -= e.bytes;
            inner.evictions += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_id;

    #[test]
    fn ids_that_could_leave_the_folder_are_invalid() {
        for bad in [
            "",
            "..",
            "../a",
            "a/b",
            "/etc/passwd",
            "a\\b",
            ".hidden",
            "a..b",
            "é",
            "a b",
        ] {
            assert!(!valid_id(bad), "{bad:?} accepted");
        }
        for good in ["a", "docs-v2", "x_1.cart", "A.b.c"] {
            assert!(valid_id(good), "{good:?} refused");
        }
    }
}
