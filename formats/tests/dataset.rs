//! Self-study dataset shards: round trip, torn tail, corruption, foreign teachers, resume.

use std::path::Path;

use cartridge_formats::dataset::{
    ChunkLocation, ChunkPiece, Dataset, DatasetError, DatasetWriter, Manifest, Message,
    ReadOptions, Record,
};
use cartridge_formats::fingerprint::sha256_hex;
use cartridge_formats::ModelFingerprint;

fn teacher(tok: &[u8]) -> ModelFingerprint {
    ModelFingerprint {
        architecture: "llama".into(),
        num_layers: 2,
        hidden_size: 16,
        num_attention_heads: 2,
        num_kv_heads: 1,
        head_dim: 8,
        vocab_size: 500,
        rope_theta: 1e4,
        rope_scaling: None,
        tokenizer_hash: sha256_hex(tok),
        weights_hash: sha256_hex(b"weights"),
    }
}

const CORPUS: &str = "sha256:corpus";

fn manifest(tok: &[u8]) -> Manifest {
    Manifest::new(
        teacher(tok),
        CORPUS,
        "2026-11-29T06:00:00Z",
        serde_json::json!({"k": 3}),
    )
}

fn record(id: u64) -> Record {
    let n = 8 + (id as usize % 5);
    let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7 + id as u32) % 500).collect();
    let targets = vec![(3u32, (n - 3) as u32)];
    let m = n - 3;
    let k = 3usize;
    Record {
        id,
        seed_kind: ["question", "creative", "summarization"][id as usize % 3].into(),
        seed_prompt: format!("seed {id}"),
        location: ChunkLocation {
            chunk: id / 4,
            pieces: vec![ChunkPiece {
                file: "docs/a.md".into(),
                start: id,
                end: id + 100,
            }],
        },
        messages: vec![
            Message {
                role: "user".into(),
                content: format!("question {id} — ünïcode"),
            },
            Message {
                role: "assistant".into(),
                content: "answer".into(),
            },
        ],
        tokens,
        targets,
        top_k: k as u32,
        topk_ids: (0..m * k).map(|i| (i as u32 * 13 + 1) % 500).collect(),
        topk_logprobs: (0..m * k).map(|i| -0.1 - i as f32 * 0.25).collect(),
    }
}

fn write(dir: &Path, ids: std::ops::Range<u64>, cap: u64) {
    let mut w = DatasetWriter::create(dir, manifest(b"tok"))
        .expect("create")
        .with_shard_cap(cap);
    for id in ids {
        w.append(&record(id)).expect("append");
    }
    w.sync().expect("sync");
}

fn last_shard(dir: &Path) -> std::path::PathBuf {
    let ds = Dataset::open(dir, ReadOptions::default()).expect("open");
    ds.shards().last().expect("a shard").clone()
}

#[test]
fn round_trip_over_several_shards() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(tmp.path(), 0..40, 600);
    let ds = Dataset::open(tmp.path(), ReadOptions::default()).expect("open");
    assert!(ds.shards().len() > 2, "the cap splits shards");
    let recs = ds.records().expect("records");
    assert_eq!(recs, (0..40).map(record).collect::<Vec<_>>());
    let stats = ds.stats().expect("stats");
    assert_eq!(stats.records, 40);
    assert_eq!(
        stats.tokens,
        (0..40).map(|i| record(i).tokens.len() as u64).sum::<u64>()
    );
    assert_eq!(stats.seed_kinds["question"], 14);
    assert_eq!(stats.chunks, 10);
    assert_eq!(ds.manifest().teacher, teacher(b"tok"));
    let head = ds.head(3).expect("head");
    assert_eq!(head, (0..3).map(record).collect::<Vec<_>>());
    assert!(ds.head(0).expect("head").is_empty());
    assert_eq!(ds.head(100).expect("head").len(), 40);
}

#[test]
fn create_refuses_an_existing_dataset() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(tmp.path(), 0..2, 1 << 20);
    let err = DatasetWriter::create(tmp.path(), manifest(b"tok")).expect_err("exists");
    assert!(matches!(err, DatasetError::AlreadyExists { .. }), "{err}");
}

#[test]
fn torn_tail_is_reported_tolerated_and_dropped_on_resume() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(tmp.path(), 0..10, 1 << 20);
    let shard = last_shard(tmp.path());
    let len = std::fs::metadata(&shard).expect("meta").len();
    // Cut the last record in half.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .expect("open");
    f.set_len(len - 20).expect("truncate");
    drop(f);

    let err = Dataset::open(tmp.path(), ReadOptions::default())
        .expect("open")
        .stats()
        .expect_err("torn");
    assert!(matches!(err, DatasetError::TornTail { .. }), "{err}");
    assert!(err.to_string().contains("--resume"), "{err}");

    let lenient = Dataset::open(
        tmp.path(),
        ReadOptions {
            tolerate_torn_tail: true,
        },
    )
    .expect("open");
    let stats = lenient.stats().expect("stats");
    assert_eq!(stats.records, 9);
    assert!(stats.torn_tail_bytes > 0);

    let (mut w, state) =
        DatasetWriter::resume(tmp.path(), &teacher(b"tok"), CORPUS).expect("resume");
    assert_eq!(state.ids, (0..9).collect());
    assert!(state.dropped_torn_bytes > 0);
    for id in 9..12 {
        assert!(!state.ids.contains(&id));
        w.append(&record(id)).expect("append");
    }
    w.sync().expect("sync");
    let recs = Dataset::open(tmp.path(), ReadOptions::default())
        .expect("open")
        .records()
        .expect("records");
    let ids: Vec<u64> = recs.iter().map(|r| r.id).collect();
    assert_eq!(
        ids,
        (0..12).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
}

#[test]
fn torn_header_and_partly_flushed_frame_are_torn_tails() {
    for cut in [5u64, 0] {
        let tmp = tempfile::tempdir().expect("tmp");
        write(tmp.path(), 0..3, 1 << 20);
        let shard = last_shard(tmp.path());
        let mut bytes = std::fs::read(&shard).expect("read");
        if cut == 0 {
            // The last frame's tail bytes were never flushed: zeros instead of data.
            let n = bytes.len();
            bytes[n - 10..].fill(0);
        } else {
            // Append 5 bytes of a frame header that never finished.
            bytes.extend_from_slice(&[1, 2, 3, 4, 5]);
        }
        std::fs::write(&shard, &bytes).expect("write");
        let lenient = Dataset::open(
            tmp.path(),
            ReadOptions {
                tolerate_torn_tail: true,
            },
        )
        .expect("open");
        let want = if cut == 0 { 2 } else { 3 };
        assert_eq!(lenient.stats().expect("stats").records, want);
    }
}

#[test]
fn corrupt_record_in_the_middle_is_an_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(tmp.path(), 0..6, 1 << 20);
    let shard = last_shard(tmp.path());
    let mut bytes = std::fs::read(&shard).expect("read");
    // Flip a byte inside the first frame's stored data (preamble 48 + header 16).
    bytes[48 + 16 + 3] ^= 0x40;
    std::fs::write(&shard, &bytes).expect("write");
    for tolerate in [false, true] {
        let err = Dataset::open(
            tmp.path(),
            ReadOptions {
                tolerate_torn_tail: tolerate,
            },
        )
        .expect("open")
        .stats()
        .expect_err("corrupt");
        assert!(
            matches!(err, DatasetError::CorruptRecord { offset: 48, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("checksum"), "{err}");
    }
    // Resume refuses too: it must not silently drop good data after the bad frame.
    let err = DatasetWriter::resume(tmp.path(), &teacher(b"tok"), CORPUS).expect_err("corrupt");
    assert!(matches!(err, DatasetError::CorruptRecord { .. }), "{err}");
}

#[test]
fn torn_frame_in_an_earlier_shard_is_corruption() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(tmp.path(), 0..20, 600);
    let ds = Dataset::open(tmp.path(), ReadOptions::default()).expect("open");
    let first = ds.shards()[0].clone();
    let len = std::fs::metadata(&first).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .expect("open");
    f.set_len(len - 7).expect("truncate");
    drop(f);
    let err = Dataset::open(
        tmp.path(),
        ReadOptions {
            tolerate_torn_tail: true,
        },
    )
    .expect("open")
    .stats()
    .expect_err("corrupt");
    assert!(matches!(err, DatasetError::CorruptRecord { .. }), "{err}");
}

#[test]
fn another_teacher_or_corpus_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(tmp.path(), 0..3, 1 << 20);
    let err = DatasetWriter::resume(tmp.path(), &teacher(b"other tokenizer"), CORPUS)
        .expect_err("mixed tokenizers");
    assert!(matches!(err, DatasetError::TeacherMismatch { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer_hash"), "{err}");
    let err = DatasetWriter::resume(tmp.path(), &teacher(b"tok"), "sha256:other")
        .expect_err("other corpus");
    assert!(err.to_string().contains("corpus"), "{err}");
    let ds = Dataset::open(tmp.path(), ReadOptions::default()).expect("open");
    assert!(ds.manifest().check_teacher(&teacher(b"other")).is_err());
    assert!(ds.manifest().check_teacher(&teacher(b"tok")).is_ok());

    // A shard copied in from a dataset made by another teacher is refused by the reader.
    let other = tempfile::tempdir().expect("tmp");
    let mut w = DatasetWriter::create(other.path(), manifest(b"other")).expect("create");
    w.append(&record(100)).expect("append");
    w.sync().expect("sync");
    let foreign = Dataset::open(other.path(), ReadOptions::default())
        .expect("open")
        .shards()[0]
        .clone();
    std::fs::copy(&foreign, tmp.path().join("shard-00042.cds")).expect("copy");
    let err = Dataset::open(tmp.path(), ReadOptions::default())
        .expect("open")
        .stats()
        .expect_err("foreign shard");
    assert!(matches!(err, DatasetError::ForeignShard { .. }), "{err}");
}

#[test]
fn duplicate_ids_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut w = DatasetWriter::create(tmp.path(), manifest(b"tok")).expect("create");
    w.append(&record(1)).expect("append");
    w.append(&record(1)).expect("append");
    w.sync().expect("sync");
    let err = Dataset::open(tmp.path(), ReadOptions::default())
        .expect("open")
        .stats()
        .expect_err("dup");
    assert!(
        matches!(err, DatasetError::DuplicateId { id: 1, .. }),
        "{err}"
    );
}

#[test]
fn bad_manifest_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let err = Dataset::open(tmp.path(), ReadOptions::default()).expect_err("none");
    assert!(matches!(err, DatasetError::NoManifest { .. }), "{err}");
    write(tmp.path(), 0..1, 1 << 20);
    let path = tmp.path().join("manifest.json");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replace("\"version\": 1", "\"version\": 9")).expect("write");
    let err = Dataset::open(tmp.path(), ReadOptions::default()).expect_err("version");
    assert!(
        err.to_string().contains("unsupported dataset version 9"),
        "{err}"
    );
}

#[test]
fn records_with_ids_past_the_vocabulary_are_not_written() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut w = DatasetWriter::create(tmp.path(), manifest(b"tok")).expect("create");
    let mut r = record(0);
    r.tokens[0] = 9999;
    assert!(matches!(w.append(&r), Err(DatasetError::InvalidRecord(_))));
}

#[test]
fn resume_removes_a_shard_whose_preamble_was_torn() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(tmp.path(), 0..3, 1 << 20);
    // The writer died right after creating the next shard.
    let preamble = std::fs::read(last_shard(tmp.path())).expect("read")[..10].to_vec();
    std::fs::write(tmp.path().join("shard-00001.cds"), preamble).expect("write");
    let (mut w, state) =
        DatasetWriter::resume(tmp.path(), &teacher(b"tok"), CORPUS).expect("resume");
    assert_eq!(state.ids.len(), 3);
    assert_eq!(state.dropped_torn_bytes, 10);
    w.append(&record(3)).expect("append");
    w.sync().expect("sync");
    let ds = Dataset::open(tmp.path(), ReadOptions::default()).expect("open");
    assert_eq!(ds.stats().expect("stats").records, 4);
    assert!(!tmp.path().join("shard-00001.cds").exists());
}

#[test]
fn a_second_writer_is_refused_while_the_first_is_writing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut first = DatasetWriter::create(tmp.path(), manifest(b"tok")).expect("create");
    first.append(&record(0)).expect("append");
    first.sync().expect("sync");
    let shard = last_shard(tmp.path());
    let before = std::fs::read(&shard).expect("read shard");

    // Resuming now would truncate the shard the first writer appends to and repeat its ids.
    let err = DatasetWriter::resume(tmp.path(), &teacher(b"tok"), CORPUS).expect_err("busy");
    assert!(matches!(err, DatasetError::Busy { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("(pid {})", std::process::id()))
            && message.contains("another process"),
        "{message}"
    );
    let err = DatasetWriter::create(tmp.path(), manifest(b"tok")).expect_err("busy");
    assert!(matches!(err, DatasetError::Busy { .. }), "{err}");
    assert_eq!(std::fs::read(&shard).expect("read shard"), before);

    // The first writer goes on; once it is gone (dropped, or its process ended), resume works.
    first.append(&record(1)).expect("append");
    first.sync().expect("sync");
    drop(first);
    let (_, state) = DatasetWriter::resume(tmp.path(), &teacher(b"tok"), CORPUS).expect("resume");
    assert_eq!(state.ids, (0..2).collect());
    // The lock file is not a shard: readers do not see it.
    let stats = Dataset::open(tmp.path(), ReadOptions::default())
        .expect("open")
        .stats()
        .expect("stats");
    assert_eq!(stats.records, 2);
}
