//! Shared test helper: tiny random Llama / Qwen2 / Qwen3 models written to a temp dir as Hugging
//! Face folders (config.json + model.safetensors) and loaded back through `safetensors_dir`.

#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use cartridge_runtime::models::{Architecture, Transformer};
use cartridge_runtime::safetensors_dir;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const ALL: [Architecture; 3] = [
    Architecture::Llama,
    Architecture::Qwen2,
    Architecture::Qwen3,
];

/// Shapes of the tiny models. Qwen3's head_dim is not hidden/heads, as in the real family.
pub struct Tiny {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub layers: usize,
    pub vocab: usize,
}

pub fn tiny(arch: Architecture) -> Tiny {
    Tiny {
        hidden: 32,
        heads: 4,
        kv_heads: 2,
        head_dim: if arch == Architecture::Qwen3 { 16 } else { 8 },
        inter: 48,
        layers: 3,
        vocab: 61,
    }
}

fn rand_tensor(rng: &mut StdRng, shape: &[usize], scale: f32, offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// Write a tiny random model of `arch` into a fresh temp dir.
pub fn write_tiny(arch: Architecture, seed: u64) -> tempfile::TempDir {
    let t = tiny(arch);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let tied = arch == Architecture::Llama;
    let model_type = arch.name();
    let config = serde_json::json!({
        "architectures": [match arch {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }],
        "model_type": model_type,
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
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config");
    let (h, kv, d, hid, inter) = (t.heads, t.kv_heads, t.head_dim, t.hidden, t.inter);
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        rand_tensor(&mut rng, &[t.vocab, hid], 1.0, 0.0),
    );
    let lin = |rng: &mut StdRng, out: usize, inp: usize| {
        rand_tensor(rng, &[out, inp], 1.7 / (inp as f32).sqrt(), 0.0)
    };
    for i in 0..t.layers {
        let p = format!("model.layers.{i}");
        w.insert(
            format!("{p}.input_layernorm.weight"),
            rand_tensor(&mut rng, &[hid], 0.2, 1.0),
        );
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            rand_tensor(&mut rng, &[hid], 0.2, 1.0),
        );
        w.insert(
            format!("{p}.self_attn.q_proj.weight"),
            lin(&mut rng, h * d, hid),
        );
        w.insert(
            format!("{p}.self_attn.k_proj.weight"),
            lin(&mut rng, kv * d, hid),
        );
        w.insert(
            format!("{p}.self_attn.v_proj.weight"),
            lin(&mut rng, kv * d, hid),
        );
        w.insert(
            format!("{p}.self_attn.o_proj.weight"),
            lin(&mut rng, hid, h * d),
        );
        if arch == Architecture::Qwen2 {
            w.insert(
                format!("{p}.self_attn.q_proj.bias"),
                rand_tensor(&mut rng, &[h * d], 0.3, 0.0),
            );
            w.insert(
                format!("{p}.self_attn.k_proj.bias"),
                rand_tensor(&mut rng, &[kv * d], 0.3, 0.0),
            );
            w.insert(
                format!("{p}.self_attn.v_proj.bias"),
                rand_tensor(&mut rng, &[kv * d], 0.3, 0.0),
            );
        }
        if arch == Architecture::Qwen3 {
            w.insert(
                format!("{p}.self_attn.q_norm.weight"),
                rand_tensor(&mut rng, &[d], 0.2, 1.0),
            );
            w.insert(
                format!("{p}.self_attn.k_norm.weight"),
                rand_tensor(&mut rng, &[d], 0.2, 1.0),
            );
        }
        w.insert(
            format!("{p}.mlp.gate_proj.weight"),
            lin(&mut rng, inter, hid),
        );
        w.insert(format!("{p}.mlp.up_proj.weight"), lin(&mut rng, inter, hid));
        w.insert(
            format!("{p}.mlp.down_proj.weight"),
            lin(&mut rng, hid, inter),
        );
    }
    w.insert(
        "model.norm.weight".into(),
        rand_tensor(&mut rng, &[hid], 0.2, 1.0),
    );
    if !tied {
        w.insert("lm_head.weight".into(), lin(&mut rng, t.vocab, hid));
    }
    candle_core::safetensors::save(&w, dir.path().join("model.safetensors")).expect("save");
    dir
}

/// A tiny random model of `arch`, loaded in `dtype` on the CPU. Keep the TempDir alive only as
/// long as loading needs it: weights are copied out of the map.
pub fn tiny_model(arch: Architecture, dtype: DType) -> Transformer {
    let dir = write_tiny(arch, 7 + arch as u64);
    let (_, model) = safetensors_dir::load_model(dir.path(), dtype, &Device::Cpu).expect("load");
    model
}

/// `[1, n]` u32 tensor of ids.
pub fn ids(tokens: &[u32]) -> Tensor {
    Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &Device::Cpu).expect("ids")
}

/// Max |a - b| in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).expect("f64") - b.to_dtype(DType::F64).expect("f64"))
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f64>()
        .expect("scalar")
}

/// Deterministic pseudo-random token ids in `2..vocab`.
pub fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(2..vocab as u32)).collect()
}
