//! Weights of a Hugging Face model folder: `config.json` plus `*.safetensors` (one file or shards),
//! memory-mapped through candle's `MmapedSafetensors` (the safetensors format, Hugging Face 2022).
//! The tokenizer and chat template of the folder are the loader's business ([`crate::loader`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::models::{ModelConfig, Transformer};

/// The `*.safetensors` files of `dir`, sorted by name (shards `-00001-of-0000n` come in order;
/// the index file is not needed since every shard is mapped).
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::ModelNotFound(format!(
            "{}: no *.safetensors files",
            dir.display()
        )));
    }
    Ok(files)
}

/// Read `dir/config.json`.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    Ok(ModelConfig::from_hf_json(&text)?)
}

/// Load the model of a Hugging Face folder in `dtype` on `device`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<(ModelConfig, Transformer)> {
    let cfg = load_config(dir)?;
    let files = safetensors_files(dir)?;
    // SAFETY: the files are mapped read-only for the duration of loading; candle copies each
    // tensor out of the map onto `device`. A file truncated or rewritten by another process while
    // we load is outside what we can guard against (the same caveat as every mmap reader).
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }?;
    let model = Transformer::load(vb, &cfg)?;
    Ok((cfg, model))
}
