//! Model identity: what a cartridge was trained against, so it is never served on another model.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Everything about a model that a cartridge depends on.
///
/// Two fingerprints match when every field is equal. The runtime computes one when it loads a model
/// ([`ModelFingerprint`] fields are plain data so this crate needs no ML dependency); the compiler
/// stores it in every `.cart`; the runtime refuses a `.cart` whose fingerprint differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFingerprint {
    /// Architecture family: `llama`, `qwen2` or `qwen3`.
    pub architecture: String,
    /// Number of transformer layers.
    pub num_layers: u32,
    /// Residual stream width.
    pub hidden_size: u32,
    /// Number of query heads.
    pub num_attention_heads: u32,
    /// Number of key/value heads (grouped-query attention).
    pub num_kv_heads: u32,
    /// Width of one attention head.
    pub head_dim: u32,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: u32,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE scaling as the checkpoint states it (canonical JSON), or `None`.
    pub rope_scaling: Option<String>,
    /// `sha256:<hex>` over the tokenizer's canonical description (vocabulary, merges, special tokens).
    pub tokenizer_hash: String,
    /// `sha256:<hex>` over a fixed sample of the weights (see [`WeightSampler`]).
    pub weights_hash: String,
}

impl ModelFingerprint {
    /// A one-line description, used in mismatch errors.
    pub fn short(&self) -> String {
        format!(
            "{} L{} d{} h{}/{}x{} vocab {} rope {} tok {} w {}",
            self.architecture,
            self.num_layers,
            self.hidden_size,
            self.num_attention_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
            self.rope_theta,
            abbreviate(&self.tokenizer_hash),
            abbreviate(&self.weights_hash),
        )
    }

    /// The names of the fields that differ between `self` and `other` (empty when they match).
    pub fn differences(&self, other: &ModelFingerprint) -> Vec<&'static str> {
        let mut out = Vec::new();
        macro_rules! cmp {
            ($($f:ident),*) => {$( if self.$f != other.$f { out.push(stringify!($f)); } )*};
        }
        cmp!(
            architecture,
            num_layers,
            hidden_size,
            num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rope_theta,
            rope_scaling,
            tokenizer_hash,
            weights_hash
        );
        out
    }
}

fn abbreviate(hash: &str) -> &str {
    let hex = hash.strip_prefix("sha256:").unwrap_or(hash);
    hex.get(..12).unwrap_or(hex)
}

/// `sha256:<hex>` of some bytes: the project's identity hash (corpus digests, tokenizer hashes).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    format!("sha256:{}", hex(&digest))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The fixed sample of weights behind [`ModelFingerprint::weights_hash`].
///
/// Feed each weight tensor in name order as f32 values (dequantised if the file is quantised, in the
/// Hugging Face layout): the sampler takes up to [`WeightSampler::PER_TENSOR`] values at an even
/// stride, plus the tensor's name and shape, so hashing costs a few microseconds per tensor and the
/// result does not depend on how the weights were stored on disk.
pub struct WeightSampler {
    hasher: Sha256,
}

impl Default for WeightSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl WeightSampler {
    /// Values sampled from each tensor.
    pub const PER_TENSOR: usize = 64;

    /// An empty sampler.
    pub fn new() -> Self {
        Self {
            hasher: Sha256::new(),
        }
    }

    /// Add one tensor: its name, shape and a strided sample of its values (row-major order).
    /// `value_at(i)` returns element `i` of the flattened tensor, for `i < numel`.
    pub fn add(&mut self, name: &str, shape: &[usize], mut value_at: impl FnMut(usize) -> f32) {
        self.hasher.update((name.len() as u64).to_le_bytes());
        self.hasher.update(name.as_bytes());
        self.hasher.update((shape.len() as u64).to_le_bytes());
        let mut numel = 1usize;
        for &d in shape {
            self.hasher.update((d as u64).to_le_bytes());
            numel = numel.saturating_mul(d);
        }
        let n = numel.min(Self::PER_TENSOR);
        for j in 0..n {
            // Even stride over [0, numel): index j * numel / n, computed without overflow.
            let i = ((j as u128 * numel as u128) / n as u128) as usize;
            // Round to bf16 precision so f32/f16/bf16 copies of the same model agree.
            let v = half::bf16::from_f32(value_at(i)).to_bits();
            self.hasher.update(v.to_le_bytes());
        }
    }

    /// `sha256:<hex>` over everything added.
    pub fn finish(self) -> String {
        format!("sha256:{}", hex(&self.hasher.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> ModelFingerprint {
        ModelFingerprint {
            architecture: "llama".into(),
            num_layers: 2,
            hidden_size: 8,
            num_attention_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            vocab_size: 32,
            rope_theta: 10000.0,
            rope_scaling: None,
            tokenizer_hash: sha256_hex(b"tok"),
            weights_hash: sha256_hex(b"w"),
        }
    }

    #[test]
    fn differences_name_the_fields() {
        let a = fp();
        let mut b = fp();
        assert!(a.differences(&b).is_empty());
        b.vocab_size = 33;
        b.weights_hash = sha256_hex(b"other");
        assert_eq!(a.differences(&b), vec!["vocab_size", "weights_hash"]);
    }

    #[test]
    fn sampler_depends_on_values_names_and_shapes() {
        let hash = |name: &str, shape: &[usize], bump: f32| {
            let mut s = WeightSampler::new();
            s.add(name, shape, |i| i as f32 + bump);
            s.finish()
        };
        let base = hash("a", &[4, 100], 0.0);
        assert_eq!(base, hash("a", &[4, 100], 0.0));
        assert_ne!(base, hash("b", &[4, 100], 0.0));
        assert_ne!(base, hash("a", &[100, 4], 0.0));
        assert_ne!(base, hash("a", &[4, 100], 1.0));
    }
}
