//! Shared by the CLI tests: run the binary, and find the default model (tests that need it print
//! a note and pass without it, except under CI, where a missing model is a failure).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

use cartridge_runtime::loader;

/// Run `cartridge` with `args`.
pub fn cartridge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cartridge"))
        .args(args)
        .output()
        .expect("run cartridge")
}

/// The JSON a successful `--json` run printed on stdout; fails the test with its stderr otherwise.
pub fn ok_json(out: &Output) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// The default model's path, or `None` (with a note) when it is absent outside CI.
pub fn model_path() -> Option<PathBuf> {
    let path = loader::default_model_path().ok()?;
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "model {} missing under CI: run scripts/fetch-model.sh",
        path.display()
    );
    eprintln!(
        "skipped: {} not found; run scripts/fetch-model.sh",
        path.display()
    );
    None
}
