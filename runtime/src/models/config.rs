//! The resolved model configuration shared by every architecture and every loader.
//!
//! Loaders (Hugging Face `config.json`, GGUF metadata) fill a [`ModelConfig`]; model files read it.

use serde::Deserialize;

/// Which family of decoder a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, TinyLlama: no attention bias, no q/k norm.
    Llama,
    /// Qwen2 / Qwen2.5: bias on the q, k and v projections.
    Qwen2,
    /// Qwen3: RMSNorm on q and k per head before RoPE, no bias.
    Qwen3,
}

impl Architecture {
    /// The lower-case name used in fingerprints and messages.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }
}

/// Everything the forward pass needs to know about a model's shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture family.
    pub architecture: Architecture,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling, as canonical JSON, when the checkpoint has one (Llama 3 style).
    pub rope_scaling: Option<String>,
    /// Context window.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// BOS token id, when the model has one.
    pub bos_token_id: Option<u32>,
    /// EOS token ids (generation stops on any).
    pub eos_token_ids: Vec<u32>,
}

/// The subset of a Hugging Face `config.json` we read.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

/// Why a configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `config.json` is not valid JSON or misses a field.
    #[error("config.json: {0}")]
    Json(#[from] serde_json::Error),
    /// The architecture is not one we implement.
    #[error("unsupported architecture {0:?} (supported: llama, qwen2, qwen3)")]
    Unsupported(String),
    /// Shapes that cannot work (zero heads, hidden not divisible, ...).
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ModelConfig {
    /// Parse a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        let hf: HfConfig = serde_json::from_str(text)?;
        let kind = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.first().cloned())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let architecture = if kind.starts_with("qwen3") {
            Architecture::Qwen3
        } else if kind.starts_with("qwen2") {
            Architecture::Qwen2
        } else if kind.starts_with("llama") || kind == "mistral" {
            Architecture::Llama
        } else {
            return Err(ConfigError::Unsupported(kind));
        };
        if hf.num_attention_heads == 0 {
            return Err(ConfigError::Invalid("num_attention_heads is 0".into()));
        }
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads);
        let eos_token_ids = match hf.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect(),
            _ => Vec::new(),
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope_scaling: hf
                .rope_scaling
                .filter(|v| !v.is_null())
                .map(|v| v.to_string()),
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check the shapes are usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad("zero layers, hidden size or vocabulary");
        }
        if self.num_kv_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_kv_heads) {
            return bad("num_attention_heads must be a multiple of num_key_value_heads");
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad("head_dim must be even and non-zero");
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_kv_heads
    }
}
