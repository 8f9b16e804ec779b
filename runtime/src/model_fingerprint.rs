//! The [`ModelFingerprint`] of a loaded model: shapes from the config, a hash of the tokenizer's
//! canonical description and a hash of a fixed sample of the weights.
//!
//! Weights are sampled under their Hugging Face names, in name order, in the Hugging Face layout
//! (GGUF Q/K rows already de-permuted), so the same model loaded from a GGUF or from a Hugging Face
//! folder gets the same `weights_hash` up to quantisation. With tied embeddings `lm_head.weight` is
//! left out, because some checkpoints store the tied copy and others do not.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use cartridge_formats::{ModelFingerprint, WeightSampler};

use crate::error::Result;
use crate::models::config::ModelConfig;
use crate::tokenizer::Tokenizer;

/// `sha256:<hex>` over a strided sample of every weight (see [`WeightSampler`]).
pub fn weights_hash(cfg: &ModelConfig, weights: &BTreeMap<String, Tensor>) -> Result<String> {
    let mut sampler = WeightSampler::new();
    for (name, t) in weights {
        if cfg.tie_word_embeddings && name == "lm_head.weight" {
            continue;
        }
        let shape = t.dims().to_vec();
        // Ask the sampler which indices it wants (a dry run), gather just those values, then feed
        // them: copying whole tensors to the host would cost more than the hash.
        let mut wanted = Vec::new();
        WeightSampler::new().add(name, &shape, |i| {
            wanted.push(i as u32);
            0.0
        });
        let values: Vec<f32> = if wanted.is_empty() {
            Vec::new()
        } else {
            let idx = Tensor::from_vec(wanted.clone(), wanted.len(), t.device())?;
            t.flatten_all()?
                .index_select(&idx, 0)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .to_vec1()?
        };
        let mut k = 0usize;
        sampler.add(name, &shape, |_| {
            let v = values.get(k).copied().unwrap_or(f32::NAN);
            k += 1;
            v
        });
    }
    Ok(sampler.finish())
}

/// The fingerprint of a model with this config, weights and tokenizer.
pub fn fingerprint(
    cfg: &ModelConfig,
    weights: &BTreeMap<String, Tensor>,
    tokenizer: &Tokenizer,
) -> Result<ModelFingerprint> {
    Ok(from_hashes(
        cfg,
        weights_hash(cfg, weights)?,
        tokenizer.hash()?,
    ))
}

/// The fingerprint from a config and hashes computed elsewhere ([`weights_hash`],
/// [`Tokenizer::hash`]), e.g. on separate threads while loading.
pub fn from_hashes(
    cfg: &ModelConfig,
    weights_hash: String,
    tokenizer_hash: String,
) -> ModelFingerprint {
    let u = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    ModelFingerprint {
        architecture: cfg.architecture.name().to_string(),
        num_layers: u(cfg.num_layers),
        hidden_size: u(cfg.hidden_size),
        num_attention_heads: u(cfg.num_attention_heads),
        num_kv_heads: u(cfg.num_kv_heads),
        head_dim: u(cfg.head_dim),
        vocab_size: u(cfg.vocab_size),
        rope_theta: cfg.rope_theta,
        rope_scaling: cfg.rope_scaling.clone(),
        tokenizer_hash,
        weights_hash,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::Architecture;

    fn cfg() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 8,
            hidden_size: 4,
            intermediate_size: 8,
            num_layers: 1,
            num_attention_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn hash_matches_a_direct_sampler_and_skips_tied_head() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 1000., &dev)?.reshape((10, 100))?;
        let mut w = BTreeMap::new();
        w.insert("model.embed_tokens.weight".to_string(), a.clone());
        let h = weights_hash(&cfg(), &w)?;
        let flat: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let mut s = WeightSampler::new();
        s.add("model.embed_tokens.weight", &[10, 100], |i| flat[i]);
        assert_eq!(h, s.finish());
        w.insert("lm_head.weight".to_string(), a.clone());
        assert_eq!(h, weights_hash(&cfg(), &w)?);
        w.insert("model.norm.weight".to_string(), a);
        assert_ne!(h, weights_hash(&cfg(), &w)?);
        Ok(())
    }
}
