//! `--device cpu|cuda[:N]` on every command that computes: a CUDA device this binary or machine
//! cannot provide is refused with exit 2 and one line (never a panic), a misspelt device is a usage
//! error, and `--device cpu` is the default. None of this needs a GPU.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{cartridge, model_path};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every command that loads the model to compute, with arguments that get it as far as that.
fn computing_commands(tmp: &Path) -> Vec<Vec<String>> {
    let corpus = root().join("examples/corpora/velmora");
    let questions = root().join("examples/evals/tidewright.jsonl");
    let s = |p: &Path| p.display().to_string();
    let out = tmp.join("out");
    [
        vec!["generate", "--prompt", "hi"],
        vec!["chat"],
        vec!["serve", "--cartridges", &s(tmp), "--addr", "127.0.0.1:0"],
        vec!["eval", "--data", &s(&questions)],
        vec!["train", "--data", &s(tmp), "--out", "x.cart"],
        vec![
            "build",
            &s(&corpus),
            "--out",
            &s(&out.with_extension("cart")),
        ],
        vec!["synthesize", &s(&corpus), "--out", &s(&out)],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect()
}

fn run(args: &[String], extra: &[&str]) -> Output {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    cartridge(&all)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit 2, one line on stderr, containing `needle`, and no panic.
fn assert_refused(out: &Output, needle: &str, what: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{what}: stderr {err}");
    assert!(err.contains(needle), "{what}: stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: stderr {err}");
    assert!(!err.contains("panicked"), "{what}: stderr {err}");
}

#[test]
#[cfg(not(feature = "cuda"))]
fn cuda_in_a_cpu_build_is_refused_by_every_computing_command() {
    let tmp = tempfile::tempdir().unwrap();
    for args in computing_commands(tmp.path()) {
        for device in ["cuda", "cuda:1"] {
            let out = run(&args, &["--device", device]);
            assert_refused(
                &out,
                "this binary was built without CUDA support; rebuild with scripts/build-cuda.sh",
                &format!("{} --device {device}", args[0]),
            );
        }
    }
}

#[test]
#[cfg(feature = "cuda")]
fn a_gpu_that_is_not_there_is_refused_by_every_computing_command() {
    // No machine has 1000 GPUs: with or without a driver, this device is unavailable.
    let tmp = tempfile::tempdir().unwrap();
    for args in computing_commands(tmp.path()) {
        let out = run(&args, &["--device", "cuda:999"]);
        assert_refused(&out, "cuda:999 is not available", &args[0]);
    }
}

#[test]
fn a_misspelt_device_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    for args in computing_commands(tmp.path()) {
        for device in ["bogus", "cuda:", "cuda:x", "gpu"] {
            let out = run(&args, &["--device", device]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{} {device}: {err}", args[0]);
            assert!(
                err.contains("invalid value") && err.contains("expected cpu, cuda or cuda:N"),
                "{} {device}: {err}",
                args[0]
            );
        }
    }
}

#[test]
fn the_device_is_also_a_config_file_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("run.toml");
    std::fs::write(&config, "device = \"bogus\"\n").unwrap();
    let corpus = root().join("examples/corpora/velmora");
    let out = cartridge(&[
        "synthesize",
        &corpus.display().to_string(),
        "--out",
        &tmp.path().join("d").display().to_string(),
        "--config",
        &config.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("unknown device"), "{}", stderr(&out));
}

#[test]
fn cpu_is_the_default_and_gives_the_same_tokens() {
    let Some(model) = model_path() else { return };
    let model = model.display().to_string();
    let base = [
        "generate",
        "--model",
        &model,
        "--prompt",
        "Name a colour.",
        "--max-tokens",
        "4",
        "--json",
    ];
    let ids = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = cartridge(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        v["ids"].clone()
    };
    let default = ids(&[]);
    assert_eq!(default.as_array().map(Vec::len), Some(4));
    assert_eq!(ids(&["--device", "cpu"]), default);
    assert_eq!(ids(&["--device", "CPU"]), default);
}
