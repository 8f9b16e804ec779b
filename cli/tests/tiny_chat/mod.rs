//! A tiny random chat model written as a Hugging Face folder (config.json, model.safetensors, a
//! byte-level tokenizer.json with ChatML special tokens, a ChatML template): the same recipe as
//! the self-study and server tests, for CLI tests that must not need the real model.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path as FsPath;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Vocabulary: 3 special tokens then the 256 byte-level symbols.
pub const VOCAB: usize = 259;
pub const IM_START: u32 = 1;
pub const IM_END: u32 = 2;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

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
        table[*b as usize] = char::from_u32(c).expect("char");
    }
    table
}

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

fn rand_tensor(rng: &mut StdRng, shape: &[usize], scale: f32, offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// Write a tiny random Llama chat model into `dir`.
pub fn write_tiny_chat_model(dir: &FsPath, seed: u64) {
    let (hid, heads, kv, d, inter, layers) = (32usize, 4usize, 2usize, 8usize, 48usize, 2usize);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": VOCAB, "hidden_size": hid, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": d, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 1024, "tie_word_embeddings": true,
        "bos_token_id": IM_START, "eos_token_id": IM_END,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).expect("tokenizer");
    let tok_cfg = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tok_cfg.to_string()).expect("tok cfg");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        rand_tensor(&mut rng, &[VOCAB, hid], 0.3, 0.0),
    );
    let lin = |rng: &mut StdRng, out: usize, inp: usize| {
        rand_tensor(rng, &[out, inp], 1.7 / (inp as f32).sqrt(), 0.0)
    };
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let norm = |rng: &mut StdRng| rand_tensor(rng, &[hid], 0.2, 1.0);
        w.insert(format!("{p}.input_layernorm.weight"), norm(&mut rng));
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            norm(&mut rng),
        );
        w.insert(
            format!("{p}.self_attn.q_proj.weight"),
            lin(&mut rng, heads * d, hid),
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
            lin(&mut rng, hid, heads * d),
        );
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
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).expect("save");
}
