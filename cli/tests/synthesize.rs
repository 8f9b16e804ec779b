//! `cartridge synthesize` and `cartridge inspect DIR` on the real default model: a small run, its
//! resume, and clear errors for empty or binary corpora.
//!
//! Needs the default model (`scripts/fetch-model.sh`); without it these tests print a note and pass,
//! except under CI (`CI` set), where a missing model is a failure.

mod common;

use std::path::PathBuf;

use common::{cartridge, ok_json};

const SMALL: &[&str] = &[
    "--batch",
    "3",
    "--chunk-min",
    "48",
    "--chunk-max",
    "64",
    "--max-answer-tokens",
    "12",
    "--max-user-tokens",
    "16",
    "--json",
];

#[test]
fn synthesize_resume_and_inspect() {
    if common::model_path().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    std::fs::write(
        corpus.join("notes.md"),
        "The Gray Needle lighthouse of Velmora is 41 meters tall and was rebuilt in 1788. \
         Its keeper in 1850 was Tomas Arvidsen, who logged 2,314 ship arrivals that year. \
         The town council meets every second Tuesday in the Salt Hall.",
    )
    .unwrap();
    std::fs::write(
        corpus.join("logo.png"),
        [0x89u8, b'P', b'N', b'G', 0, 0, 0, 13, 0xff],
    )
    .unwrap();
    let out: PathBuf = dir.path().join("data");
    let (c, o) = (corpus.to_str().unwrap(), out.to_str().unwrap());

    let first = ok_json(&cartridge(
        &[&["synthesize", c, "--out", o, "--num", "3"], SMALL].concat(),
    ));
    assert_eq!(first["written"], 3);
    assert_eq!(first["skipped_binary"], 1);

    let resumed = ok_json(&cartridge(
        &[
            &["synthesize", c, "--out", o, "--num", "5", "--resume"],
            SMALL,
        ]
        .concat(),
    ));
    assert_eq!(resumed["already_present"], 3);
    assert_eq!(resumed["written"], 2);

    let v = ok_json(&cartridge(&["inspect", "--json", "--show", "2", o]));
    let d = &v[0];
    assert_eq!(d["kind"], "dataset");
    assert_eq!(d["records"], 5);
    let kinds: u64 = d["seed_kinds"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(kinds, 5);
    assert_eq!(d["samples"].as_array().unwrap().len(), 2);
    assert!(d["target_tokens"].as_u64().unwrap() > 0);

    // Without --resume an existing dataset is not overwritten.
    let again = cartridge(&[&["synthesize", c, "--out", o, "--num", "5"], SMALL].concat());
    assert_ne!(again.status.code(), Some(0));
}

#[test]
fn empty_and_binary_corpora_are_clear_errors() {
    if common::model_path().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let binary = dir.path().join("binary");
    std::fs::create_dir(&binary).unwrap();
    std::fs::write(binary.join("a.bin"), [0u8, 1, 2, 3, 0, 0, 255]).unwrap();
    for corpus in [&empty, &binary] {
        let out = cartridge(&[
            "synthesize",
            corpus.to_str().unwrap(),
            "--out",
            dir.path().join("out").to_str().unwrap(),
            "--num",
            "1",
        ]);
        assert_ne!(out.status.code(), Some(0));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains("empty"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
