//! Shared test helpers: a tiny random Llama written to a temp dir as a Hugging Face folder (the
//! approach of `runtime/tests/common`, kept here so the crates' tests stay independent), and a toy
//! self-study dataset whose teacher is the same model with a "corpus" in its context.

#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use cartridge_compiler::TrainData;
use cartridge_formats::dataset::{ChunkLocation, Record};
use cartridge_formats::ModelFingerprint;
use cartridge_runtime::models::{Logits, Transformer};
use cartridge_runtime::{model_fingerprint, ops, safetensors_dir, Path};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const VOCAB: usize = 61;

fn rand_tensor(rng: &mut StdRng, shape: &[usize], scale: f32, offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// A tiny random Llama (tied embeddings, GQA 4/2 heads, 3 layers), f32 on the CPU, with a
/// fingerprint made from `tag` (two tags: two "different" models).
pub fn tiny_model(seed: u64, tag: &str) -> (Transformer, ModelFingerprint) {
    tiny_model_dtype(seed, tag, DType::F32)
}

/// [`tiny_model`] in `dtype` (f64 for finite differences).
pub fn tiny_model_dtype(seed: u64, tag: &str, dtype: DType) -> (Transformer, ModelFingerprint) {
    let (hid, h, kv, d, inter, layers) = (32, 4, 2, 8, 48, 3);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": VOCAB, "hidden_size": hid, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": h, "num_key_value_heads": kv,
        "head_dim": d, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 1024, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config");
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        rand_tensor(&mut rng, &[VOCAB, hid], 1.0, 0.0),
    );
    let lin = |rng: &mut StdRng, out: usize, inp: usize| {
        rand_tensor(rng, &[out, inp], 1.7 / (inp as f32).sqrt(), 0.0)
    };
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let norm = rand_tensor(&mut rng, &[hid], 0.2, 1.0);
        w.insert(format!("{p}.input_layernorm.weight"), norm);
        let norm = rand_tensor(&mut rng, &[hid], 0.2, 1.0);
        w.insert(format!("{p}.post_attention_layernorm.weight"), norm);
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
    candle_core::safetensors::save(&w, dir.path().join("model.safetensors")).expect("save");
    let (cfg, model) = safetensors_dir::load_model(dir.path(), dtype, &Device::Cpu).expect("load");
    let hash = |s: &str| {
        let hex: String = s
            .bytes()
            .cycle()
            .take(32)
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("sha256:{hex}")
    };
    let fp = model_fingerprint::from_hashes(&cfg, hash(tag), hash("tokenizer"));
    (model, fp)
}

/// Deterministic pseudo-random token ids in `2..VOCAB`.
pub fn tokens(seed: u64, n: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(2..VOCAB as u32)).collect()
}

/// The toy corpus.
pub fn corpus() -> Vec<u32> {
    tokens(1000, 48)
}

/// `n` conversations: random tokens, targets from position 4 on, the teacher's top-`k` taken
/// from the model with the whole corpus in front (its KV as a prefix: in-context learning).
pub fn toy_data(model: &Transformer, n: usize, k: usize) -> TrainData {
    let ctx = model.prefix_kv(None, &corpus()).expect("corpus kv");
    let records = (0..n)
        .map(|i| {
            let len = 10 + (i * 7) % 9;
            let toks = tokens(2000 + i as u64, len);
            let ids = Tensor::from_vec(toks.clone(), (1, len), &Device::Cpu).expect("ids");
            let logits = model
                .forward(Some(&ctx), None, &ids, Logits::All, Path::Infer)
                .expect("teacher forward")
                .squeeze(0)
                .expect("squeeze");
            let lsm: Vec<Vec<f32>> = ops::log_softmax_last_dim(&logits)
                .expect("lsm")
                .to_vec2()
                .expect("rows");
            let start = 4usize;
            let (mut topk_ids, mut topk_lp) = (Vec::new(), Vec::new());
            for pos in start..len {
                // Row pos - 1 predicts token pos.
                let row = &lsm[pos - 1];
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                for &j in &order[..k] {
                    topk_ids.push(j as u32);
                    topk_lp.push(row[j]);
                }
            }
            Record {
                id: i as u64,
                seed_kind: "question".into(),
                seed_prompt: String::new(),
                location: ChunkLocation {
                    chunk: 0,
                    pieces: Vec::new(),
                },
                messages: Vec::new(),
                tokens: toks,
                targets: vec![(start as u32, (len - start) as u32)],
                top_k: k as u32,
                topk_ids,
                topk_logprobs: topk_lp,
            }
        })
        .collect();
    TrainData {
        records,
        corpus_digest: Some(format!("sha256:{}", "ab".repeat(32))),
        teacher: None,
        summary: None,
    }
}
