//! Test helpers: a tiny random chat model (`cartridge_runtime::testing`: config.json,
//! model.safetensors, a byte-level tokenizer.json with ChatML special tokens, and a ChatML
//! template) written to a temp dir; cartridges for it; a server on loopback; and a blocking HTTP
//! client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path as FsPath;

use candle_core::Device;
use cartridge_formats::cart::{Compression, Provenance};
use cartridge_runtime::cartridge_file::{load_cartridge, save_cartridge};
use cartridge_runtime::chat_template::ChatMessage;
use cartridge_runtime::generate::{generate, Control, GenerateRequest, SamplingParams};
use cartridge_runtime::loader::{self, LoadedModel};
use cartridge_runtime::testing::{self, TinySpec};
use cartridge_runtime::{Path, PrefixStack, Transformer};
use cartridge_server::{ServerConfig, ServerHandle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// Vocabulary: 3 special tokens then the 256 byte-level symbols.
pub const VOCAB: usize = testing::CHAT_VOCAB;
/// `<|im_end|>`, the chat model's EOS token.
pub const IM_END: u32 = testing::IM_END;

/// Write a tiny random Llama chat model into `dir` (embeddings in [-0.3, 0.3]).
pub fn write_tiny_chat_model(dir: &FsPath, seed: u64) {
    TinySpec::llama_chat()
        .with_embed_scale(0.3)
        .write(dir, seed)
        .expect("write tiny chat model");
}

/// A tiny model folder, loaded, with two cartridges (`a.cart`: 5 slots, `b.cart`: 3 slots) in a
/// cartridge folder, and a server on a free loopback port.
pub struct Fixture {
    pub _model_dir: tempfile::TempDir,
    pub carts: tempfile::TempDir,
    pub loaded: LoadedModel,
    pub model: Transformer,
    pub server: Option<ServerHandle>,
    pub base: String,
}

pub fn fixture(configure: impl FnOnce(&mut ServerConfig)) -> Fixture {
    let model_dir = tempfile::tempdir().expect("tempdir");
    write_tiny_chat_model(model_dir.path(), 11);
    let loaded = loader::load(model_dir.path(), &Device::Cpu).expect("load");
    let model = loaded.transformer().expect("model");
    let carts = tempfile::tempdir().expect("tempdir");
    for (name, seed, n) in [("a", 5u64, 5usize), ("b", 6, 3)] {
        let mut rng = StdRng::seed_from_u64(seed);
        let toks: Vec<u32> = (0..n).map(|_| rng.random_range(3..VOCAB as u32)).collect();
        let kv = model.prefix_kv(None, &toks).expect("kv");
        save_cartridge(
            &carts.path().join(format!("{name}.cart")),
            &kv,
            1,
            &loaded.fingerprint,
            Provenance::default(),
            Compression::None,
        )
        .expect("save");
    }
    let mut config = ServerConfig::new(carts.path().to_path_buf());
    config.addr = "127.0.0.1:0".parse().expect("addr");
    configure(&mut config);
    let server = cartridge_server::spawn(config, &loaded, loaded.transformer().expect("model"))
        .expect("spawn");
    let base = format!("http://{}", server.addr());
    Fixture {
        _model_dir: model_dir,
        carts,
        loaded,
        model,
        server: Some(server),
        base,
    }
}

/// POST `body` (raw text) to `base + path`: status, headers we care about, JSON body.
pub fn post_raw(base: &str, path: &str, body: &str) -> (u16, Option<String>, Value) {
    let resp = ureq::post(&format!("{base}{path}"))
        .set("content-type", "application/json")
        .send_string(body);
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let retry = resp.header("retry-after").map(str::to_string);
    let text = resp.into_string().expect("body");
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, retry, json)
}

pub fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let (s, _, v) = post_raw(base, path, &body.to_string());
    (s, v)
}

pub fn get(base: &str, path: &str) -> (u16, String) {
    match ureq::get(&format!("{base}{path}")).call() {
        Ok(r) => (r.status(), r.into_string().expect("body")),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
        Err(e) => panic!("transport error: {e}"),
    }
}

/// POST with `stream: true`: the JSON of every `data:` event before `[DONE]`, and whether
/// `[DONE]` came.
pub fn post_stream(base: &str, path: &str, body: &Value) -> (Vec<Value>, bool) {
    let resp = ureq::post(&format!("{base}{path}"))
        .send_json(body.clone())
        .expect("stream request");
    assert_eq!(resp.status(), 200);
    assert!(resp
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let reader = BufReader::new(resp.into_reader());
    let mut events = Vec::new();
    for line in reader.lines() {
        let line = line.expect("line");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return (events, true);
        }
        events.push(serde_json::from_str(data).expect("event JSON"));
    }
    (events, false)
}

/// The runtime's own answer for a chat `user` message after `carts` (ids in the fixture's
/// folder), rendered as the server renders it: generated ids (stop token included).
pub fn runtime_answer(
    f: &Fixture,
    carts: &[&str],
    user: &str,
    max_tokens: usize,
    sampling: SamplingParams,
) -> Vec<u32> {
    let mut stack = PrefixStack::new();
    for c in carts {
        let kv = load_cartridge(
            &f.carts.path().join(format!("{c}.cart")),
            &f.loaded.fingerprint,
            &Device::Cpu,
        )
        .expect("load cart");
        stack = stack.with_cartridge(kv);
    }
    let prefix = stack.resolve(&f.model, Path::Infer).expect("resolve");
    let template = f.loaded.chat_template.as_ref().expect("template");
    let msgs = [ChatMessage::new("user", user)];
    let text = if prefix.is_some() {
        template.render_after_system("system", &msgs, true)
    } else {
        template.render(&msgs, true)
    }
    .expect("render");
    let prompt = f.loaded.tokenizer.encode(&text, false).expect("encode");
    let req = GenerateRequest {
        prompt,
        sampling,
        max_tokens,
        stop_tokens: cartridge_server::chat_stop_tokens(&f.loaded.tokenizer),
        top_logprobs: 0,
    };
    generate(&f.model, prefix.as_ref(), &req, |_| Control::Continue)
        .expect("generate")
        .tokens
}
