//! GGUF checkpoints (llama.cpp's single-file format): configuration from metadata, weights
//! dequantised to f32 under Hugging Face tensor names and in the Hugging Face layout.
//!
//! Parsing is candle's `gguf_file` (which caps string lengths, dimensions and array sizes and checks
//! that every tensor lies inside the file); this module maps the result onto our [`ModelConfig`] and
//! the names our model files load (`model.layers.{i}.self_attn.q_proj.weight`, ...).
//!
//! **Q/K layout.** llama.cpp's converter permutes the rows of Llama `attn_q`/`attn_k` so that RoPE can
//! rotate adjacent pairs `(2j, 2j+1)`; Hugging Face models rotate halves `(j, j + d/2)`. We undo the
//! permutation once, here, per head: `hf_row[j] = gguf_row[2j]`, `hf_row[j + d/2] = gguf_row[2j + 1]`.
//! Attention scores are the same either way, but keys a cartridge stores are not, and cartridges must
//! move between stacks, so the whole runtime works in the rotate-half layout. Qwen2/Qwen3 GGUFs are
//! converted without the permutation and are left as they are.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::models::config::{Architecture, ModelConfig};

/// An opened GGUF file: its parsed header (metadata and tensor directory) and the path to read
/// tensor data from.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("metadata_keys", &self.content.metadata.len())
            .finish()
    }
}

impl GgufFile {
    /// Open and parse the header of a GGUF file. Tensor data is read later, on demand.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| Error::Gguf {
            path: path.clone(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(Self { path, content })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata key/value pairs.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The GGUF names of all tensors, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    /// The storage type of a tensor (`F32`, `Q4_1`, `Q8_0`, ...), if present.
    pub fn tensor_dtype(&self, gguf_name: &str) -> Option<GgmlDType> {
        self.content
            .tensor_infos
            .get(gguf_name)
            .map(|t| t.ggml_dtype)
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.err(format!("metadata key {key:?} is missing")))
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| self.err(format!("metadata {key:?}: {e}")))
    }

    /// An optional string metadata value (absent is `None`, wrong type is an error).
    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(_) => self.get_str(key).map(Some),
        }
    }

    /// An integer metadata value of any integer type, as u64.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        let n = match v {
            Value::U8(x) => Some(u64::from(*x)),
            Value::U16(x) => Some(u64::from(*x)),
            Value::U32(x) => Some(u64::from(*x)),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.ok_or_else(|| {
            self.err(format!(
                "metadata {key:?} is not a non-negative integer: {v:?}"
            ))
        })
    }

    /// An optional integer metadata value.
    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(_) => self.get_u64(key).map(Some),
        }
    }

    fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.get_u64(key)?;
        usize::try_from(v).map_err(|_| self.err(format!("metadata {key:?} too large: {v}")))
    }

    /// A float metadata value (f32 or f64).
    pub fn get_f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.err(format!("metadata {key:?} is not a float: {v:?}"))),
        }
    }

    /// An array metadata value.
    pub fn get_array(&self, key: &str) -> Result<&Vec<Value>> {
        self.get(key)?
            .to_vec()
            .map_err(|e| self.err(format!("metadata {key:?}: {e}")))
    }

    /// Tokens that end generation: `tokenizer.ggml.eos_token_id`, then the end-of-turn and
    /// end-of-message tokens llama.cpp also stops on (`eot_token_id`, `eom_token_id`; e.g. Qwen's
    /// `<|im_end|>` next to its EOS `<|endoftext|>`), without duplicates.
    pub fn eos_token_ids(&self) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = self.get_u64_opt(key)?.and_then(|v| u32::try_from(v).ok()) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    /// The architecture family named by `general.architecture`.
    pub fn architecture(&self) -> Result<Architecture> {
        let arch = self.get_str("general.architecture")?;
        match arch {
            "llama" | "mistral" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            "qwen3" => Ok(Architecture::Qwen3),
            other => Err(self.err(format!(
                "unsupported architecture {other:?} (supported: llama, qwen2, qwen3)"
            ))),
        }
    }

    /// The model configuration, from `{arch}.*` and `tokenizer.ggml.*` metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let architecture = self.architecture()?;
        let arch = self.get_str("general.architecture")?;
        let key = |k: &str| format!("{arch}.{k}");
        // RoPE scaling changes every rotation angle; ignoring it would silently give wrong logits.
        // llama.cpp stores Llama 3.1 scaling as a `rope_freqs.weight` tensor of per-frequency
        // divisors and other schemes as `{arch}.rope.scaling.*`; we do not translate either.
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(self.err(
                "RoPE frequency factors (rope_freqs.weight, Llama 3.1 style scaling) are not \
                 supported from GGUF; load the model from its Hugging Face folder instead",
            ));
        }
        if let Some(kind) = self.get_str_opt(&key("rope.scaling.type"))? {
            if kind != "none" {
                return Err(self.err(format!(
                    "RoPE scaling {kind:?} is not supported from GGUF; load the model from its \
                     Hugging Face folder instead"
                )));
            }
        }
        let hidden_size = self.get_usize(&key("embedding_length"))?;
        let num_attention_heads = self.get_usize(&key("attention.head_count"))?;
        if num_attention_heads == 0 {
            return Err(self.err("attention.head_count is 0"));
        }
        let num_kv_heads = match self.get_u64_opt(&key("attention.head_count_kv"))? {
            Some(n) => usize::try_from(n).map_err(|_| self.err("head_count_kv too large"))?,
            None => num_attention_heads,
        };
        let head_dim = match self.get_u64_opt(&key("attention.key_length"))? {
            Some(n) => usize::try_from(n).map_err(|_| self.err("key_length too large"))?,
            None => hidden_size / num_attention_heads,
        };
        // Older files lack `{arch}.vocab_size`; the token list is then authoritative.
        let vocab_size = match self.get_u64_opt(&key("vocab_size"))? {
            Some(n) => usize::try_from(n).map_err(|_| self.err("vocab_size too large"))?,
            None => self.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let bos_token_id = self
            .get_u64_opt("tokenizer.ggml.bos_token_id")?
            .and_then(|v| u32::try_from(v).ok());
        let eos_token_ids = self.eos_token_ids()?;
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: self.get_usize(&key("feed_forward_length"))?,
            num_layers: self.get_usize(&key("block_count"))?,
            num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self
                .get_f64_opt(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6),
            rope_theta: self
                .get_f64_opt(&key("rope.freq_base"))?
                .unwrap_or(10_000.0),
            // Refused above when present.
            rope_scaling: None,
            max_position_embeddings: self
                .get_u64_opt(&key("context_length"))?
                .and_then(|v| usize::try_from(v).ok())
                .unwrap_or(4096),
            // GGUF files of tied models simply have no `output.weight`.
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id,
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read one tensor as stored (still quantised), on the CPU.
    pub fn qtensor(&self, gguf_name: &str) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(gguf_name)
            .ok_or_else(|| self.err(format!("tensor {gguf_name:?} is missing")))?;
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut reader = BufReader::new(file);
        info.read(&mut reader, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| self.err(format!("tensor {gguf_name:?}: {e}")))
    }

    /// Read one tensor dequantised to f32 in GGUF row order (no Q/K de-permutation), on the CPU.
    /// The shape is row-major (`[rows, cols]`, i.e. GGUF `ne` reversed).
    pub fn dequantize_raw(&self, gguf_name: &str) -> Result<Tensor> {
        let q = self.qtensor(gguf_name)?;
        q.dequantize(&Device::Cpu)
            .map_err(|e| self.err(format!("tensor {gguf_name:?}: cannot dequantise: {e}")))
    }

    /// Every tensor dequantised to f32, under its Hugging Face name and in the Hugging Face layout
    /// (Llama Q/K rows de-permuted), on `device`. Tensors with no Hugging Face counterpart (e.g.
    /// `rope_freqs.weight`) are skipped.
    pub fn load_weights(
        &self,
        cfg: &ModelConfig,
        device: &Device,
    ) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        self.read_hf_tensors(|gguf_name, hf, q, _| {
            let mut t = q
                .dequantize(&Device::Cpu)
                .map_err(|e| self.err(format!("tensor {gguf_name:?}: cannot dequantise: {e}")))?;
            if let Some(n) = qk_heads(cfg, &hf) {
                t = unpermute_qk_rows(&t, n)?;
            }
            let t = if device.is_cpu() {
                t
            } else {
                t.to_device(device)?
            };
            out.insert(hf, t);
            Ok(())
        })?;
        Ok(out)
    }
}

impl GgufFile {
    /// Every tensor still quantised (for a `QMatMul` inference path), under its Hugging Face name,
    /// with Llama Q/K rows de-permuted like [`GgufFile::load_weights`]. Quantisation blocks run
    /// along a row, so moving whole rows moves whole blocks and loses nothing: dequantising the
    /// result gives exactly the tensors of `load_weights`.
    pub fn load_quantized(
        &self,
        cfg: &ModelConfig,
        device: &Device,
    ) -> Result<BTreeMap<String, QTensor>> {
        let mut out = BTreeMap::new();
        self.read_hf_tensors(|gguf_name, hf, q, dtype| {
            let dims = q.shape().dims().to_vec();
            let data = q.data()?;
            let bytes = match qk_heads(cfg, &hf) {
                Some(n) => unpermute_rows_bytes(&data, dims.first().copied().unwrap_or(0), n)
                    .map_err(|m| self.err(format!("tensor {gguf_name:?}: {m}")))?,
                None => data.into_owned(),
            };
            let q =
                candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &bytes, dims, device)
                    .map_err(|e| self.err(format!("tensor {gguf_name:?}: {e}")))?;
            out.insert(hf, q);
            Ok(())
        })?;
        Ok(out)
    }
    /// Read, in file order, every tensor that has a Hugging Face name, as stored (quantised, on
    /// the CPU): `each(gguf_name, hf_name, tensor, stored_dtype)`. Shared by the f32 and the
    /// quantised loaders.
    fn read_hf_tensors(
        &self,
        mut each: impl FnMut(&str, String, QTensor, GgmlDType) -> Result<()>,
    ) -> Result<()> {
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut reader = BufReader::new(file);
        for gguf_name in self.tensor_names() {
            let Some(hf) = hf_name(gguf_name) else {
                continue;
            };
            let info = self
                .content
                .tensor_infos
                .get(gguf_name)
                .ok_or_else(|| self.err(format!("tensor {gguf_name:?} is missing")))?;
            let q = info
                .read(&mut reader, self.content.tensor_data_offset, &Device::Cpu)
                .map_err(|e| self.err(format!("tensor {gguf_name:?}: {e}")))?;
            each(gguf_name, hf, q, info.ggml_dtype)?;
        }
        Ok(())
    }
}

/// Heads whose rows GGUF permuted in this Hugging Face tensor (Llama q/k projections), if any.
fn qk_heads(cfg: &ModelConfig, hf: &str) -> Option<usize> {
    match cfg.architecture {
        Architecture::Llama if hf.ends_with("self_attn.q_proj.weight") => {
            Some(cfg.num_attention_heads)
        }
        Architecture::Llama if hf.ends_with("self_attn.k_proj.weight") => Some(cfg.num_kv_heads),
        _ => None,
    }
}

/// [`unpermute_qk_rows`] on the raw bytes of a row-major tensor of `rows` equal-sized rows.
fn unpermute_rows_bytes(data: &[u8], rows: usize, n_heads: usize) -> Result<Vec<u8>, String> {
    if rows == 0
        || n_heads == 0
        || !rows.is_multiple_of(n_heads)
        || !(rows / n_heads).is_multiple_of(2)
    {
        return Err(format!(
            "cannot de-permute {rows} rows into {n_heads} heads of even width"
        ));
    }
    if !data.len().is_multiple_of(rows) {
        return Err(format!(
            "{} bytes do not split into {rows} rows",
            data.len()
        ));
    }
    let row = data.len() / rows;
    let d = rows / n_heads;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_heads {
        for a in 0..2 {
            for j in 0..d / 2 {
                let src = (h * d + 2 * j + a) * row;
                out.extend_from_slice(data.get(src..src + row).ok_or("row out of range")?);
            }
        }
    }
    Ok(out)
}

/// The Hugging Face name of a GGUF tensor, or `None` for tensors we do not map.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let simple = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let hf_part = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_part}.{suffix}"))
}

/// Undo llama.cpp's Q/K row permutation for `n_heads` heads: within each head of `d` rows,
/// `out[j] = in[2j]` and `out[j + d/2] = in[2j + 1]`. Works for weights `[n_heads*d, cols]` and
/// biases `[n_heads*d]`.
pub fn unpermute_qk_rows(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = *dims
        .first()
        .ok_or_else(|| Error::Msg("cannot de-permute a scalar".into()))?;
    if n_heads == 0 || rows % n_heads != 0 || !(rows / n_heads).is_multiple_of(2) {
        return Err(Error::Msg(format!(
            "cannot de-permute {rows} rows into {n_heads} heads of even width"
        )));
    }
    let d = rows / n_heads;
    let cols: usize = dims[1..].iter().product();
    // [heads, d/2, 2, cols] -> [heads, 2, d/2, cols]: row 2j + a moves to a*d/2 + j.
    let out = t
        .reshape((n_heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(out)
}

/// The inverse of [`unpermute_qk_rows`]: Hugging Face rotate-half rows to GGUF adjacent-pair rows.
pub fn permute_qk_rows(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = *dims
        .first()
        .ok_or_else(|| Error::Msg("cannot permute a scalar".into()))?;
    if n_heads == 0 || rows % n_heads != 0 || !(rows / n_heads).is_multiple_of(2) {
        return Err(Error::Msg(format!(
            "cannot permute {rows} rows into {n_heads} heads of even width"
        )));
    }
    let d = rows / n_heads;
    let cols: usize = dims[1..].iter().product();
    let out = t
        .reshape((n_heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.3.attn_k.bias").as_deref(),
            Some("model.layers.3.self_attn.k_proj.bias")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn unpermute_moves_even_rows_first() -> Result<()> {
        // 2 heads of width 4, one column: row r holds value r.
        let t = Tensor::arange(0f32, 8., &Device::Cpu)?.reshape((8, 1))?;
        let u = unpermute_qk_rows(&t, 2)?;
        let v: Vec<f32> = u.flatten_all()?.to_vec1()?;
        assert_eq!(v, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back = permute_qk_rows(&u, 2)?;
        let b: Vec<f32> = back.flatten_all()?.to_vec1()?;
        assert_eq!(b, (0..8).map(|x| x as f32).collect::<Vec<_>>());
        Ok(())
    }
}
