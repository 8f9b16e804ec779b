//! `cartridge serve` as a self-study teacher: `cartridge synthesize --backend http://.../v1`
//! against a server on loopback writes the same conversations (token ids, targets, top-k ids;
//! log-probs to float precision) as the in-process teacher, and a server running another model
//! is refused at start-up (tiny random model: no download needed). On the real model (when it is
//! there), a chat completion with two composed cartridges equals `cartridge generate` with the
//! same two `--cartridge` flags.

mod common;
mod tiny_chat;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use candle_core::Device;
use cartridge_formats::cart::{Compression, Provenance};
use cartridge_formats::dataset::{Dataset, ReadOptions, Record};
use cartridge_runtime::cartridge_file::save_cartridge;
use cartridge_runtime::loader;
use common::cartridge;
use serde_json::{json, Value};

/// A `cartridge serve` child process, killed when dropped.
struct Served {
    child: Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(model: &Path, carts: &Path) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cartridge"))
        .args(["serve", "--addr", "127.0.0.1:0", "--max-batch", "8"])
        .arg("--model")
        .arg(model)
        .arg("--cartridges")
        .arg(carts)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Served { child, url }
}

const SYNTH: &[&str] = &[
    "--num",
    "6",
    "--batch",
    "3",
    "--chunk-min",
    "40",
    "--chunk-max",
    "60",
    "--max-user-tokens",
    "10",
    "--max-answer-tokens",
    "12",
    "--top-k",
    "5",
    "--seed",
    "4",
    "--json",
];

fn synthesize(
    corpus: &Path,
    out: &Path,
    model: &Path,
    backend: Option<&str>,
) -> std::process::Output {
    let mut args: Vec<String> = vec![
        "synthesize".into(),
        corpus.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--model".into(),
        model.display().to_string(),
    ];
    args.extend(SYNTH.iter().map(|s| s.to_string()));
    if let Some(url) = backend {
        args.push("--backend".into());
        args.push(format!("{url}/v1"));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    cartridge(&refs)
}

fn records(dir: &Path) -> Vec<Record> {
    let mut r = Dataset::open(dir, ReadOptions::default())
        .expect("open dataset")
        .records()
        .expect("records");
    r.sort_by_key(|r| r.id);
    r
}

#[test]
fn remote_self_study_against_cartridge_serve_equals_local() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).expect("mkdir");
    tiny_chat::write_tiny_chat_model(&model, 21);
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir(&corpus).expect("mkdir");
    let text = "The lighthouse keeper of Velmora logs every ship that passes the northern cape. \
                Tides there run twice a day and the harbour closes when the bell rings three times. ";
    std::fs::write(corpus.join("notes.txt"), text.repeat(4)).expect("write");
    let carts = tmp.path().join("carts");
    std::fs::create_dir(&carts).expect("mkdir");

    let local = synthesize(&corpus, &tmp.path().join("local"), &model, None);
    assert_eq!(
        local.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    let server = serve(&model, &carts);
    let remote = synthesize(
        &corpus,
        &tmp.path().join("remote"),
        &model,
        Some(&server.url),
    );
    assert_eq!(
        remote.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&remote.stderr)
    );

    let a = records(&tmp.path().join("local"));
    let b = records(&tmp.path().join("remote"));
    assert_eq!(a.len(), 6);
    assert_eq!(a.len(), b.len());
    let mut targets = 0;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.id, y.id);
        assert_eq!(
            x.tokens, y.tokens,
            "conversation {}: token ids differ",
            x.id
        );
        assert_eq!(x.targets, y.targets);
        assert_eq!(x.messages, y.messages);
        assert_eq!(x.top_k, y.top_k);
        assert_eq!(
            x.topk_ids, y.topk_ids,
            "conversation {}: top-k ids differ",
            x.id
        );
        for (p, q) in x.topk_logprobs.iter().zip(&y.topk_logprobs) {
            assert!((p - q).abs() < 1e-3, "log-probs {p} vs {q}");
        }
        targets += x.targets.iter().map(|t| t.1).sum::<u32>();
    }
    assert!(targets > 0, "no answer tokens were recorded");
    let ma = Dataset::open(&tmp.path().join("local"), ReadOptions::default()).expect("a");
    let mb = Dataset::open(&tmp.path().join("remote"), ReadOptions::default()).expect("b");
    assert_eq!(
        serde_json::to_value(&ma.manifest().teacher).expect("json"),
        serde_json::to_value(&mb.manifest().teacher).expect("json")
    );
    drop(server);

    // A server running another model is refused before anything is written.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    tiny_chat::write_tiny_chat_model(&other, 22);
    let server = serve(&other, &carts);
    let refused = synthesize(
        &corpus,
        &tmp.path().join("refused"),
        &model,
        Some(&server.url),
    );
    assert_ne!(refused.status.code(), Some(0));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("fingerprint"), "{err}");
    assert!(!tmp.path().join("refused").join("manifest.json").exists());
}

#[test]
fn real_model_chat_with_two_cartridges_equals_cartridge_generate() {
    let Some(model) = common::model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let loaded = loader::load(&model, &Device::Cpu).expect("load");
    let transformer = loaded.transformer().expect("model");
    for (name, text) in [
        (
            "town",
            "Velmora is a fishing town. Its lighthouse, the Gray Needle, is 41 meters tall.",
        ),
        (
            "ferry",
            "The ferry to Velmora leaves at 7:15 every morning from pier 3.",
        ),
    ] {
        let ids = loaded.tokenizer.encode(text, false).expect("encode");
        let kv = transformer.prefix_kv(None, &ids).expect("kv");
        let path = tmp.path().join(format!("{name}.cart"));
        let fp = &loaded.fingerprint;
        save_cartridge(&path, &kv, 1, fp, Provenance::default(), Compression::None).expect("save");
    }
    let question = "How tall is the lighthouse, and when does the ferry leave?";
    let out = cartridge(&[
        "generate",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--cartridge",
        tmp.path().join("town.cart").to_str().expect("path"),
        "--cartridge",
        tmp.path().join("ferry.cart").to_str().expect("path"),
        "--prompt",
        question,
        "--max-tokens",
        "16",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Value = serde_json::from_slice(&out.stdout).expect("json");
    let server = serve(&model, tmp.path());
    let body = json!({"messages": [{"role": "user", "content": question}], "max_tokens": 16,
                      "temperature": 0, "cartridges": [{"id": "town"}, {"id": "ferry"}]});
    let got: Value = ureq::post(&format!("{}/v1/chat/completions", server.url))
        .send_json(body)
        .expect("request")
        .into_json()
        .expect("json");
    assert_eq!(got["choices"][0]["token_ids"], want["ids"]);
    assert_eq!(got["choices"][0]["message"]["content"], want["text"]);
}
