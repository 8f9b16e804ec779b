//! The dataset manifest (SPEC.md D2): teacher fingerprint, corpus digest, settings.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{DatasetError, Result};
use crate::fingerprint::ModelFingerprint;

/// File name of the manifest inside a dataset folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Value of the manifest's `format` member.
pub const FORMAT: &str = "cartridge-selfstudy";
/// Dataset format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Largest manifest accepted.
pub const MAX_MANIFEST: u64 = 16 << 20;

/// What a dataset is and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// The model (and tokenizer) that produced every id and log-probability.
    pub teacher: ModelFingerprint,
    /// `sha256:<hex>` of the corpus (paths and contents).
    pub corpus_digest: String,
    /// When the dataset was created (RFC 3339, supplied by the caller).
    pub created: String,
    /// The synthesis settings, free JSON object.
    pub settings: serde_json::Value,
}

impl Manifest {
    /// A manifest for a new dataset.
    pub fn new(
        teacher: ModelFingerprint,
        corpus_digest: impl Into<String>,
        created: impl Into<String>,
        settings: serde_json::Value,
    ) -> Self {
        Self {
            format: FORMAT.into(),
            version: VERSION,
            teacher,
            corpus_digest: corpus_digest.into(),
            created: created.into(),
            settings,
        }
    }

    /// The 32-byte teacher id every shard carries (SHA-256 of the teacher's compact JSON).
    pub fn teacher_id(&self) -> [u8; 32] {
        teacher_id(&self.teacher)
    }

    /// Refuse a model other than the teacher (token ids of another tokenizer are meaningless).
    pub fn check_teacher(&self, model: &ModelFingerprint) -> Result<()> {
        let diff = self.teacher.differences(model);
        if diff.is_empty() {
            return Ok(());
        }
        Err(DatasetError::TeacherMismatch {
            fields: diff.join(", "),
            dataset: self.teacher.short(),
            other: model.short(),
        })
    }

    /// Parse and check manifest bytes.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |message: String| DatasetError::Manifest {
            path: path.to_path_buf(),
            message,
        };
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(bad(format!(
                "{} bytes exceed the {MAX_MANIFEST}-byte limit",
                bytes.len()
            )));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if m.format != FORMAT {
            return Err(bad(format!(
                "format is {:?}, expected {FORMAT:?}",
                m.format
            )));
        }
        if m.version != VERSION {
            return Err(bad(format!(
                "unsupported dataset version {} (this build reads version {VERSION})",
                m.version
            )));
        }
        if !m.settings.is_object() {
            return Err(bad("settings must be a JSON object".into()));
        }
        Ok(m)
    }

    /// Read `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            return Err(DatasetError::NoManifest {
                dir: dir.to_path_buf(),
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| DatasetError::io(&path, e))?;
        Self::from_bytes(&path, &bytes)
    }

    /// Write `dir/manifest.json` atomically (pretty JSON: people read it).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| DatasetError::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })?;
        bytes.push(b'\n');
        crate::atomic::write_atomic(&path, &bytes).map_err(|e| DatasetError::io(&path, e))
    }
}

/// SHA-256 of the fingerprint's compact JSON (member order of SPEC.md §2.2).
pub fn teacher_id(teacher: &ModelFingerprint) -> [u8; 32] {
    // Serialising a plain struct of strings and numbers cannot fail.
    let json = serde_json::to_vec(teacher).unwrap_or_default();
    Sha256::digest(&json).into()
}
