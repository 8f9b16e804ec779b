//! Corpus ingestion: binary files, .gitignore, excludes, invalid UTF-8, empty and over-cap corpora.

mod common;

use cartridge_selfstudy::corpus::{ingest, IngestOptions, InvalidUtf8};
use cartridge_selfstudy::Error;

fn sample(root: &std::path::Path) {
    common::write_files(
        root,
        &[
            ("README.md", b"# Title\nSome prose.\n"),
            ("src/lib.rs", b"fn main() {}\n"),
            ("src/data.json", b"{\"a\": 1}\n"),
            ("img/logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
            ("build/out.txt", b"generated\n"),
            ("notes/secret.txt", b"ignored by gitignore\n"),
            (".gitignore", b"build/\nsecret.txt\n"),
            (".hidden/x.txt", b"hidden\n"),
        ],
    );
}

#[test]
fn folder_walk_keeps_text_skips_binary_and_honours_gitignore() {
    let tmp = tempfile::tempdir().expect("tmp");
    sample(tmp.path());
    let c = ingest(tmp.path(), &IngestOptions::default()).expect("ingest");
    let paths: Vec<&str> = c.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, vec!["README.md", "src/data.json", "src/lib.rs"]);
    assert_eq!(c.skipped_binary, 1);
    assert!(c.digest.starts_with("sha256:"));
    assert_eq!(c.files[0].text, "# Title\nSome prose.\n");

    // Without .gitignore handling the ignored files come back.
    let all = ingest(
        tmp.path(),
        &IngestOptions {
            gitignore: false,
            ..IngestOptions::default()
        },
    )
    .expect("ingest");
    assert!(all.files.iter().any(|f| f.path == "build/out.txt"));
    assert!(all.files.iter().any(|f| f.path == "notes/secret.txt"));
    assert_ne!(all.digest, c.digest);
}

#[test]
fn excludes_drop_files_and_folders() {
    let tmp = tempfile::tempdir().expect("tmp");
    sample(tmp.path());
    let c = ingest(
        tmp.path(),
        &IngestOptions {
            exclude: vec!["*.json".into(), "src".into()],
            ..IngestOptions::default()
        },
    )
    .expect("ingest");
    let paths: Vec<&str> = c.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, vec!["README.md"]);
    let err = ingest(
        tmp.path(),
        &IngestOptions {
            exclude: vec!["[".into()],
            ..IngestOptions::default()
        },
    )
    .expect_err("bad glob");
    assert!(matches!(err, Error::BadGlob { .. }), "{err}");
}

#[test]
fn digest_is_stable_and_location_independent() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    sample(a.path());
    sample(b.path());
    let da = ingest(a.path(), &IngestOptions::default())
        .expect("a")
        .digest;
    let db = ingest(b.path(), &IngestOptions::default())
        .expect("b")
        .digest;
    assert_eq!(da, db);
    std::fs::write(b.path().join("src/lib.rs"), b"fn main() { }\n").expect("edit");
    let db2 = ingest(b.path(), &IngestOptions::default())
        .expect("b")
        .digest;
    assert_ne!(da, db2);
}

#[test]
fn invalid_utf8_is_reported_per_file_unless_lossy() {
    let tmp = tempfile::tempdir().expect("tmp");
    common::write_files(
        tmp.path(),
        &[
            ("good.txt", b"fine\n"),
            ("latin1.txt", b"caf\xe9 au lait\n"),
            ("bad/also.txt", b"ok then \xff\xfe broken\n"),
        ],
    );
    let err = ingest(tmp.path(), &IngestOptions::default()).expect_err("invalid");
    match &err {
        Error::InvalidUtf8 { files } => {
            assert_eq!(
                files,
                &vec![
                    ("bad/also.txt".to_string(), 8),
                    ("latin1.txt".to_string(), 3)
                ]
            );
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("latin1.txt (byte 3)"), "{err}");

    let lossy = ingest(
        tmp.path(),
        &IngestOptions {
            invalid_utf8: InvalidUtf8::Lossy,
            ..IngestOptions::default()
        },
    )
    .expect("lossy");
    assert_eq!(lossy.files.len(), 3);
    assert_eq!(lossy.invalid_utf8.len(), 2);
    assert!(lossy
        .files
        .iter()
        .any(|f| f.text.contains("caf\u{FFFD} au lait")));

    let skip = ingest(
        tmp.path(),
        &IngestOptions {
            invalid_utf8: InvalidUtf8::Skip,
            ..IngestOptions::default()
        },
    )
    .expect("skip");
    assert_eq!(skip.files.len(), 1);
    assert_eq!(skip.invalid_utf8.len(), 2);
}

#[test]
fn empty_missing_and_oversized_corpora_are_clear_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let err = ingest(tmp.path(), &IngestOptions::default()).expect_err("empty");
    assert!(matches!(err, Error::EmptyCorpus { .. }), "{err}");

    common::write_files(
        tmp.path(),
        &[("a.bin", b"\x00\x01\x02"), ("b.txt", b"  \n")],
    );
    let err = ingest(tmp.path(), &IngestOptions::default()).expect_err("only binary");
    assert!(
        err.to_string().contains("1 binary file(s) skipped"),
        "{err}"
    );

    let err = ingest(&tmp.path().join("nope"), &IngestOptions::default()).expect_err("missing");
    assert!(matches!(err, Error::CorpusNotFound(_)), "{err}");

    common::write_files(tmp.path(), &[("big.txt", &[b'x'; 5000])]);
    let err = ingest(
        tmp.path(),
        &IngestOptions {
            max_bytes: 4096,
            ..IngestOptions::default()
        },
    )
    .expect_err("too large");
    assert!(matches!(err, Error::CorpusTooLarge { .. }), "{err}");
}

#[test]
fn a_single_file_is_a_corpus() {
    let tmp = tempfile::tempdir().expect("tmp");
    common::write_files(tmp.path(), &[("contract.txt", b"Clause 1. Terms.\n")]);
    let c = ingest(&tmp.path().join("contract.txt"), &IngestOptions::default()).expect("ingest");
    assert_eq!(c.files.len(), 1);
    assert_eq!(c.files[0].path, "contract.txt");
}

#[cfg(unix)]
#[test]
fn unreadable_file_is_a_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tmp");
    common::write_files(
        tmp.path(),
        &[("a.txt", b"text\n"), ("locked.txt", b"secret\n")],
    );
    let locked = tmp.path().join("locked.txt");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    if std::fs::read(&locked).is_ok() {
        // Running as root: permissions do not apply; nothing to test.
        return;
    }
    let err = ingest(tmp.path(), &IngestOptions::default()).expect_err("unreadable");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("locked.txt"), "{err}");
}
