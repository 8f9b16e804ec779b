//! Shared test helpers: a tiny random Llama (`cartridge_runtime::testing`) written to a temp dir
//! and loaded back, and a toy self-study dataset whose teacher is the same model with a "corpus"
//! in its context.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use cartridge_compiler::TrainData;
use cartridge_formats::dataset::{ChunkLocation, Record};
use cartridge_formats::ModelFingerprint;
use cartridge_runtime::models::{Architecture, Logits, Transformer};
use cartridge_runtime::testing::{TinySpec, TINY_VOCAB};
use cartridge_runtime::{model_fingerprint, ops, safetensors_dir, Path};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const VOCAB: usize = TINY_VOCAB;

/// Max |a - b| in f64, on the CPU (either tensor may live on a GPU).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A tiny random Llama (tied embeddings, GQA 4/2 heads, 3 layers), f32 on the CPU, with a
/// fingerprint made from `tag` (two tags: two "different" models).
pub fn tiny_model(seed: u64, tag: &str) -> (Transformer, ModelFingerprint) {
    tiny_model_dtype(seed, tag, DType::F32)
}

/// [`tiny_model`] in `dtype` (f64 for finite differences).
pub fn tiny_model_dtype(seed: u64, tag: &str, dtype: DType) -> (Transformer, ModelFingerprint) {
    tiny_model_on(seed, tag, dtype, &Device::Cpu)
}

/// [`tiny_model`] in `dtype` on `device`.
pub fn tiny_model_on(
    seed: u64,
    tag: &str,
    dtype: DType,
    device: &Device,
) -> (Transformer, ModelFingerprint) {
    let dir = tempfile::tempdir().expect("tempdir");
    TinySpec::for_arch(Architecture::Llama)
        .write(dir.path(), seed)
        .expect("write tiny model");
    let (cfg, model) = safetensors_dir::load_model(dir.path(), dtype, device).expect("load");
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
