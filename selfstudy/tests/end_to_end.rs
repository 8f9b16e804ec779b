//! Corpus folder -> synthesis on a tiny random chat model -> shards -> read back; ids and top-k
//! agree with a direct forward pass; resume after a torn write loses and duplicates nothing.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use cartridge_formats::dataset::{Dataset, ReadOptions, Record};
use cartridge_runtime::generate::top_logprobs;
use cartridge_runtime::loader;
use cartridge_runtime::{Logits, Path as RunPath};
use cartridge_selfstudy::chunk::TokenizedCorpus;
use cartridge_selfstudy::corpus::{ingest, IngestOptions};
use cartridge_selfstudy::local::LocalBackend;
use cartridge_selfstudy::prompt::{system_message, ChatFrame};
use cartridge_selfstudy::{synthesize, Backend, Corpus, Error, SeedWeights, SynthesisConfig};

fn corpus(root: &Path) -> Corpus {
    common::write_files(
        root,
        &[
            (
                "guide.md",
                "# Garden guide\nTomatoes need six hours of sun. Water them at the base, never \
                 the leaves. Basil grows well next to tomatoes and keeps some pests away.\n"
                    .as_bytes(),
            ),
            (
                "notes/schedule.txt",
                b"Monday: prune the roses. Wednesday: compost. Friday: harvest beans and peas.\n",
            ),
            ("photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"),
        ],
    );
    ingest(root, &IngestOptions::default()).expect("ingest")
}

fn backend(model_dir: &Path) -> LocalBackend {
    let loaded = loader::load_hf_dir(model_dir, &Device::Cpu).expect("load tiny model");
    LocalBackend::new(loaded).expect("backend")
}

fn config() -> SynthesisConfig {
    SynthesisConfig {
        num_conversations: 6,
        batch: 3,
        chunk_min_tokens: 40,
        chunk_max_tokens: 90,
        description: Some("a small gardening notebook".into()),
        max_user_tokens: 12,
        max_answer_tokens: 10,
        top_k: 5,
        seed: 11,
        ..SynthesisConfig::default()
    }
}

fn read(dir: &Path) -> Vec<Record> {
    Dataset::open(dir, ReadOptions::default())
        .expect("open")
        .records()
        .expect("records")
}

/// Recompute the teacher's distributions with one plain forward over system ++ tokens.
fn check_against_forward(backend: &LocalBackend, corpus: &Corpus, rec: &Record) {
    check_scores_against_forward(backend, corpus, rec);
    for (row, pos) in rec.target_positions().enumerate() {
        let (ids, _) = rec.topk_row(row).expect("row");
        // The assistant decodes greedily: each answer token is the teacher's top-1.
        assert_eq!(rec.tokens[pos], ids[0], "record {} target {row}", rec.id);
    }
}

/// The stored top-k rows against one plain forward over system ++ tokens.
fn check_scores_against_forward(backend: &LocalBackend, corpus: &Corpus, rec: &Record) {
    let tokenized = TokenizedCorpus::new(corpus, backend).expect("tokenize");
    let text = tokenized
        .chunk_text(&rec.location, backend)
        .expect("chunk text");
    let system = system_message(&text, Some("a small gardening notebook"));
    let frame = ChatFrame::new(backend, system).expect("frame");
    let mut ids = frame.system_ids().to_vec();
    let offset = ids.len();
    ids.extend_from_slice(&rec.tokens);
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).expect("ids");
    let logits = backend
        .model()
        .forward(None, None, &input, Logits::All, RunPath::Infer)
        .expect("forward")
        .to_dtype(DType::F32)
        .expect("f32")
        .squeeze(0)
        .expect("squeeze")
        .to_vec2::<f32>()
        .expect("vec");
    for (row, pos) in rec.target_positions().enumerate() {
        let z = &logits[offset + pos - 1];
        let want = top_logprobs(z, rec.top_k as usize);
        let (ids, lps) = rec.topk_row(row).expect("row");
        for (j, &(id, lp)) in want.iter().enumerate() {
            assert!(
                (lps[j] - lp).abs() < 1e-3,
                "record {} target {row} rank {j}: stored {} vs forward {lp}",
                rec.id,
                lps[j]
            );
            // Ids agree unless two candidates are within rounding of each other.
            if ids[j] != id {
                let stored_lp = z[ids[j] as usize];
                assert!(
                    (stored_lp - z[id as usize]).abs() < 1e-4,
                    "rank {j} id differs"
                );
            }
        }
    }
}

#[test]
fn corpus_to_shards_and_back_matches_a_direct_forward() {
    let model_dir = tempfile::tempdir().expect("tmp");
    common::write_tiny_chat_model(model_dir.path(), 3);
    let corpus_dir = tempfile::tempdir().expect("tmp");
    let corpus = corpus(corpus_dir.path());
    assert_eq!(corpus.skipped_binary, 1);
    let out = tempfile::tempdir().expect("tmp");
    let data = out.path().join("data");
    let mut be = backend(model_dir.path());
    let mut calls = 0;
    let summary = synthesize(&config(), &mut be, &corpus, &data, false, |p| {
        calls += 1;
        assert!(p.done <= p.total);
    })
    .expect("synthesize");
    assert_eq!(calls, 2, "one progress call per chunk");
    assert_eq!(summary.written, 6);
    assert_eq!(summary.chunks, 2);
    assert!(summary.answer_tokens > 0);
    assert!(summary.timings.prefix_tokens > 0);

    let ds = Dataset::open(&data, ReadOptions::default()).expect("open");
    assert_eq!(ds.manifest().teacher, be.info().teacher);
    assert_eq!(ds.manifest().corpus_digest, corpus.digest);
    let stats = ds.stats().expect("stats");
    assert_eq!(stats.records, 6);
    assert_eq!(stats.target_tokens, summary.answer_tokens);
    let recs = read(&data);
    assert_eq!(
        recs.iter().map(|r| r.id).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
    for rec in &recs {
        assert_eq!(rec.top_k, 5);
        assert_eq!(rec.messages.len(), 2);
        assert_eq!(rec.messages[0].role, "user");
        assert!(!rec.location.pieces.is_empty());
        // Training sees no BOS and no system message: the ids start with the user turn.
        assert_eq!(rec.tokens[0], common::IM_START);
        let sys = be.encode("<|im_start|>system").expect("encode");
        assert!(!rec.tokens.windows(sys.len()).any(|w| w == sys.as_slice()));
        let n = rec.num_targets();
        assert!((1..=10).contains(&n));
        check_against_forward(&be, &corpus, rec);
    }
    // Conversations of one chunk share its location.
    assert_eq!(recs[0].location, recs[2].location);
    assert_ne!(recs[0].location, recs[3].location);

    // A second run without --resume refuses to touch the dataset.
    let err = synthesize(&config(), &mut be, &corpus, &data, false, |_| {}).expect_err("exists");
    assert!(err.to_string().contains("--resume"), "{err}");
}

#[test]
fn resume_after_a_torn_write_loses_and_duplicates_nothing() {
    let model_dir = tempfile::tempdir().expect("tmp");
    common::write_tiny_chat_model(model_dir.path(), 5);
    let corpus_dir = tempfile::tempdir().expect("tmp");
    let corpus = corpus(corpus_dir.path());
    let out = tempfile::tempdir().expect("tmp");
    let data = out.path().join("data");
    let mut be = backend(model_dir.path());
    synthesize(&config(), &mut be, &corpus, &data, false, |_| {}).expect("synthesize");
    let before = read(&data);

    // Kill mid-write: cut the last record of the last shard in half.
    let shard = Dataset::open(&data, ReadOptions::default())
        .expect("open")
        .shards()
        .last()
        .expect("shard")
        .clone();
    let len = std::fs::metadata(&shard).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .expect("open");
    f.set_len(len - 30).expect("truncate");
    drop(f);
    assert!(Dataset::open(&data, ReadOptions::default())
        .expect("open")
        .stats()
        .is_err());

    let summary = synthesize(&config(), &mut be, &corpus, &data, true, |_| {}).expect("resume");
    assert_eq!(summary.already_present, 5);
    assert_eq!(summary.written, 1);
    assert!(summary.dropped_torn_bytes > 0);
    let after = read(&data);
    let mut ids: Vec<u64> = after.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..6).collect::<Vec<_>>());
    // The regenerated conversation is the one that was lost (the run is deterministic per id).
    let lost = before.iter().find(|r| r.id == 5).expect("id 5");
    let again = after.iter().find(|r| r.id == 5).expect("id 5 again");
    assert_eq!(again.seed_prompt, lost.seed_prompt);
    assert_eq!(again.location, lost.location);
    assert_eq!(again.tokens, lost.tokens);

    // Growing the dataset: only the new ids are made.
    let bigger = SynthesisConfig {
        num_conversations: 8,
        ..config()
    };
    let s = synthesize(&bigger, &mut be, &corpus, &data, true, |_| {}).expect("grow");
    assert_eq!((s.already_present, s.written), (6, 2));
    assert_eq!(read(&data).len(), 8);

    // Resuming with another teacher (another tokenizer/weights) is refused.
    let other_dir = tempfile::tempdir().expect("tmp");
    common::write_tiny_chat_model(other_dir.path(), 99);
    let mut other = backend(other_dir.path());
    let err = synthesize(&bigger, &mut other, &corpus, &data, true, |_| {}).expect_err("mixed");
    assert!(matches!(err, Error::Dataset(_)), "{err}");
    assert!(err.to_string().contains("teacher mismatch"), "{err}");

    // Resuming with other settings is refused.
    let changed = SynthesisConfig { top_k: 3, ..bigger };
    let err = synthesize(&changed, &mut be, &corpus, &data, true, |_| {}).expect_err("settings");
    assert!(err.to_string().contains("settings differ"), "{err}");
}

#[test]
fn two_turns_keep_tokens_consistent_with_the_teacher() {
    let model_dir = tempfile::tempdir().expect("tmp");
    common::write_tiny_chat_model(model_dir.path(), 8);
    let corpus_dir = tempfile::tempdir().expect("tmp");
    let corpus = corpus(corpus_dir.path());
    let out = tempfile::tempdir().expect("tmp");
    let mut be = backend(model_dir.path());
    let cfg = SynthesisConfig {
        num_conversations: 2,
        batch: 2,
        turns: 2,
        ..config()
    };
    synthesize(&cfg, &mut be, &corpus, out.path(), false, |_| {}).expect("synthesize");
    for rec in read(out.path()) {
        assert_eq!(rec.messages.len(), 4);
        assert_eq!(rec.targets.len(), 2);
        check_against_forward(&be, &corpus, &rec);
    }
}

#[test]
fn verbatim_answers_are_the_corpus_text_with_the_teachers_scores() {
    let model_dir = tempfile::tempdir().expect("tmp");
    common::write_tiny_chat_model(model_dir.path(), 3);
    let corpus_dir = tempfile::tempdir().expect("tmp");
    let corpus = corpus(corpus_dir.path());
    let out = tempfile::tempdir().expect("tmp");
    let data = out.path().join("data");
    let mut be = backend(model_dir.path());
    let config = SynthesisConfig {
        seed_weights: SeedWeights::parse("verbatim=1").expect("weights"),
        ..config()
    };
    synthesize(&config, &mut be, &corpus, &data, false, |_| {}).expect("synthesize");
    let recs = read(&data);
    assert_eq!(recs.len(), 6);
    for rec in &recs {
        assert_eq!(rec.seed_kind, "verbatim");
        let answer = &rec.messages[1].content;
        assert!(!answer.is_empty());
        let (at, n) = rec.targets[0];
        let ids = &rec.tokens[at as usize..(at + n) as usize];
        assert_eq!(be.decode(ids).expect("decode").trim(), answer.as_str());
        // Teacher forcing: the rows are the teacher's distributions before each corpus token,
        // whatever it would have written itself.
        check_scores_against_forward(&be, &corpus, rec);
    }
}
