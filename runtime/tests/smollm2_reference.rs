//! SmolLM2-135M-Instruct against reference vectors computed by an independent implementation
//! (Hugging Face transformers 5.24 on torch 2.15, f32, from the same GGUF): tokenizer ids, chat
//! template, dequantised weights, the GGUF Q/K layout, top-20 log-probs, greedy continuations, a
//! cartridge forward and a 5-step cartridge training run. `tests/fixtures/README` is
//! `../shared/fixtures/README.md`; the JSON is copied verbatim.
//!
//! The model comes from `scripts/fetch-model.sh` (or `$CARTRIDGE_MODEL`). Without it these tests
//! print a note and pass, except under CI (`CI` set), where a missing model is a failure.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use cartridge_runtime::chat_template::ChatMessage;
use cartridge_runtime::generate::{
    generate_batch, BatchOptions, Control, GenerateRequest, SamplingParams,
};
use cartridge_runtime::gguf::{self, GgufFile};
use cartridge_runtime::loader::{self, LoadedModel};
use cartridge_runtime::models::{Logits, Transformer};
use cartridge_runtime::ops::{self, Path};
use cartridge_runtime::prefix::PrefixKv;
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/smollm2_reference.json");
/// Top-k log-probabilities must agree this closely with the reference (issue 3).
const LOGPROB_TOL: f64 = 2e-3;
/// A greedy step whose top-1/top-2 logit margin in the reference is below this is a near-tie:
/// ours may legitimately pick the other token there, so comparison stops at the first one.
const NEAR_TIE: f64 = 1e-2;
/// Training losses (f32 forward and backward, Adam steps) agree with the reference to ~1e-5; this
/// leaves headroom for other CPUs' summation orders while catching any real slip.
const LOSS_TOL: f64 = 2e-4;
/// Relative tolerance on step-0 gradient norms (measured ~1e-5).
const GRAD_TOL: f64 = 2e-3;

fn fixture() -> &'static Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| serde_json::from_str(FIXTURE).expect("fixture is valid JSON"))
}

/// The model file, or `None` (with a note) when it is absent outside CI.
fn model_path() -> Option<PathBuf> {
    let path = loader::default_model_path().expect("a default model path");
    if path.is_file() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "model {} is missing under CI: run scripts/fetch-model.sh before the tests",
            path.display()
        );
    }
    eprintln!(
        "skipped: model {} not found; run scripts/fetch-model.sh",
        path.display()
    );
    None
}

struct Loaded {
    model: LoadedModel,
    net: Transformer,
}

/// The model, loaded once per test binary.
fn loaded() -> Option<&'static Loaded> {
    static M: OnceLock<Option<Loaded>> = OnceLock::new();
    M.get_or_init(|| {
        let path = model_path()?;
        let model = loader::load(&path, &Device::Cpu).expect("the default model loads");
        let net = model.transformer().expect("forward loads");
        Some(Loaded { model, net })
    })
    .as_ref()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id array")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("a number array")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// `[[id, logprob], ...]` pairs.
fn pairs(v: &Value) -> Vec<(u32, f64)> {
    v.as_array()
        .expect("pairs")
        .iter()
        .map(|p| {
            (
                p[0].as_u64().expect("id") as u32,
                p[1].as_f64().expect("logprob"),
            )
        })
        .collect()
}

/// log_softmax in f64 of one row of f32 logits.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row
        .iter()
        .fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
    let lse = row
        .iter()
        .map(|&x| (f64::from(x) - m).exp())
        .sum::<f64>()
        .ln()
        + m;
    row.iter().map(|&x| f64::from(x) - lse).collect()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1.0)
}

#[test]
fn config_matches_reference() {
    let Some(m) = loaded() else { return };
    let c = &fixture()["meta"]["config"];
    let cfg = &m.model.config;
    assert_eq!(
        cfg.num_layers as u64,
        c["num_hidden_layers"].as_u64().unwrap()
    );
    assert_eq!(cfg.hidden_size as u64, c["hidden_size"].as_u64().unwrap());
    assert_eq!(
        cfg.intermediate_size as u64,
        c["intermediate_size"].as_u64().unwrap()
    );
    assert_eq!(
        cfg.num_attention_heads as u64,
        c["num_attention_heads"].as_u64().unwrap()
    );
    assert_eq!(
        cfg.num_kv_heads as u64,
        c["num_key_value_heads"].as_u64().unwrap()
    );
    assert_eq!(cfg.vocab_size as u64, c["vocab_size"].as_u64().unwrap());
    assert_eq!(cfg.head_dim, 64);
    assert_eq!(cfg.rms_norm_eps, c["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(
        cfg.rope_theta,
        fixture()["rope_layout"]["rope_theta"].as_f64().unwrap()
    );
    assert_eq!(
        cfg.tie_word_embeddings,
        c["tie_word_embeddings"].as_bool().unwrap()
    );
    assert_eq!(
        cfg.max_position_embeddings as u64,
        c["max_position_embeddings"].as_u64().unwrap()
    );
    assert_eq!(cfg.bos_token_id, Some(1));
    assert_eq!(cfg.eos_token_ids, vec![2]);
    let tok = &m.model.tokenizer;
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(tok.id_to_token(0).as_deref(), Some("<|endoftext|>"));
    assert_eq!(tok.id_to_token(1).as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    let fp = &m.model.fingerprint;
    assert_eq!(fp.architecture, "llama");
    assert_eq!((fp.num_layers, fp.num_kv_heads, fp.head_dim), (30, 3, 64));
    assert!(fp.weights_hash.starts_with("sha256:") && fp.tokenizer_hash.starts_with("sha256:"));
    eprintln!("fingerprint: {}", fp.short());
}

#[test]
fn tokenizer_and_chat_template_match_reference() {
    let Some(m) = loaded() else { return };
    let tok = &m.model.tokenizer;
    let template = m
        .model
        .chat_template
        .as_ref()
        .expect("the GGUF has a chat template");
    let prompts = fixture()["prompts"].as_array().expect("prompts");
    assert_eq!(prompts.len(), 6);
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let text = p["text"].as_str().unwrap();
        if p["kind"] == "chat" {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(p["messages"].clone()).expect("messages");
            let rendered = template.render(&messages, true).expect("template renders");
            assert_eq!(rendered, text, "{name}: chat template render differs");
        }
        let ids = tok.encode(text, false).expect("encodes");
        // SmolLM2 adds no special tokens on encode (`meta.tokenizer.adds_special_tokens`).
        assert_eq!(
            tok.encode(text, true).expect("encodes"),
            ids,
            "{name}: adds tokens"
        );
        assert_eq!(ids, ids_of(&p["ids"]), "{name}: token ids differ");
        let tokens: Vec<String> = ids
            .iter()
            .map(|&i| tok.id_to_token(i).expect("known id"))
            .collect();
        let want: Vec<String> = serde_json::from_value(p["tokens"].clone()).expect("token strings");
        assert_eq!(tokens, want, "{name}: token strings differ");
        let back = tok.decode(&ids, false).expect("decodes");
        assert_eq!(back, text, "{name}: decode does not round-trip");
    }
    // Every digit is its own token; a space before a number is a lone `Ġ`.
    assert_eq!(
        tok.encode(" 2025", false).unwrap(),
        vec![216, 34, 32, 34, 37]
    );
}

/// Sum, sum of squares, first 8 values and 8 strided values of a flattened tensor.
fn stats(v: &[f32]) -> (f64, f64, Vec<f64>, Vec<f64>) {
    let sum = v.iter().map(|&x| f64::from(x)).sum();
    let sum_sq = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let first8 = v.iter().take(8).map(|&x| f64::from(x)).collect();
    let stride = v.len() / 8;
    let at_stride = (0..8).map(|k| f64::from(v[k * stride])).collect();
    (sum, sum_sq, first8, at_stride)
}

#[test]
fn dequantised_weights_match_reference_in_gguf_order() {
    let Some(path) = model_path() else { return };
    let g = GgufFile::open(&path).expect("opens");
    let check = &fixture()["dequant_check"];
    assert_eq!(
        g.tensor_names().len() as u64,
        check["n_tensors"].as_u64().unwrap()
    );
    for (name, want) in check["fingerprints_gguf_order"].as_object().unwrap() {
        let dtype = g.tensor_dtype(name).expect("tensor exists");
        assert_eq!(
            format!("{dtype:?}"),
            want["type"].as_str().unwrap(),
            "{name}: type"
        );
        let t = g.dequantize_raw(name).expect("dequantises");
        let shape: Vec<usize> = serde_json::from_value(want["row_major_shape"].clone()).unwrap();
        assert_eq!(t.dims(), shape.as_slice(), "{name}: shape");
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v.len() as u64, want["n"].as_u64().unwrap());
        let (sum, sum_sq, first8, at_stride) = stats(&v);
        assert!(
            close(sum, want["sum"].as_f64().unwrap(), 1e-6),
            "{name}: sum {sum}"
        );
        assert!(
            close(sum_sq, want["sum_sq"].as_f64().unwrap(), 1e-6),
            "{name}: sum_sq {sum_sq}"
        );
        // Same formulas in f32: values agree to f32 rounding (the reference printed some values
        // from an f64 computation, one ulp of f64 away from ours).
        for (what, ours, theirs) in [
            ("first values", first8, f64s(&want["first8"])),
            ("strided values", at_stride, f64s(&want["at_stride"])),
        ] {
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-7 * b.abs(),
                    "{name}: {what}[{i}]: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn qk_rows_are_in_hugging_face_layout() {
    let Some(path) = model_path() else { return };
    let g = GgufFile::open(&path).expect("opens");
    let cfg = g.config().expect("config");
    let d = cfg.head_dim;
    let weights = match loaded() {
        Some(m) => m.model.weights.clone(),
        None => return,
    };
    for (gguf_name, hf_name, heads) in [
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            cfg.num_attention_heads,
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
            cfg.num_kv_heads,
        ),
        (
            "blk.29.attn_k.weight",
            "model.layers.29.self_attn.k_proj.weight",
            cfg.num_kv_heads,
        ),
    ] {
        let raw: Vec<Vec<f32>> = g.dequantize_raw(gguf_name).unwrap().to_vec2().unwrap();
        let hf: Vec<Vec<f32>> = weights[hf_name].to_vec2().unwrap();
        assert_eq!(raw.len(), heads * d);
        // hf_row[j] = gguf_row[2j], hf_row[j + d/2] = gguf_row[2j + 1], per head.
        for h in 0..heads {
            for j in 0..d / 2 {
                assert_eq!(
                    hf[h * d + j],
                    raw[h * d + 2 * j],
                    "{hf_name} head {h} row {j}"
                );
                assert_eq!(
                    hf[h * d + d / 2 + j],
                    raw[h * d + 2 * j + 1],
                    "{hf_name} head {h}"
                );
            }
        }
        // It is a real reordering, not the identity.
        assert_ne!(hf[1], raw[1]);
        let back = gguf::permute_qk_rows(&weights[hf_name], heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), raw);
    }
    // The quantised copy (for a QMatMul path) is de-permuted the same way, losslessly.
    let q = g
        .load_quantized(&cfg, &Device::Cpu)
        .expect("quantised weights");
    assert_eq!(q.len(), weights.len());
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.7.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ] {
        let deq = q[name].dequantize(&Device::Cpu).unwrap();
        let diff = (deq - &weights[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
    // V and every other tensor keep GGUF row order.
    let raw = g.dequantize_raw("blk.0.attn_v.weight").unwrap();
    let hf = &weights["model.layers.0.self_attn.v_proj.weight"];
    let diff = (raw - hf).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

/// Last-position logits of `ids` (no prefix), as a host vector.
fn last_logits(net: &Transformer, ids: &[u32]) -> Vec<f32> {
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    net.forward(None, None, &t, Logits::Last, Path::Infer)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn top20_logprobs_match_reference() {
    let Some(m) = loaded() else { return };
    let mut worst = 0f64;
    for p in fixture()["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let lp = log_softmax(&last_logits(&m.net, &ids_of(&p["ids"])));
        let want = pairs(&p["top20_last"]);
        for (rank, &(id, ref_lp)) in want.iter().enumerate() {
            let diff = (lp[id as usize] - ref_lp).abs();
            worst = worst.max(diff);
            assert!(
                diff < LOGPROB_TOL,
                "{name}: rank {rank} id {id}: {} vs reference {ref_lp}",
                lp[id as usize]
            );
        }
        // Our top-1 is the reference top-1 (the gap is far above the tolerance for these prompts).
        assert_eq!(argmax_f64(&lp), want[0].0, "{name}: top-1");
    }
    eprintln!("top-20 log-probs: max |ours - reference| = {worst:.3e}");
}

fn argmax_f64(v: &[f64]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn greedy_continuations_match_reference_up_to_near_ties() {
    let Some(m) = loaded() else { return };
    let prompts = fixture()["prompts"].as_array().unwrap();
    // All six prompts decode as one left-padded batch: one pass over the weights per step, and the
    // padded batch path is what self-study and the server run.
    let mut requests = Vec::new();
    let mut wanted = Vec::new();
    for p in prompts {
        let want = ids_of(&p["greedy_ids"]);
        let margins = f64s(&p["greedy_top1_top2_logit_margin"]);
        let checked = margins
            .iter()
            .position(|&mg| mg < NEAR_TIE)
            .unwrap_or(want.len());
        wanted.push(want[..checked].to_vec());
        requests.push(GenerateRequest {
            prompt: ids_of(&p["ids"]),
            sampling: SamplingParams::greedy(),
            max_tokens: checked,
            stop_tokens: Vec::new(),
            top_logprobs: 0,
        });
    }
    let out = generate_batch(&m.net, None, &requests, &BatchOptions::default(), |_, _| {
        Control::Continue
    })
    .expect("generation runs");
    for ((p, want), got) in prompts.iter().zip(&wanted).zip(&out) {
        let name = p["name"].as_str().unwrap();
        assert_eq!(
            &got.tokens,
            want,
            "{name}: greedy ids (first {} steps)",
            want.len()
        );
        if let Some(text) = p["greedy_text"].as_str() {
            if want.len() == 24 {
                let decoded = m.model.tokenizer.decode(&got.tokens, false).unwrap();
                assert_eq!(decoded, text, "{name}: greedy text");
            }
        }
    }
}

/// Sum and sum of squares of a tensor, in f64.
fn sums(t: &Tensor) -> (f64, f64) {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    (
        v.iter().map(|&x| f64::from(x)).sum(),
        v.iter().map(|&x| f64::from(x) * f64::from(x)).sum(),
    )
}

#[test]
fn cartridge_forward_matches_reference() {
    let Some(m) = loaded() else { return };
    let c = &fixture()["cartridge_check"];
    let prefix_ids = ids_of(&c["prefix_ids"]);
    let cont = ids_of(&c["continuation_ids"]);
    assert_eq!(prefix_ids.len() as u64, c["p"].as_u64().unwrap());
    let kv = m.net.prefix_kv(None, &prefix_ids).unwrap();
    assert_eq!(kv.len(), prefix_ids.len());

    // Stored keys are in the rotate-half (Hugging Face) layout.
    for f in c["kv_fingerprints"].as_array().unwrap() {
        let layer = f["layer"].as_u64().unwrap() as usize;
        let (k, v) = kv.layer(layer).unwrap();
        assert_eq!(k.dims(), &[3, 64, 64]);
        let (ks, kss) = sums(k);
        let (vs, vss) = sums(v);
        assert!(
            close(ks, f["k_sum"].as_f64().unwrap(), 1e-3),
            "layer {layer} k_sum {ks}"
        );
        assert!(
            close(kss, f["k_sum_sq"].as_f64().unwrap(), 1e-4),
            "layer {layer} k_sum_sq {kss}"
        );
        assert!(
            close(vs, f["v_sum"].as_f64().unwrap(), 1e-3),
            "layer {layer} v_sum {vs}"
        );
        assert!(
            close(vss, f["v_sum_sq"].as_f64().unwrap(), 1e-4),
            "layer {layer} v_sum_sq {vss}"
        );
        let k8: Vec<f32> = k
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .narrow(0, 0, 8)
            .unwrap()
            .to_vec1()
            .unwrap();
        let v8: Vec<f32> = v
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .narrow(0, 0, 8)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, (&a, b)) in k8
            .iter()
            .zip(f64s(&f["k_head0_pos1_first8_hf_layout"]))
            .enumerate()
        {
            assert!(
                (f64::from(a) - b).abs() < 1e-3,
                "layer {layer} k[0,1,{i}] {a} vs {b}"
            );
        }
        for (i, (&a, b)) in v8.iter().zip(f64s(&f["v_head0_pos1_first8"])).enumerate() {
            assert!(
                (f64::from(a) - b).abs() < 1e-3,
                "layer {layer} v[0,1,{i}] {a} vs {b}"
            );
        }
    }

    let t = Tensor::from_vec(cont.clone(), (1, cont.len()), &Device::Cpu).unwrap();
    let logits: Vec<Vec<f32>> = m
        .net
        .forward(Some(&kv), None, &t, Logits::All, Path::Infer)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut worst = 0f64;
    for (pos, want) in c["top5_per_position"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let lp = log_softmax(&logits[pos]);
        for (id, ref_lp) in pairs(want) {
            let diff = (lp[id as usize] - ref_lp).abs();
            worst = worst.max(diff);
            assert!(
                diff < LOGPROB_TOL,
                "position {pos} id {id}: {} vs {ref_lp}",
                lp[id as usize]
            );
        }
    }
    eprintln!("cartridge top-5 log-probs: max |ours - reference| = {worst:.3e}");
}

#[test]
fn cartridge_training_matches_reference() {
    let Some(m) = loaded() else { return };
    let c = &fixture()["train_check"];
    let doc = ids_of(&c["doc_ids"]);
    let query = ids_of(&c["query_ids"]);
    let p = c["p"].as_u64().unwrap() as usize;
    let net = &m.net;
    let dev = Device::Cpu;

    // Teacher top-20 targets (from the fixture) at each query position.
    let t_ids: Vec<Vec<u32>> = c["teacher_top20_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids_of)
        .collect();
    let t_lp: Vec<Vec<f64>> = c["teacher_top20_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(f64s)
        .collect();
    let n = query.len();
    let idx: Vec<u32> = t_ids.iter().flatten().copied().collect();
    let idx = Tensor::from_vec(idx, (n, 20), &dev).unwrap();
    let w: Vec<f32> = t_lp.iter().flatten().map(|&x| x.exp() as f32).collect();
    let w = Tensor::from_vec(w, (n, 20), &dev).unwrap();

    // Cartridge: KV of the first p document tokens; slot 0 frozen, slots 1.. trainable.
    let init = net.prefix_kv(None, &doc[..p]).unwrap();
    let mut frozen = Vec::new();
    let mut vars = Vec::new();
    for (k, v) in init.layers() {
        frozen.push((k.narrow(1, 0, 1).unwrap(), v.narrow(1, 0, 1).unwrap()));
        vars.push((
            Var::from_tensor(&k.narrow(1, 1, p - 1).unwrap()).unwrap(),
            Var::from_tensor(&v.narrow(1, 1, p - 1).unwrap()).unwrap(),
        ));
    }
    let all_vars: Vec<Var> = vars
        .iter()
        .flat_map(|(k, v)| [k.clone(), v.clone()])
        .collect();
    let mut opt = AdamW::new(
        all_vars,
        ParamsAdamW {
            lr: 2e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )
    .unwrap();
    let q = Tensor::from_vec(query.clone(), (1, n), &dev).unwrap();
    let want_losses = f64s(&c["losses_before_each_step"]);
    let mut losses = Vec::new();
    for step in 0..want_losses.len() {
        let layers = frozen
            .iter()
            .zip(&vars)
            .map(|((fk, fv), (k, v))| {
                (
                    Tensor::cat(&[fk, k.as_tensor()], 1).unwrap(),
                    Tensor::cat(&[fv, v.as_tensor()], 1).unwrap(),
                )
            })
            .collect();
        let cart = PrefixKv::new(layers).unwrap();
        let logits = net
            .forward(Some(&cart), None, &q, Logits::All, Path::Train)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let lsm = ops::log_softmax_last_dim(&logits).unwrap();
        let picked = lsm.gather(&idx, 1).unwrap();
        let loss = (picked * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap()
            .affine(1.0 / n as f64, 0.0)
            .unwrap();
        losses.push(f64::from(loss.to_scalar::<f32>().unwrap()));
        let grads = loss.backward().unwrap();
        if step == 0 {
            let g = c["step0_grads"].clone();
            let norm = |var: &Var| -> f64 {
                let gr = grads
                    .get(var.as_tensor())
                    .expect("a gradient reaches the cartridge");
                sums(gr).1
            };
            let (mut k_tot, mut v_tot) = (0f64, 0f64);
            let mut per_layer = BTreeMap::new();
            for (l, (k, v)) in vars.iter().enumerate() {
                let (kn, vn) = (norm(k), norm(v));
                k_tot += kn;
                v_tot += vn;
                per_layer.insert(l.to_string(), (kn.sqrt(), vn.sqrt()));
            }
            let (k_tot, v_tot) = (k_tot.sqrt(), v_tot.sqrt());
            // A few raw gradient values, in the rotate-half layout.
            let g29: Vec<f32> = grads
                .get(vars[29].0.as_tensor())
                .expect("layer 29 k gradient")
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .narrow(0, 0, 4)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (i, (&a, b)) in g29
                .iter()
                .zip(f64s(&g["k_layer29_head0_pos1_first4_hf_layout"]))
                .enumerate()
            {
                assert!(
                    (f64::from(a) - b).abs() <= 2e-2 * b.abs() + 1e-9,
                    "layer 29 k grad [0, 1, {i}]: {a} vs {b}"
                );
            }
            eprintln!("step-0 grad norms: k {k_tot:.6e} v {v_tot:.6e}");
            assert!(
                close(k_tot, g["k_total_l2"].as_f64().unwrap(), GRAD_TOL),
                "k_total_l2 {k_tot}"
            );
            assert!(
                close(v_tot, g["v_total_l2"].as_f64().unwrap(), GRAD_TOL),
                "v_total_l2 {v_tot}"
            );
            for (l, want) in g["per_layer_l2"].as_object().unwrap() {
                let (kn, vn) = per_layer[l];
                let (wk, wv) = (want["k"].as_f64().unwrap(), want["v"].as_f64().unwrap());
                assert!(
                    (kn - wk).abs() <= GRAD_TOL * wk,
                    "layer {l} k grad norm {kn} vs {wk}"
                );
                assert!(
                    (vn - wv).abs() <= GRAD_TOL * wv,
                    "layer {l} v grad norm {vn} vs {wv}"
                );
            }
        }
        opt.step(&grads).unwrap();
    }
    eprintln!("losses: {losses:?} (reference {want_losses:?})");
    for (step, (a, b)) in losses.iter().zip(&want_losses).enumerate() {
        assert!(
            (a - b).abs() < LOSS_TOL,
            "step {step}: loss {a} vs reference {b}"
        );
    }
}

#[test]
fn missing_model_error_says_how_to_fetch() {
    let err = loader::resolve_model_path(Some(std::path::Path::new("/nonexistent/model.gguf")))
        .expect_err("a missing explicit model is an error");
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
}
