//! One entry point for loading a model: `--model PATH` is a `.gguf` file or a Hugging Face folder;
//! without `--model`, the default model fetched by `scripts/fetch-model.sh`.
//!
//! The result is everything the rest of the toolchain needs: the resolved [`ModelConfig`], the
//! weights as f32 tensors under Hugging Face names in the Hugging Face (rotate-half) layout, the
//! tokenizer, the chat template and the model's [`ModelFingerprint`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use cartridge_formats::ModelFingerprint;

use crate::chat_template::ChatTemplate;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::model_fingerprint;
use crate::models::config::ModelConfig;
use crate::models::Transformer;
use crate::tokenizer::Tokenizer;

/// File name of the default model inside `<cache>/models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A model ready to run: config, weights, tokenizer, chat template, fingerprint.
pub struct LoadedModel {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Shapes and hyper-parameters.
    pub config: ModelConfig,
    /// f32 weights by Hugging Face name, Hugging Face layout.
    pub weights: BTreeMap<String, Tensor>,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// The model's chat template, when it has one.
    pub chat_template: Option<ChatTemplate>,
    /// Identity of the model, stored in and checked against every cartridge.
    pub fingerprint: ModelFingerprint,
    /// The device the weights live on.
    pub device: Device,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("path", &self.path)
            .field("config", &self.config)
            .field("tensors", &self.weights.len())
            .field("fingerprint", &self.fingerprint.short())
            .finish()
    }
}

impl LoadedModel {
    /// A `VarBuilder` over the weights, for `Transformer::load(vb, &config)`.
    pub fn var_builder(&self) -> candle_nn::VarBuilder<'static> {
        self.var_builder_dtype(DType::F32)
    }

    /// A `VarBuilder` that hands out the weights converted to `dtype` (e.g. bf16 on CUDA).
    pub fn var_builder_dtype(&self, dtype: DType) -> candle_nn::VarBuilder<'static> {
        let map: HashMap<String, Tensor> = self
            .weights
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        candle_nn::VarBuilder::from_tensors(map, dtype, &self.device)
    }

    /// The forward pass over these weights (f32). The tensors are shared, not copied.
    pub fn transformer(&self) -> Result<Transformer> {
        Transformer::load(self.var_builder(), &self.config)
    }

    /// The forward with the GGUF's quantised weights attached for decoding
    /// ([`Transformer::attach_quantized`]); an HF folder has none, which is an error.
    pub fn quantized_transformer(&self) -> Result<Transformer> {
        if self.path.is_dir() {
            return Err(Error::Msg(format!(
                "{}: quantised inference needs a GGUF model (this is a Hugging Face folder)",
                self.path.display()
            )));
        }
        let mut model = self.transformer()?;
        let gguf = GgufFile::open(&self.path)?;
        model.attach_quantized(gguf.load_quantized(&self.config, &self.device)?)?;
        Ok(model)
    }
}

/// The cache folder: `$CARTRIDGE_HOME`, else `$HOME/.cache/cartridge`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARTRIDGE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            Error::ModelNotFound(
                "neither CARTRIDGE_HOME nor HOME is set; pass --model PATH".to_string(),
            )
        })?;
    Ok(PathBuf::from(home).join(".cache").join("cartridge"))
}

/// Where the default model is expected: `$CARTRIDGE_MODEL` if set, else
/// `<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf`. The file may not exist.
pub fn default_model_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CARTRIDGE_MODEL").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    Ok(cache_dir()?.join("models").join(DEFAULT_MODEL_FILE))
}

/// The model to load: `explicit` (from `--model`) when given, else the default model, which must
/// exist (the error says how to fetch it).
pub fn resolve_model_path(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.exists() {
            return Err(Error::ModelNotFound(format!(
                "model {} does not exist",
                p.display()
            )));
        }
        return Ok(p.to_path_buf());
    }
    let p = default_model_path()?;
    if !p.exists() {
        return Err(Error::ModelNotFound(format!(
            "default model not found at {}; run scripts/fetch-model.sh to download it, or pass \
             --model PATH (a .gguf file or a Hugging Face folder), or set CARTRIDGE_MODEL",
            p.display()
        )));
    }
    Ok(p)
}

/// Load a model from a `.gguf` file or a Hugging Face folder onto `device`.
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<LoadedModel> {
    let path = path.as_ref();
    if path.is_dir() {
        load_hf_dir(path, device)
    } else {
        load_gguf(path, device)
    }
}

/// Load the default model (see [`resolve_model_path`]).
pub fn load_default(device: &Device) -> Result<LoadedModel> {
    load(resolve_model_path(None)?, device)
}

/// Load a GGUF file: weights dequantised to f32.
pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel> {
    let gguf = GgufFile::open(path)?;
    let config = gguf.config()?;
    // Building and hashing the tokenizer (~0.8 s for a 49k vocabulary) and dequantising the
    // weights (~1 s for 135M parameters) are independent: run them side by side.
    let (tok, weights) = std::thread::scope(|s| {
        let tok = s.spawn(|| -> Result<(Tokenizer, String)> {
            let t = Tokenizer::from_gguf(&gguf)?;
            let h = t.hash()?;
            Ok((t, h))
        });
        let weights = gguf.load_weights(&config, device);
        let tok = tok
            .join()
            .unwrap_or_else(|_| Err(Error::Tokenizer("tokenizer thread panicked".into())));
        (tok, weights)
    });
    let (tokenizer, tokenizer_hash) = tok?;
    let weights = weights?;
    check_weights(&config, &weights)?;
    let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let chat_template = match gguf.get_str_opt("tokenizer.chat_template")? {
        Some(src) => Some(ChatTemplate::new(
            src,
            token_text(tokenizer.bos_token_id()),
            token_text(tokenizer.eos_token_ids().first().copied()),
        )?),
        None => None,
    };
    let fingerprint = model_fingerprint::from_hashes(
        &config,
        model_fingerprint::weights_hash(&config, &weights)?,
        tokenizer_hash,
    );
    Ok(LoadedModel {
        path: path.to_path_buf(),
        config,
        weights,
        tokenizer,
        chat_template,
        fingerprint,
        device: device.clone(),
    })
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_field(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` of `generation_config.json` (a number or a list), when the file exists.
fn generation_eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(&read_to_string(&path)?)
        .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
    let as_id = |x: &serde_json::Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
    Ok(match v.get("eos_token_id") {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(as_id).collect(),
        Some(x) => as_id(x).into_iter().collect(),
        None => Vec::new(),
    })
}

/// The chat template of a Hugging Face folder: `chat_template.jinja`, else `chat_template` in
/// `tokenizer_config.json` (a string, or a list of named templates of which we take `default`).
fn hf_chat_template_source(dir: &Path, tok_cfg: &serde_json::Value) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return read_to_string(&jinja).map(Some);
    }
    Ok(match tok_cfg.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
}

/// The safetensors files of a Hugging Face folder, sharded (index) or not.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = read_to_string(&index)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Msg(format!("{}: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Msg(format!("{}: no weight_map", index.display())))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = entry.map_err(|e| Error::io(dir, e))?.path();
        if p.extension().and_then(|e| e.to_str()) == Some("safetensors") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::ModelNotFound(format!(
            "{}: no *.safetensors weights",
            dir.display()
        )));
    }
    Ok(files)
}

/// Load every tensor of the folder's safetensors files as f32 on `device`.
fn load_safetensors(dir: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let files = safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only for the duration of this function; every
    // tensor is copied out (converted to f32 and/or moved to `device`) before the map is dropped.
    // A file truncated by another process meanwhile would fault, as with any mmap reader.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| Error::Msg(format!("{}: cannot read safetensors: {e}", dir.display())))?;
    let mut out = BTreeMap::new();
    for (name, _) in st.tensors() {
        let t = st
            .load(&name, &Device::Cpu)
            .map_err(|e| Error::Weight {
                name: name.clone(),
                message: e.to_string(),
            })?
            .to_dtype(DType::F32)?
            .to_device(device)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Load a Hugging Face folder (config.json, *.safetensors, tokenizer.json, tokenizer_config.json).
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<LoadedModel> {
    let mut config = ModelConfig::from_hf_json(&read_to_string(&dir.join("config.json"))?)?;
    let tok_cfg_path = dir.join("tokenizer_config.json");
    let tok_cfg: serde_json::Value = if tok_cfg_path.is_file() {
        serde_json::from_str(&read_to_string(&tok_cfg_path)?)
            .map_err(|e| Error::Msg(format!("{}: {e}", tok_cfg_path.display())))?
    } else {
        serde_json::Value::Null
    };
    let tokenizer = Tokenizer::from_file(
        dir.join("tokenizer.json"),
        config.bos_token_id,
        config.eos_token_ids.clone(),
    )?;
    let bos = token_field(&tok_cfg, "bos_token");
    let eos = token_field(&tok_cfg, "eos_token");
    // config.json sometimes lacks the ids; the tokenizer config names the tokens instead.
    let tokenizer = {
        let bos_id = tokenizer
            .bos_token_id()
            .or_else(|| bos.as_deref().and_then(|t| tokenizer.token_to_id(t)));
        let mut eos_ids = tokenizer.eos_token_ids().to_vec();
        // generation_config.json lists every token generation stops on (e.g. Qwen's
        // `<|endoftext|>` and `<|im_end|>`), sometimes more than config.json does.
        let extra = generation_eos_ids(dir)?
            .into_iter()
            .chain(eos.as_deref().and_then(|t| tokenizer.token_to_id(t)));
        for id in extra {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        Tokenizer::new(tokenizer.inner().clone(), bos_id, eos_ids)
    };
    // One source of truth for the special ids, whichever of the two a caller reads.
    config.bos_token_id = tokenizer.bos_token_id();
    config.eos_token_ids = tokenizer.eos_token_ids().to_vec();
    let chat_template = match hf_chat_template_source(dir, &tok_cfg)? {
        Some(src) => Some(ChatTemplate::new(src, bos, eos)?),
        None => None,
    };
    let weights = load_safetensors(dir, device)?;
    check_weights(&config, &weights)?;
    let fingerprint = model_fingerprint::fingerprint(&config, &weights, &tokenizer)?;
    Ok(LoadedModel {
        path: dir.to_path_buf(),
        config,
        weights,
        tokenizer,
        chat_template,
        fingerprint,
        device: device.clone(),
    })
}

/// The weights every architecture needs, with the shapes the config implies.
fn check_weights(cfg: &ModelConfig, w: &BTreeMap<String, Tensor>) -> Result<()> {
    let expect = |name: &str, shape: &[usize]| -> Result<()> {
        let t = w.get(name).ok_or_else(|| Error::Weight {
            name: name.to_string(),
            message: "missing".to_string(),
        })?;
        if t.dims() != shape {
            return Err(Error::Weight {
                name: name.to_string(),
                message: format!("shape {:?}, expected {:?}", t.dims(), shape),
            });
        }
        Ok(())
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    expect("model.embed_tokens.weight", &[v, h])?;
    expect("model.norm.weight", &[h])?;
    if !cfg.tie_word_embeddings {
        expect("lm_head.weight", &[v, h])?;
    }
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        expect(&format!("{p}.self_attn.q_proj.weight"), &[q, h])?;
        expect(&format!("{p}.self_attn.k_proj.weight"), &[kv, h])?;
        expect(&format!("{p}.self_attn.v_proj.weight"), &[kv, h])?;
        expect(&format!("{p}.self_attn.o_proj.weight"), &[h, q])?;
        expect(
            &format!("{p}.mlp.gate_proj.weight"),
            &[cfg.intermediate_size, h],
        )?;
        expect(
            &format!("{p}.mlp.up_proj.weight"),
            &[cfg.intermediate_size, h],
        )?;
        expect(
            &format!("{p}.mlp.down_proj.weight"),
            &[h, cfg.intermediate_size],
        )?;
        expect(&format!("{p}.input_layernorm.weight"), &[h])?;
        expect(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
    }
    Ok(())
}
