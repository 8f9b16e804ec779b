//! Hugging Face PEFT adapters <-> `.cart`.
//!
//! A PEFT prompt-learning adapter is a folder with `adapter_config.json` and
//! `adapter_model.safetensors` holding one tensor, `prompt_embeddings`:
//!
//! - `peft_type: "CARTRIDGE"` (and `PREFIX_TUNING` without `prefix_projection`, which stores the same
//!   thing): `[p, L * 2 * H_kv * D]`. Row `t` is virtual token `t`; within a row, layer `l`'s key
//!   heads come first, then its value heads, each head `D` wide:
//!   `row[((2l + kv) * H_kv + h) * D + d]` is `keys.{l}` (`kv = 0`) or `values.{l}` (`kv = 1`) at
//!   `[h, t, d]`. PEFT reshapes the row to `[2L, H_kv, D]` and hands those to the model as
//!   `past_key_values`, used as-is: post-RoPE keys at positions `0..p-1`, rotate-half layout, exactly
//!   a `.cart`'s. The config's `num_attention_heads` is the number of KV heads and `token_dim` is
//!   `H_kv * D` (PEFT adjusts both for grouped-query attention). `num_frozen_tokens` is `.cart`'s
//!   `frozen_tokens`.
//! - `peft_type: "PROMPT_TUNING"`: `[n, hidden]`, a soft prompt's `embeddings` unchanged.
//!
//! A soft prompt's summary has no place in PEFT's files; export writes it to
//! `cartridge_summary.txt` next to them and import reads it back from there.
//!
//! Tensor bytes are copied, never converted: the adapter keeps the `.cart`'s dtype (f32, f16 or bf16)
//! and a round trip gives back identical tensor bytes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use cartridge_formats::cart::header::MAX_DIM;
use cartridge_formats::cart::parse::tensor_bytes;
use cartridge_formats::cart::{CartError, DType, Dims, Header, KvDims, SoftPromptDims};
use cartridge_formats::ModelFingerprint;
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::{json, Value};

use super::{elem_size, io_error, ImportedPrefix, InterchangeError, Result};

/// The adapter's configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Where a soft prompt's summary travels (PEFT itself has no field for it).
pub const SUMMARY_FILE: &str = "cartridge_summary.txt";
/// The one tensor of a prompt-learning adapter.
pub const TENSOR: &str = "prompt_embeddings";

fn st_dtype(dtype: DType) -> StDtype {
    match dtype {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::Bf16 => StDtype::BF16,
    }
}

/// Write the `.cart` described by `header` and `raw` (its raw payload, already verified) as a PEFT
/// adapter in `dir` (created if needed; the adapter's files are replaced atomically).
///
/// `base_model` becomes `base_model_name_or_path` (what PEFT loads the base model from).
pub fn export(header: &Header, raw: &[u8], dir: &Path, base_model: Option<&str>) -> Result<()> {
    let tensor = |i: usize| -> Result<&[u8]> {
        let entry = header
            .tensors
            .get(i)
            .ok_or_else(|| CartError::NoSuchTensor(format!("#{i}")))?;
        Ok(tensor_bytes(entry, raw)?)
    };
    let model = &header.model;
    let (config, shape, data) = match header.dims {
        // PEFT's cartridge adapter is keys and values only: dropping the bias would change
        // every read of the cartridge, so it is refused rather than exported wrong.
        Dims::Kv(d) if d.biased => {
            return Err(CartError::InvalidInput(
                "this cartridge carries a per-slot attention bias, which a PEFT cartridge \
                 adapter cannot hold; serve it with cartridge, or build one without the bias"
                    .into(),
            )
            .into())
        }
        Dims::Kv(d) => {
            let (layers, heads, dim, p) = (
                d.layers as usize,
                d.kv_heads as usize,
                d.head_dim as usize,
                d.tokens as usize,
            );
            let layout = RowLayout {
                tensors: 2 * layers,
                heads,
                tokens: p,
                row_bytes: dim * elem_size(header.dtype),
            };
            let parts = (0..2 * layers).map(tensor).collect::<Result<Vec<_>>>()?;
            let data = layout.join(&parts).ok_or_else(|| {
                CartError::InvalidInput("a tensor is shorter than its shape".into())
            })?;
            let config = json!({
                "auto_mapping": null,
                "base_model_name_or_path": base_model,
                "inference_mode": true,
                "modules_to_save": null,
                "num_attention_heads": heads,
                "num_frozen_tokens": d.frozen_tokens,
                "num_layers": layers,
                "num_transformer_submodules": 1,
                "num_virtual_tokens": p,
                "peft_type": "CARTRIDGE",
                "revision": null,
                "task_type": "CAUSAL_LM",
                "token_dim": heads * dim,
            });
            (config, vec![p, layers * 2 * heads * dim], data)
        }
        Dims::SoftPrompt(d) => {
            let config = json!({
                "auto_mapping": null,
                "base_model_name_or_path": base_model,
                "inference_mode": true,
                "modules_to_save": null,
                "num_attention_heads": model.num_attention_heads,
                "num_layers": model.num_layers,
                "num_transformer_submodules": 1,
                "num_virtual_tokens": d.tokens,
                "peft_type": "PROMPT_TUNING",
                "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": null,
                "revision": null,
                "task_type": "CAUSAL_LM",
                "token_dim": d.hidden,
                "tokenizer_kwargs": null,
                "tokenizer_name_or_path": null,
            });
            let shape = vec![d.tokens as usize, d.hidden as usize];
            (config, shape, tensor(0)?.to_vec())
        }
    };
    let view = safetensors::tensor::TensorView::new(st_dtype(header.dtype), shape, &data)
        .map_err(|e| malformed(dir, format!("safetensors: {e}")))?;
    // PEFT writes this metadata; transformers' loaders look for it.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights = safetensors::serialize([(TENSOR, view)], Some(metadata))
        .map_err(|e| malformed(dir, format!("safetensors: {e}")))?;
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        cartridge_formats::atomic::write_atomic(&path, bytes).map_err(io_error(&path))
    };
    write(WEIGHTS_FILE, &weights)?;
    let mut text = serde_json::to_string_pretty(&config)
        .map_err(|e| malformed(dir, format!("config: {e}")))?;
    text.push('\n');
    write(CONFIG_FILE, text.as_bytes())?;
    let summary_path = dir.join(SUMMARY_FILE);
    match &header.summary {
        Some(summary) => write(SUMMARY_FILE, summary.as_bytes())?,
        // A summary left by an earlier export into this folder would be imported with this one.
        None if summary_path.exists() => {
            std::fs::remove_file(&summary_path).map_err(io_error(&summary_path))?
        }
        None => {}
    }
    Ok(())
}

/// The one place the two layouts meet: `.cart` tensors `[heads, tokens, D]` in file order (`keys.0,
/// values.0, keys.1, ...`) versus PEFT rows, one per token, holding every tensor's heads in that
/// order: element `[h, t, :]` of tensor `i` is at row `t`, block `i * heads + h`.
struct RowLayout {
    /// Number of `.cart` tensors (`2 L`).
    tensors: usize,
    /// KV heads per tensor.
    heads: usize,
    /// Virtual tokens `p`.
    tokens: usize,
    /// Bytes of one head's `D` elements.
    row_bytes: usize,
}

impl RowLayout {
    /// Offset in a tensor of `[h, t, :]`.
    fn in_tensor(&self, h: usize, t: usize) -> usize {
        (h * self.tokens + t) * self.row_bytes
    }

    /// Offset in the PEFT matrix of tensor `i`'s `[h, t, :]`.
    fn in_rows(&self, i: usize, h: usize, t: usize) -> usize {
        ((t * self.tensors + i) * self.heads + h) * self.row_bytes
    }

    /// `.cart` tensors -> PEFT rows; `None` when a tensor is too short.
    fn join(&self, tensors: &[&[u8]]) -> Option<Vec<u8>> {
        let mut out = vec![0u8; self.tokens * self.tensors * self.heads * self.row_bytes];
        for (i, src) in tensors.iter().enumerate() {
            for h in 0..self.heads {
                for t in 0..self.tokens {
                    let (from, to) = (self.in_tensor(h, t), self.in_rows(i, h, t));
                    out.get_mut(to..to + self.row_bytes)?
                        .copy_from_slice(src.get(from..from + self.row_bytes)?);
                }
            }
        }
        Some(out)
    }

    /// PEFT rows -> `.cart` tensors; `None` when the matrix is too short.
    fn split(&self, rows: &[u8]) -> Option<Vec<Vec<u8>>> {
        (0..self.tensors)
            .map(|i| {
                let mut out = vec![0u8; self.heads * self.tokens * self.row_bytes];
                for h in 0..self.heads {
                    for t in 0..self.tokens {
                        let (from, to) = (self.in_rows(i, h, t), self.in_tensor(h, t));
                        out.get_mut(to..to + self.row_bytes)?
                            .copy_from_slice(rows.get(from..from + self.row_bytes)?);
                    }
                }
                Some(out)
            })
            .collect()
    }
}

fn malformed(path: &Path, message: String) -> InterchangeError {
    InterchangeError::Malformed {
        path: path.to_path_buf(),
        message,
    }
}

fn config_error(path: &Path, message: String) -> InterchangeError {
    InterchangeError::Config {
        path: path.to_path_buf(),
        message,
    }
}

/// The adapter folder named by `path`: the folder itself, or the folder of one of its two files.
fn adapter_dir(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let name = path.file_name().and_then(|n| n.to_str());
    match (name, path.parent()) {
        (Some(CONFIG_FILE | WEIGHTS_FILE), Some(parent)) => Ok(if parent.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            parent.to_path_buf()
        }),
        _ => Err(config_error(
            path,
            format!("not a PEFT adapter: give its folder, {CONFIG_FILE} or {WEIGHTS_FILE}"),
        )),
    }
}

/// What the adapter's configuration says, as far as import needs it.
struct AdapterConfig {
    path: PathBuf,
    object: serde_json::Map<String, Value>,
}

impl AdapterConfig {
    fn read(path: PathBuf) -> Result<Self> {
        if !path.is_file() {
            return Err(InterchangeError::Missing {
                path: path.parent().unwrap_or(&path).to_path_buf(),
                what: CONFIG_FILE.to_string(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(object)) => Ok(Self { path, object }),
            Ok(_) => Err(config_error(&path, "not a JSON object".into())),
            Err(e) => Err(config_error(&path, format!("invalid JSON: {e}"))),
        }
    }

    fn string(&self, key: &str) -> Option<&str> {
        self.object.get(key).and_then(Value::as_str)
    }

    /// An optional non-negative integer member (`null` counts as absent).
    fn count(&self, key: &str) -> Result<Option<u64>> {
        match self.object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                config_error(
                    &self.path,
                    format!("{key} must be a non-negative integer, found {v}"),
                )
            }),
        }
    }

    /// Refuse a member that is present and differs from what the model implies.
    fn expect_model(&self, key: &str, model_value: u64, what: &str) -> Result<()> {
        match self.count(key)? {
            Some(v) if v != model_value => Err(InterchangeError::WrongModel {
                path: self.path.clone(),
                message: format!("{key} = {v}, but the model has {model_value} {what}"),
            }),
            _ => Ok(()),
        }
    }
}

/// Read a PEFT `CARTRIDGE`, `PREFIX_TUNING` (without projection) or `PROMPT_TUNING` adapter for
/// `model`. `path` is the adapter folder or one of its two files.
pub fn import(path: &Path, model: &ModelFingerprint) -> Result<ImportedPrefix> {
    let dir = adapter_dir(path)?;
    let config = AdapterConfig::read(dir.join(CONFIG_FILE))?;
    let peft_type = config.string("peft_type").unwrap_or_default().to_string();
    if config.count("num_transformer_submodules")?.unwrap_or(1) != 1 {
        return Err(config_error(
            &config.path,
            "num_transformer_submodules must be 1 (a decoder-only model)".into(),
        ));
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        return Err(InterchangeError::Missing {
            path: dir.clone(),
            what: format!("{WEIGHTS_FILE} (adapter_model.bin is not read: save with safetensors)"),
        });
    }
    let bytes = std::fs::read(&weights_path).map_err(io_error(&weights_path))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| malformed(&weights_path, format!("not a safetensors file: {e}")))?;
    let tensor = file.tensor(TENSOR).map_err(|_| InterchangeError::Missing {
        path: weights_path.clone(),
        what: format!("tensor {TENSOR}"),
    })?;
    if let Some(other) = file.names().into_iter().find(|n| *n != TENSOR) {
        return Err(config_error(
            &weights_path,
            format!("holds tensor {other} besides {TENSOR}: a .cart holds only the prefix"),
        ));
    }
    let dtype = match tensor.dtype() {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::Bf16,
        other => {
            return Err(InterchangeError::DType {
                path: weights_path,
                tensor: TENSOR.into(),
                found: format!("{other:?}"),
            })
        }
    };
    let shape = tensor.shape().to_vec();
    let virtual_tokens = config
        .count("num_virtual_tokens")?
        .ok_or_else(|| config_error(&config.path, "num_virtual_tokens is missing".into()))?;
    let shape_error = |expected: String| InterchangeError::Shape {
        path: weights_path.clone(),
        tensor: TENSOR.into(),
        expected,
        found: format!("{shape:?}"),
    };
    let mut metadata = BTreeMap::from([
        ("imported_from".to_string(), "peft".to_string()),
        ("peft_type".to_string(), peft_type.clone()),
        ("source".to_string(), dir.display().to_string()),
    ]);
    if let Some(base) = config.string("base_model_name_or_path") {
        metadata.insert("peft_base_model".into(), base.to_string());
    }
    match peft_type.as_str() {
        "CARTRIDGE" | "PREFIX_TUNING" => {
            if config.object.get("prefix_projection") == Some(&Value::Bool(true)) {
                return Err(config_error(
                    &config.path,
                    "prefix tuning with prefix_projection stores an MLP, not the KV prefix".into(),
                ));
            }
            let (layers, heads, dim) = (
                model.num_layers as usize,
                model.num_kv_heads as usize,
                model.head_dim as usize,
            );
            config.expect_model("num_layers", layers as u64, "layers")?;
            config.expect_model("num_attention_heads", heads as u64, "KV heads")?;
            config.expect_model("token_dim", (heads * dim) as u64, "KV heads x head_dim")?;
            let width = layers * 2 * heads * dim;
            if shape.len() != 2 || shape[1] != width {
                return Err(shape_error(format!(
                    "[num_virtual_tokens, layers * 2 * kv_heads * head_dim] = [{virtual_tokens}, \
                     {layers} * 2 * {heads} * {dim}] for this model"
                )));
            }
            let p = shape[0];
            if p as u64 != virtual_tokens || p == 0 || p as u64 > MAX_DIM {
                return Err(shape_error(format!(
                    "{virtual_tokens} rows (num_virtual_tokens, at least 1)"
                )));
            }
            let frozen = config.count("num_frozen_tokens")?.unwrap_or(0);
            if frozen > p as u64 {
                return Err(config_error(
                    &config.path,
                    format!("num_frozen_tokens {frozen} > num_virtual_tokens {p}"),
                ));
            }
            let layout = RowLayout {
                tensors: 2 * layers,
                heads,
                tokens: p,
                row_bytes: dim * elem_size(dtype),
            };
            let tensors = layout
                .split(tensor.data())
                .ok_or_else(|| shape_error("as many bytes as the shape".into()))?;
            Ok(ImportedPrefix {
                dims: Dims::Kv(KvDims {
                    layers: model.num_layers,
                    kv_heads: model.num_kv_heads,
                    head_dim: model.head_dim,
                    tokens: p as u32,
                    frozen_tokens: frozen as u32,
                    biased: false,
                }),
                dtype,
                tensors,
                summary: None,
                metadata,
            })
        }
        "PROMPT_TUNING" => {
            let hidden = model.hidden_size as usize;
            config.expect_model("token_dim", hidden as u64, "hidden size")?;
            if shape.len() != 2 || shape[1] != hidden || shape[0] == 0 || shape[0] as u64 > MAX_DIM
            {
                return Err(shape_error(format!(
                    "[num_virtual_tokens, hidden] = [{virtual_tokens}, {hidden}] for this model"
                )));
            }
            if shape[0] as u64 != virtual_tokens {
                return Err(shape_error(format!(
                    "{virtual_tokens} rows (num_virtual_tokens)"
                )));
            }
            let summary_path = dir.join(SUMMARY_FILE);
            let summary = if summary_path.is_file() {
                Some(std::fs::read_to_string(&summary_path).map_err(io_error(&summary_path))?)
            } else {
                None
            };
            Ok(ImportedPrefix {
                dims: Dims::SoftPrompt(SoftPromptDims {
                    hidden: model.hidden_size,
                    tokens: shape[0] as u32,
                }),
                dtype,
                tensors: vec![tensor.data().to_vec()],
                summary,
                metadata,
            })
        }
        other => Err(config_error(
            &config.path,
            format!(
                "peft_type {other:?} cannot become a .cart (CARTRIDGE, PREFIX_TUNING and \
                 PROMPT_TUNING can)"
            ),
        )),
    }
}
