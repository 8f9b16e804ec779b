//! Loading without the real model: a tiny Llama written by the test as a GGUF (Q/K rows permuted the
//! llama.cpp way, tokenizer and chat template in metadata) and as a Hugging Face folder with the same
//! weights. Both must load to the same config, weights, tokenizer ids and fingerprint; corrupt files
//! must give errors, not panics.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use cartridge_runtime::chat_template::ChatMessage;
use cartridge_runtime::gguf::{self, GgufFile};
use cartridge_runtime::loader;
use cartridge_runtime::tokenizer::Tokenizer;
use cartridge_runtime::Error;

const LAYERS: usize = 2;
const HIDDEN: usize = 16;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 8;
const INTER: usize = 32;
const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// GPT-2's byte-to-character map: printable bytes map to themselves, the rest to U+0100 onwards.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut out = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out[b as usize] = char::from_u32(c).expect("valid char");
    }
    out
}

/// Vocabulary: three control tokens, the 256 byte characters, then the merge results.
fn vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![3, 3, 3];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = vec!["Ġ t".to_string(), "h e".to_string(), "Ġt he".to_string()];
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (tokens, types, merges)
}

/// Random weights in the Hugging Face layout.
fn hf_weights(vocab: usize) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut w = HashMap::new();
    let mut put = |name: String, shape: &[usize]| {
        let t = Tensor::randn(0f32, 0.2, shape, &dev).expect("randn");
        w.insert(name, t);
    };
    put("model.embed_tokens.weight".into(), &[vocab, HIDDEN]);
    put("model.norm.weight".into(), &[HIDDEN]);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[HEADS * HEAD_DIM, HIDDEN],
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[KV_HEADS * HEAD_DIM, HIDDEN],
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[KV_HEADS * HEAD_DIM, HIDDEN],
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[HIDDEN, HEADS * HEAD_DIM],
        );
        put(format!("{p}.mlp.gate_proj.weight"), &[INTER, HIDDEN]);
        put(format!("{p}.mlp.up_proj.weight"), &[INTER, HIDDEN]);
        put(format!("{p}.mlp.down_proj.weight"), &[HIDDEN, INTER]);
        put(format!("{p}.input_layernorm.weight"), &[HIDDEN]);
        put(format!("{p}.post_attention_layernorm.weight"), &[HIDDEN]);
    }
    w
}

fn gguf_name(hf: &str) -> String {
    if hf == "model.embed_tokens.weight" {
        return "token_embd.weight".into();
    }
    if hf == "model.norm.weight" {
        return "output_norm.weight".into();
    }
    let rest = hf.strip_prefix("model.layers.").expect("a layer tensor");
    let (i, rest) = rest.split_once('.').expect("layer index");
    let part = match rest {
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        other => panic!("unexpected {other}"),
    };
    format!("blk.{i}.{part}.weight")
}

fn write_gguf(path: &Path, weights: &HashMap<String, Tensor>, pre: &str) {
    let (tokens, types, merges) = vocab();
    let s = |x: &str| Value::String(x.to_string());
    let tok_md = vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s(pre)),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
    ];
    write_gguf_md(path, weights, tokens.len(), tok_md);
}

fn write_gguf_md(
    path: &Path,
    weights: &HashMap<String, Tensor>,
    vocab_size: usize,
    tok_md: Vec<(&str, Value)>,
) {
    let s = |x: &str| Value::String(x.to_string());
    let mut md: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(INTER as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", Value::U32(vocab_size as u32)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.chat_template", s(TEMPLATE)),
    ];
    md.extend(tok_md);
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let q: Vec<(String, QTensor)> = names
        .iter()
        .map(|hf| {
            let mut t = weights[*hf].clone();
            // llama.cpp's converter permutes Q/K rows for adjacent-pair RoPE.
            if hf.ends_with("q_proj.weight") {
                t = gguf::permute_qk_rows(&t, HEADS).unwrap();
            } else if hf.ends_with("k_proj.weight") {
                t = gguf::permute_qk_rows(&t, KV_HEADS).unwrap();
            }
            (
                gguf_name(hf),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn write_hf_dir(dir: &Path, weights: &HashMap<String, Tensor>, tokenizer: &Tokenizer) {
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
    tokenizer
        .inner()
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab().0.len(), "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tok_cfg = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
        "chat_template": TEMPLATE,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tok_cfg.to_string()).unwrap();
    let gen_cfg = serde_json::json!({"eos_token_id": [2, 0]});
    std::fs::write(dir.join("generation_config.json"), gen_cfg.to_string()).unwrap();
}

#[test]
fn tiny_gguf_and_hf_folder_load_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = hf_weights(vocab().0.len());
    let gguf_path = tmp.path().join("tiny.gguf");
    write_gguf(&gguf_path, &weights, "smollm");

    let g = loader::load(&gguf_path, &Device::Cpu).expect("tiny GGUF loads");
    assert_eq!(g.config.num_layers, LAYERS);
    assert_eq!(g.config.head_dim, HEAD_DIM);
    assert_eq!(g.config.num_kv_heads, KV_HEADS);
    assert!(g.config.tie_word_embeddings);
    assert_eq!(g.config.eos_token_ids, vec![2]);
    // Weights come back under HF names and in the HF layout: Q/K de-permuted exactly.
    assert_eq!(g.weights.len(), weights.len());
    for (name, want) in &weights {
        let got = &g.weights[name];
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }

    // Tokenizer: merges, digit splitting, special tokens never split, round trip.
    let tok = &g.tokenizer;
    let id = |t: &str| tok.token_to_id(t).unwrap();
    let text = "<|im_start|>the the 12<|im_end|>";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(
        ids,
        vec![
            1,
            id("t"),
            id("he"),
            id("Ġthe"),
            id("Ġ"),
            id("1"),
            id("2"),
            2
        ]
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(tok.decode(&ids, true).unwrap(), "the the 12");
    // Byte-level models add nothing unless the file sets add_bos_token.
    assert_eq!(
        tok.encode("the", true).unwrap(),
        tok.encode("the", false).unwrap()
    );

    let template = g.chat_template.as_ref().expect("template from metadata");
    assert_eq!(
        template
            .render(&[ChatMessage::new("user", "hi")], true)
            .unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );

    // The same model as a Hugging Face folder.
    let dir = tmp.path().join("hf");
    write_hf_dir(&dir, &weights, tok);
    let h = loader::load(&dir, &Device::Cpu).expect("HF folder loads");
    // GGUF stores epsilon as f32; everything else must be identical.
    assert!((h.config.rms_norm_eps - g.config.rms_norm_eps).abs() < 1e-12);
    let mut hc = h.config.clone();
    hc.rms_norm_eps = g.config.rms_norm_eps;
    // generation_config.json adds a stop token to config.json's EOS.
    assert_eq!(hc.eos_token_ids, vec![2, 0]);
    hc.eos_token_ids = g.config.eos_token_ids.clone();
    assert_eq!(hc, g.config);
    assert_eq!(h.tokenizer.encode(text, false).unwrap(), ids);
    assert_eq!(h.tokenizer.bos_token_id(), Some(1));
    assert_eq!(h.tokenizer.eos_token_ids(), &[2, 0]);
    assert_eq!(
        h.chat_template
            .as_ref()
            .unwrap()
            .render(&[ChatMessage::new("user", "hi")], true)
            .unwrap(),
        template
            .render(&[ChatMessage::new("user", "hi")], true)
            .unwrap()
    );
    assert_eq!(h.fingerprint, g.fingerprint, "same model, same fingerprint");

    // bf16 storage rounds to the precision the weight sampler hashes at: same fingerprint.
    let bf: HashMap<String, Tensor> = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap()))
        .collect();
    let dir16 = tmp.path().join("hf16");
    write_hf_dir(&dir16, &bf, tok);
    let h16 = loader::load(&dir16, &Device::Cpu).expect("bf16 HF folder loads");
    assert_eq!(h16.fingerprint.weights_hash, g.fingerprint.weights_hash);

    // Different weights, different fingerprint.
    let mut other = weights.clone();
    let n = other["model.norm.weight"].clone();
    other.insert("model.norm.weight".into(), (n + 1.0).unwrap());
    let dir2 = tmp.path().join("hf2");
    write_hf_dir(&dir2, &other, tok);
    let h2 = loader::load(&dir2, &Device::Cpu).unwrap();
    assert_ne!(h2.fingerprint.weights_hash, g.fingerprint.weights_hash);
    assert_eq!(h2.fingerprint.tokenizer_hash, g.fingerprint.tokenizer_hash);
}

#[test]
fn corrupt_gguf_files_give_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    let err = loader::load(&garbage, &Device::Cpu).expect_err("garbage is refused");
    assert!(err.to_string().contains("garbage.gguf"), "{err}");

    // A real header with its tensor data cut off.
    let weights = hf_weights(vocab().0.len());
    let full = tmp.path().join("full.gguf");
    write_gguf(&full, &weights, "smollm");
    let bytes = std::fs::read(&full).unwrap();
    for cut in [8, 100, bytes.len() / 2, bytes.len() - 64] {
        let p = tmp.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let err = loader::load(&p, &Device::Cpu).expect_err("truncated file is refused");
        assert!(
            err.to_string().contains(&format!("cut{cut}.gguf")),
            "error names the file: {err}"
        );
    }

    // An empty file.
    let empty = tmp.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(GgufFile::open(&empty).is_err());
}

#[test]
fn unknown_pre_tokenizer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = hf_weights(vocab().0.len());
    let p = tmp.path().join("odd.gguf");
    write_gguf(&p, &weights, "some-future-pre");
    let g = GgufFile::open(&p).unwrap();
    match Tokenizer::from_gguf(&g) {
        Err(Error::Tokenizer(msg)) => assert!(msg.contains("some-future-pre"), "{msg}"),
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
}

#[test]
fn default_model_path_follows_the_environment() {
    // The only test in this binary that touches these variables.
    std::env::set_var("CARTRIDGE_MODEL", "/somewhere/m.gguf");
    assert_eq!(
        loader::default_model_path().unwrap(),
        Path::new("/somewhere/m.gguf")
    );
    std::env::remove_var("CARTRIDGE_MODEL");
    std::env::set_var("CARTRIDGE_HOME", "/cart-home");
    assert_eq!(
        loader::default_model_path().unwrap(),
        Path::new("/cart-home/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    std::env::set_var("CARTRIDGE_HOME", "/nonexistent-cartridge-home");
    let err = loader::resolve_model_path(None).expect_err("no default model there");
    assert!(err.to_string().contains("scripts/fetch-model.sh"), "{err}");
    std::env::remove_var("CARTRIDGE_HOME");
}

#[test]
fn sentencepiece_gguf_tokenizer_merges_by_score_with_byte_fallback() {
    // A Llama-2 style vocabulary: <unk>, <s>, </s>, 256 byte tokens, then pieces whose scores
    // (descending) give the merge order.
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = [
        "\u{2581}",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "he",
        "ll",
        "llo",
        "hello",
        "\u{2581}hello",
        "\u{2581}w",
        "or",
        "\u{2581}wor",
        "ld",
        "\u{2581}world",
    ];
    for p in pieces {
        tokens.push(p.to_string());
        types.push(1);
    }
    let scores: Vec<Value> = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
    let s = |x: &str| Value::String(x.to_string());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sp.gguf");
    let tok_md = vec![
        ("tokenizer.ggml.model", s("llama")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.scores", Value::Array(scores)),
    ];
    write_gguf_md(&path, &hf_weights(tokens.len()), tokens.len(), tok_md);
    let g = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&g).expect("SentencePiece tokenizer builds");
    let id = |t: &str| tok.token_to_id(t).unwrap();
    let ids = tok.encode("hello world!\n", false).unwrap();
    assert_eq!(
        ids,
        vec![
            id("\u{2581}hello"),
            id("\u{2581}world"),
            id("<0x21>"),
            id("<0x0A>")
        ]
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), "hello world!\n");
    // SentencePiece Llama models add BOS on request (add_bos_token defaults to true).
    assert_eq!(
        tok.encode("hello", true).unwrap(),
        vec![1, id("\u{2581}hello")]
    );
    // Control tokens are never split.
    let ids = tok.encode("<s>hello", false).unwrap();
    assert_eq!(ids, vec![1, id("\u{2581}hello")]);
}

#[test]
fn gguf_rope_scaling_is_refused_not_ignored() {
    let (tokens, types, merges) = vocab();
    let s = |x: &str| Value::String(x.to_string());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("yarn.gguf");
    let tok_md = vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("llama.rope.scaling.type", s("yarn")),
        ("llama.rope.scaling.factor", Value::F32(4.0)),
    ];
    write_gguf_md(&path, &hf_weights(tokens.len()), tokens.len(), tok_md);
    let err = loader::load(&path, &Device::Cpu).expect_err("scaled RoPE is refused");
    assert!(err.to_string().contains("yarn"), "{err}");
}
