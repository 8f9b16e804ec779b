//! Training data read from a dataset folder on disk (the self-study output): records, corpus
//! digest and teacher come through; a teacher with another tokenizer is refused.

mod common;

use cartridge_compiler::{train, ModelRef, RunOptions, TrainConfig, TrainData};
use cartridge_formats::dataset::{Dataset, DatasetWriter, Manifest, ReadOptions};
use common::{corpus, tiny_model, toy_data};

#[test]
fn dataset_on_disk_trains_and_foreign_tokenizer_is_refused() {
    let (model, fp) = tiny_model(11, "model-a");
    let toy = toy_data(&model, 6, 4);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let digest = format!("sha256:{}", "cd".repeat(32));
    let manifest = Manifest::new(
        fp.clone(),
        digest.clone(),
        "2026-01-01T00:00:00Z",
        serde_json::json!({}),
    );
    let mut w = DatasetWriter::create(&data_dir, manifest).unwrap();
    for r in &toy.records {
        w.append(r).unwrap();
    }
    w.sync().unwrap();
    drop(w);
    let ds = Dataset::open(&data_dir, ReadOptions::default()).unwrap();
    let data = TrainData::from_dataset(&ds).unwrap();
    assert_eq!(data.records, toy.records);
    assert_eq!(data.corpus_digest.as_deref(), Some(digest.as_str()));

    let cfg = TrainConfig {
        tokens: 6,
        max_steps: Some(2),
        eval_conversations: 2,
        ..TrainConfig::default()
    };
    let out = dir.path().join("c.cart");
    let s = train(
        &cfg,
        ModelRef {
            transformer: &model,
            fingerprint: &fp,
        },
        &data,
        Some(&corpus()),
        &out,
        &RunOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(s.finished && s.out_bytes > 0);
    let file = cartridge_formats::cart::CartFile::open(&out).unwrap();
    let prov = &file.header().provenance;
    assert_eq!(prov.corpus_digest.as_deref(), Some(digest.as_str()));
    assert_eq!(prov.training["settings"]["tokens"], 6);

    let mut foreign = data.clone();
    if let Some(t) = foreign.teacher.as_mut() {
        t.tokenizer_hash = format!("sha256:{}", "ee".repeat(32));
    }
    let err = train(
        &cfg,
        ModelRef {
            transformer: &model,
            fingerprint: &fp,
        },
        &foreign,
        Some(&corpus()),
        &out,
        &RunOptions::default(),
        &mut |_| {},
    )
    .expect_err("another tokenizer");
    assert!(err.to_string().contains("tokenizer"), "{err}");
}
