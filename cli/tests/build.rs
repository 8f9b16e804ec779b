//! `cartridge build` end to end on the real default model (tiny settings): corpus -> dataset ->
//! trained .cart that verifies, loads and generates; `train` refuses corpus initialisation without
//! the corpus, continues the built cartridge with `--init-from`, and trains on several datasets
//! of one corpus.
//!
//! Needs the default model (`scripts/fetch-model.sh`); without it the test prints a note and
//! passes, except under CI (`CI` set), where a missing model is a failure.

mod common;

use common::{cartridge, ok_json};

#[test]
fn build_writes_a_cartridge_that_serves() {
    if common::model_path().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("harbor");
    std::fs::create_dir(&corpus).unwrap();
    std::fs::write(
        corpus.join("harbor.md"),
        "The Harbor of Velmora was founded in 1612 by the cartographer Ilse Brandvik. Its \
         lighthouse, the Gray Needle, is 41 meters tall and was rebuilt in 1788 after a fire. \
         Velmora's chief export is smoked herring, sold under the mark of three silver fish.",
    )
    .unwrap();
    let out = dir.path().join("harbor.cart");
    let o = out.to_str().unwrap();
    let run = cartridge(&[
        "build",
        corpus.to_str().unwrap(),
        "--out",
        o,
        "--num",
        "4",
        "--batch",
        "4",
        "--chunk-min",
        "32",
        "--chunk-max",
        "48",
        "--max-answer-tokens",
        "12",
        "--max-user-tokens",
        "16",
        "--tokens",
        "16",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--micro-batch",
        "2",
        "--eval-conversations",
        "1",
        "--json",
    ]);
    let summary = ok_json(&run);
    assert_eq!(summary["training"]["steps"], 2);
    assert_eq!(summary["synthesis"]["written"], 4);
    let eval = &summary["training"]["final_eval"];
    assert!(eval["bare_loss"].as_f64().unwrap() > 0.0 && eval["loss"].as_f64().unwrap() > 0.0);
    assert!(dir.path().join("harbor.metrics.jsonl").is_file());
    // Progress on stderr: the start (selected keys, layer by layer) reports before training.
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&run.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let position = |f: &dyn Fn(&serde_json::Value) -> bool| events.iter().position(f);
    let selected = position(&|e| {
        e["event"] == "init" && e["part"] == "select-keys" && e["done"] == e["total"]
    })
    .expect("the start reports its progress");
    let started = position(&|e| e["event"] == "started" && e["stage"] == "train").unwrap();
    assert!(selected < started);

    let inspect = cartridge(&["inspect", "--verify", "--json", o]);
    assert_eq!(inspect.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v[0]["kind"], "kv");
    assert_eq!(v[0]["dims"]["tokens"], 16);
    assert_eq!(v[0]["dims"]["frozen_tokens"], 1);
    assert!(v[0]["provenance"]["corpus_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));

    let gen = cartridge(&[
        "generate",
        "--cartridge",
        o,
        "--prompt",
        "Who founded Velmora?",
        "--max-tokens",
        "4",
        "--json",
    ]);
    let g = ok_json(&gen);
    assert_eq!(g["prefix_tokens"], 16);

    // train needs the corpus for corpus initialisation, and says so.
    let t = cartridge(&[
        "train",
        "--data",
        dir.path().join("harbor.data").to_str().unwrap(),
        "--out",
        dir.path().join("t.cart").to_str().unwrap(),
    ]);
    assert_ne!(t.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&t.stderr).contains("--corpus"));

    // --init-from continues the built cartridge (no corpus needed; its size sets --tokens), and
    // refuses to read it as a soft prompt.
    let data = dir.path().join("harbor.data");
    let more = dir.path().join("more.cart");
    let continue_with = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            more.to_str().unwrap(),
            "--init-from",
            o,
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--micro-batch",
            "2",
            "--eval-conversations",
            "1",
            "--json",
        ];
        a.extend_from_slice(extra);
        cartridge(&a)
    };
    assert_eq!(ok_json(&continue_with(&[]))["steps"], 1);
    let v = ok_json(&cartridge(&["inspect", "--json", more.to_str().unwrap()]));
    assert_eq!(v[0]["dims"]["tokens"], 16);
    let t = continue_with(&["--soft-prompt", "4"]);
    assert_ne!(t.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&t.stderr).contains("is a KV cartridge"));

    // Several datasets train together (here the same one twice: 8 conversations, 1 held out),
    // if they share their teacher and corpus.
    let twice = continue_with(&["--data", data.to_str().unwrap()]);
    assert_eq!(ok_json(&twice)["train_examples"], 7);
    let other = dir.path().join("other.data");
    std::fs::create_dir(&other).unwrap();
    for f in std::fs::read_dir(&data).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), other.join(f.file_name())).unwrap();
    }
    let manifest = other.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["corpus_digest"] = format!("sha256:{}", "0".repeat(64)).into();
    std::fs::write(&manifest, m.to_string()).unwrap();
    let t = continue_with(&["--data", other.to_str().unwrap()]);
    assert_ne!(t.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&t.stderr).contains("another corpus"));

    // The selected keys are cut from the teacher's context, the system message the chat template
    // renders around the corpus: the frozen slot 0 is its first token, `<|im_start|>`, not the
    // corpus's first word.
    let device = candle_core::Device::Cpu;
    let loaded = cartridge_runtime::loader::load_default(&device).expect("model");
    let model = loaded.transformer().expect("transformer");
    let cart =
        cartridge_runtime::cartridge_file::load_cartridge(&out, &loaded.fingerprint, &device)
            .expect("cartridge");
    let slot0 = |kv: &cartridge_runtime::PrefixKv| -> Vec<f32> {
        let k = kv.layers()[0].0.narrow(1, 0, 1).unwrap();
        k.flatten_all().unwrap().to_vec1().unwrap()
    };
    let first_key_of = |text: &str| {
        let id = loaded.tokenizer.encode(text, false).unwrap()[0];
        slot0(&model.prefix_kv(None, &[id]).unwrap())
    };
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let stored = slot0(&cart);
    assert!(max_diff(&stored, &first_key_of("<|im_start|>")) < 1e-4);
    assert!(max_diff(&stored, &first_key_of("The")) > 1e-2);
}
