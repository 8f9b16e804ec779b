//! Tiny random models for tests (cargo feature `testing`, off by default).
//!
//! [`TinySpec::write`] writes a Hugging Face folder — `config.json`, `model.safetensors` and, for a
//! chat model, a byte-level `tokenizer.json` with ChatML special tokens and a
//! `tokenizer_config.json` with a ChatML template — that [`crate::loader`] and
//! [`crate::safetensors_dir`] load like a real checkpoint. The weights are a pure function of the
//! spec and the seed: tests compare against values, so the order of the random draws is part of
//! the contract and must not change.
//!
//! ```
//! use cartridge_runtime::testing::TinySpec;
//! let dir = std::env::temp_dir().join(format!("tiny-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! TinySpec::llama_chat().write(&dir, 7).unwrap();
//! assert!(dir.join("tokenizer.json").exists());
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::models::Architecture;
use crate::{Error, Result};

/// Vocabulary of the plain tiny models ([`TinySpec::for_arch`]).
pub const TINY_VOCAB: usize = 61;
/// Vocabulary of the chat models: 3 special tokens then the 256 byte-level symbols.
pub const CHAT_VOCAB: usize = 259;
/// `<|im_start|>`, also the BOS token.
pub const IM_START: u32 = 1;
/// `<|im_end|>`, also the EOS token.
pub const IM_END: u32 = 2;

/// The ChatML template written into `tokenizer_config.json`.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Shapes and options of a tiny random model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    /// Architecture family; Llama ties the embeddings, Qwen2 adds q/k/v biases, Qwen3 q/k norms.
    pub arch: Architecture,
    /// Residual stream width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// MLP inner width.
    pub inter: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Vocabulary size (must be [`CHAT_VOCAB`] with `chat`).
    pub vocab: usize,
    /// Embedding entries are uniform in `[-embed_scale, embed_scale]`.
    pub embed_scale: f32,
    /// Also write the byte-level tokenizer and the ChatML template.
    pub chat: bool,
}

impl TinySpec {
    /// The runtime's and compiler's test models: hidden 32, 4 query / 2 KV heads, head dim 8 (16
    /// for Qwen3: as in the real family it is not hidden / heads), MLP 48, 3 layers, vocabulary
    /// [`TINY_VOCAB`], no tokenizer.
    pub fn for_arch(arch: Architecture) -> Self {
        TinySpec {
            arch,
            hidden: 32,
            heads: 4,
            kv_heads: 2,
            head_dim: if arch == Architecture::Qwen3 { 16 } else { 8 },
            inter: 48,
            layers: 3,
            vocab: TINY_VOCAB,
            embed_scale: 1.0,
            chat: false,
        }
    }

    /// A 2-layer Llama chat model: vocabulary [`CHAT_VOCAB`], byte-level tokenizer, ChatML.
    pub fn llama_chat() -> Self {
        TinySpec {
            layers: 2,
            vocab: CHAT_VOCAB,
            chat: true,
            ..TinySpec::for_arch(Architecture::Llama)
        }
    }

    /// The same spec with embeddings uniform in `[-scale, scale]`.
    pub fn with_embed_scale(self, scale: f32) -> Self {
        TinySpec {
            embed_scale: scale,
            ..self
        }
    }

    /// Write the model into the existing folder `dir`, weights drawn from `seed`.
    pub fn write(&self, dir: &Path, seed: u64) -> Result<()> {
        let t = self;
        assert!(
            !t.chat || t.vocab == CHAT_VOCAB,
            "a chat model's vocabulary is the {CHAT_VOCAB} byte-level tokens"
        );
        let arch = t.arch;
        let tied = arch == Architecture::Llama;
        let config = serde_json::json!({
            "architectures": [match arch {
                Architecture::Llama => "LlamaForCausalLM",
                Architecture::Qwen2 => "Qwen2ForCausalLM",
                Architecture::Qwen3 => "Qwen3ForCausalLM",
            }],
            "model_type": arch.name(),
            "vocab_size": t.vocab,
            "hidden_size": t.hidden,
            "intermediate_size": t.inter,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "num_key_value_heads": t.kv_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": tied,
            "bos_token_id": IM_START,
            "eos_token_id": IM_END,
        });
        write_file(&dir.join("config.json"), config.to_string())?;
        if t.chat {
            write_file(&dir.join("tokenizer.json"), tokenizer_json().to_string())?;
            let tok_cfg = serde_json::json!({
                "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML,
            });
            write_file(&dir.join("tokenizer_config.json"), tok_cfg.to_string())?;
        }

        // The draw order below is what every seed's weights depend on.
        let mut rng = StdRng::seed_from_u64(seed);
        let (h, kv, d, hid, inter) = (t.heads, t.kv_heads, t.head_dim, t.hidden, t.inter);
        let lin = |rng: &mut StdRng, out: usize, inp: usize| {
            rand_tensor(rng, &[out, inp], 1.7 / (inp as f32).sqrt(), 0.0)
        };
        let norm = |rng: &mut StdRng, n: usize| rand_tensor(rng, &[n], 0.2, 1.0);
        let mut w: HashMap<String, Tensor> = HashMap::new();
        w.insert(
            "model.embed_tokens.weight".into(),
            rand_tensor(&mut rng, &[t.vocab, hid], t.embed_scale, 0.0)?,
        );
        for i in 0..t.layers {
            let p = format!("model.layers.{i}");
            w.insert(format!("{p}.input_layernorm.weight"), norm(&mut rng, hid)?);
            let post = norm(&mut rng, hid)?;
            w.insert(format!("{p}.post_attention_layernorm.weight"), post);
            w.insert(
                format!("{p}.self_attn.q_proj.weight"),
                lin(&mut rng, h * d, hid)?,
            );
            w.insert(
                format!("{p}.self_attn.k_proj.weight"),
                lin(&mut rng, kv * d, hid)?,
            );
            w.insert(
                format!("{p}.self_attn.v_proj.weight"),
                lin(&mut rng, kv * d, hid)?,
            );
            w.insert(
                format!("{p}.self_attn.o_proj.weight"),
                lin(&mut rng, hid, h * d)?,
            );
            if arch == Architecture::Qwen2 {
                for (name, n) in [("q", h * d), ("k", kv * d), ("v", kv * d)] {
                    let bias = rand_tensor(&mut rng, &[n], 0.3, 0.0)?;
                    w.insert(format!("{p}.self_attn.{name}_proj.bias"), bias);
                }
            }
            if arch == Architecture::Qwen3 {
                w.insert(format!("{p}.self_attn.q_norm.weight"), norm(&mut rng, d)?);
                w.insert(format!("{p}.self_attn.k_norm.weight"), norm(&mut rng, d)?);
            }
            w.insert(
                format!("{p}.mlp.gate_proj.weight"),
                lin(&mut rng, inter, hid)?,
            );
            w.insert(
                format!("{p}.mlp.up_proj.weight"),
                lin(&mut rng, inter, hid)?,
            );
            w.insert(
                format!("{p}.mlp.down_proj.weight"),
                lin(&mut rng, hid, inter)?,
            );
        }
        w.insert("model.norm.weight".into(), norm(&mut rng, hid)?);
        if !tied {
            w.insert("lm_head.weight".into(), lin(&mut rng, t.vocab, hid)?);
        }
        candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
        Ok(())
    }
}

fn write_file(path: &Path, text: String) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `offset + scale * u`, `u` uniform in `[-1, 1)`, one draw per entry in row-major order.
fn rand_tensor(rng: &mut StdRng, shape: &[usize], scale: f32, offset: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// GPT-2's byte -> printable character table.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        // Every code point here is below 0x200: never a surrogate.
        table[*b as usize] = char::from_u32(c).unwrap_or(' ');
    }
    table
}

/// A byte-level BPE with no merges: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then one token
/// per byte.
fn tokenizer_json() -> serde_json::Value {
    let table = bytes_to_unicode();
    let mut vocab = serde_json::Map::new();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), (i as u64).into());
    }
    for (b, c) in table.iter().enumerate() {
        vocab.insert(c.to_string(), (3 + b as u64).into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    })
}

/// The devices the device-parameterised tests run on: the CPU, then `cuda:0` when this build has
/// CUDA and a GPU opens. `CARTRIDGE_REQUIRE_CUDA=1` (the GPU check script sets it) turns a GPU
/// that does not open into a failure, so that a GPU run cannot quietly test only the CPU.
///
/// ```
/// let devices = cartridge_runtime::testing::test_devices();
/// assert!(devices[0].is_cpu());
/// ```
pub fn test_devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    let required = std::env::var("CARTRIDGE_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    match crate::device::DeviceSpec::Cuda(0).open() {
        Ok(gpu) => devices.push(gpu),
        Err(e) if required => panic!("CARTRIDGE_REQUIRE_CUDA=1 but cuda:0 does not open: {e}"),
        Err(_) => {}
    }
    devices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_permutation() {
        let mut t = bytes_to_unicode();
        t.sort_unstable();
        t.dedup();
        assert_eq!(t.len(), 256);
    }
}
