//! Training on a tiny random model: the held-out loss falls, frozen slots stay put, a stopped and
//! resumed run writes the same bytes as an uninterrupted one (also when killed right after its
//! start, which is then not computed again), the `.cart` loads in the runtime
//! (and is refused by another model), the soft-prompt path trains, and the row-gathered loss
//! equals the textbook full-vocabulary formula; two runs never write the same output at once.

mod common;

use candle_core::{Device, Tensor};
use cartridge_compiler::data::Example;
use cartridge_compiler::objective::{loss_sum, Batch};
use cartridge_compiler::{
    train, ArtifactKind, InitKind, InitStage, InitialParams, Objective, Progress, RunOptions,
    TrainConfig, TrainSummary,
};
use cartridge_runtime::cartridge_file::{load_cartridge, load_soft_prompt};
use cartridge_runtime::models::Logits;
use cartridge_runtime::{ops, Path};
use common::{corpus, tiny_model, toy_data};

fn cfg() -> TrainConfig {
    TrainConfig {
        tokens: 8,
        frozen_tokens: 1,
        lr: 2e-2,
        batch_size: 4,
        micro_batch: 2,
        max_steps: Some(30),
        seed: 7,
        eval_conversations: 4,
        eval_every: 10,
        checkpoint_every: 0,
        ..TrainConfig::default()
    }
}

fn opts() -> RunOptions {
    RunOptions {
        created: Some("2026-01-01T00:00:00Z".into()),
        ..RunOptions::default()
    }
}

fn run(cfg: &TrainConfig, out: &std::path::Path, opts: &RunOptions) -> (TrainSummary, Vec<f64>) {
    let (model, fp) = tiny_model(11, "model-a");
    let data = toy_data(&model, 16, 8);
    let mut losses = Vec::new();
    let summary = train(
        cfg,
        cartridge_compiler::ModelRef {
            transformer: &model,
            fingerprint: &fp,
        },
        &data,
        Some(&corpus()),
        out,
        opts,
        &mut |p| {
            if let Progress::Step(s) = p {
                losses.push(s.loss);
            }
        },
    )
    .expect("training runs");
    (summary, losses)
}

#[test]
fn held_out_loss_falls_and_frozen_slots_stay() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("toy.cart");
    let (s, losses) = run(&cfg(), &out, &opts());
    assert!(s.finished);
    assert_eq!(losses.len(), 30);
    let first = s.first_eval.expect("first eval");
    let last = s.final_eval.expect("final eval");
    eprintln!("held-out: {first:?} -> {last:?}; train {:?}", losses);
    // The teacher is below the bare model, and training closes a clear part of that gap.
    assert!(first.teacher_loss < first.bare_loss);
    assert!(
        last.loss < first.loss - 0.1 * (first.loss - first.teacher_loss).abs().max(0.1),
        "held-out loss {} -> {}",
        first.loss,
        last.loss
    );
    assert!(last.gap_closed > first.gap_closed);
    let train_first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let train_last: f64 = losses[26..].iter().sum::<f64>() / 4.0;
    assert!(train_last < train_first, "{train_first} -> {train_last}");

    // Frozen slot 0 is byte-identical to the initial cartridge (the default initialisation); the
    // trainable slots moved.
    let (model, fp) = tiny_model(11, "model-a");
    let init =
        cartridge_compiler::init::init_kv(&model, 8, cfg().init, Some(&corpus()), cfg().seed)
            .unwrap();
    let trained = load_cartridge(&out, &fp, &Device::Cpu).expect("the .cart loads and verifies");
    assert_eq!(trained.len(), 8);
    for ((tk, tv), (ik, iv)) in trained.layers().iter().zip(init.layers()) {
        for (t, i) in [(tk, ik), (tv, iv)] {
            let a: Vec<f32> = t
                .narrow(1, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = i
                .narrow(1, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "a frozen slot changed");
            let a: Vec<f32> = t
                .narrow(1, 1, 7)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = i
                .narrow(1, 1, 7)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_ne!(a, b, "trainable slots did not move");
        }
    }
    let metrics = std::fs::read_to_string(&s.metrics).unwrap();
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"step\"")).count(),
        30 + 4
    );
    assert!(
        !dir.path().join("toy.ckpt").exists(),
        "checkpoint left behind"
    );
    let png = std::fs::read(s.plot.expect("a plot")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    if let Ok(keep) = std::env::var("KEEP_PLOT") {
        std::fs::write(keep, &png).unwrap();
    }
}

#[test]
fn cart_is_refused_by_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("toy.cart");
    let c = TrainConfig {
        max_steps: Some(2),
        eval_every: 0,
        ..cfg()
    };
    run(&c, &out, &opts());
    let (_, other) = tiny_model(12, "model-b");
    assert!(load_cartridge(&out, &other, &Device::Cpu).is_err());
}

#[test]
fn a_run_killed_before_its_first_checkpoint_resumes_without_computing_its_start() {
    let (model, _) = tiny_model(11, "model-a");
    let layers = model.config().num_layers;
    let kv = TrainConfig {
        init: InitKind::SelectedFitted,
        max_steps: Some(5),
        checkpoint_every: 50,
        eval_every: 0,
        ..cfg()
    };
    let events = killed_after_its_start_and_resumed(&kv);
    // The start reports its parts as it goes, each first with 0 done, before training starts.
    let init: Vec<_> = events
        .iter()
        .take_while(|p| !matches!(p, Progress::Started { .. }))
        .filter_map(|p| match p {
            Progress::Init(i) => Some((i.stage, i.done, i.total)),
            _ => None,
        })
        .collect();
    assert_eq!(init.first(), Some(&(InitStage::SelectKeys, 0, layers)));
    assert!(init.contains(&(InitStage::SelectKeys, layers, layers)));
    assert!(init.contains(&(InitStage::FitValues, 0, 1)));
    assert_eq!(init.last(), Some(&(InitStage::FitValues, 1, 1)));
    // A soft prompt from the corpus's first tokens' embeddings.
    let soft = TrainConfig {
        artifact: ArtifactKind::SoftPrompt,
        init: InitKind::CorpusText,
        tokens: 4,
        ..kv
    };
    killed_after_its_start_and_resumed(&soft);
}

/// Runs `c` whole; then again, "killed" right after the checkpoint of its start (that checkpoint
/// put back, the output absent) and resumed without the corpus ids, from which the start could
/// not be computed again: the two outputs must be the same bytes. Returns the whole run's events.
fn killed_after_its_start_and_resumed(c: &TrainConfig) -> Vec<Progress> {
    let dir = tempfile::tempdir().unwrap();
    let (model, fp) = tiny_model(11, "model-a");
    let data = toy_data(&model, 16, 8);
    let model_ref = cartridge_compiler::ModelRef {
        transformer: &model,
        fingerprint: &fp,
    };
    let run = |out: &std::path::Path, opts: &RunOptions, corpus_ids: Option<&[u32]>| {
        let mut events = Vec::new();
        let s = train(c, model_ref, &data, corpus_ids, out, opts, &mut |p| {
            events.push(p.clone());
            // What a kill right after the first checkpoint would leave: keep a copy of it.
            if *p == (Progress::Checkpoint { step: 0 }) {
                std::fs::copy(out.with_extension("ckpt"), out.with_extension("step0")).unwrap();
            }
        })
        .expect("training runs");
        (s, events)
    };
    let corpus = corpus();
    let whole = dir.path().join("whole.cart");
    let (s, events) = run(&whole, &opts(), Some(&corpus));
    assert!(s.finished);
    assert!(events.contains(&Progress::Checkpoint { step: 0 }));
    let parts = dir.path().join("parts.cart");
    std::fs::copy(whole.with_extension("step0"), parts.with_extension("ckpt")).unwrap();
    let resume = RunOptions {
        resume: true,
        ..opts()
    };
    let (s2, events2) = run(&parts, &resume, None);
    assert!(s2.finished);
    assert!(!events2.iter().any(|p| matches!(p, Progress::Init(_))));
    assert_eq!(
        std::fs::read(&whole).unwrap(),
        std::fs::read(&parts).unwrap(),
        "the resumed .cart differs from the uninterrupted one"
    );
    events
}

#[test]
fn resumed_run_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        max_steps: Some(7),
        checkpoint_every: 2,
        eval_every: 3,
        schedule: cartridge_compiler::Schedule::WarmupCosine {
            warmup_steps: 2,
            min_ratio: 0.1,
        },
        ..cfg()
    };
    let whole = dir.path().join("whole.cart");
    let (s, _) = run(&c, &whole, &opts());
    assert!(s.finished);

    let parts = dir.path().join("parts.cart");
    let stop = RunOptions {
        stop_after: Some(3),
        ..opts()
    };
    let (s1, l1) = run(&c, &parts, &stop);
    assert!(!s1.finished && !parts.exists());
    assert_eq!((s1.steps, l1.len()), (3, 3));
    assert!(dir.path().join("parts.ckpt").is_file());
    // The creation time comes from the checkpoint, not from this invocation.
    let resume = RunOptions {
        resume: true,
        created: Some("2030-12-31T00:00:00Z".into()),
        ..opts()
    };
    let (s2, l2) = run(&c, &parts, &resume);
    assert!(s2.finished);
    assert_eq!(l2.len(), 4);
    assert_eq!(
        std::fs::read(&whole).unwrap(),
        std::fs::read(&parts).unwrap(),
        "resumed .cart differs from the uninterrupted one"
    );
    // The metrics file reads like an uninterrupted run's, timings aside.
    let steps = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("seconds");
                v.to_string()
            })
            .collect()
    };
    assert_eq!(steps(&s.metrics), steps(&s2.metrics));

    // A checkpoint from other settings is refused.
    run(&c, &parts, &stop);
    let other = TrainConfig { lr: 1e-2, ..c };
    let (model, fp) = tiny_model(11, "model-a");
    let data = toy_data(&model, 16, 8);
    let err = train(
        &other,
        cartridge_compiler::ModelRef {
            transformer: &model,
            fingerprint: &fp,
        },
        &data,
        Some(&corpus()),
        &parts,
        &resume,
        &mut |_| {},
    )
    .expect_err("settings differ");
    assert!(err.to_string().contains("other training settings"), "{err}");
}

/// `run`, returning the error.
fn run_err(cfg: &TrainConfig, out: &std::path::Path, opts: &RunOptions) -> String {
    let (model, fp) = tiny_model(11, "model-a");
    let data = toy_data(&model, 16, 8);
    let model_ref = cartridge_compiler::ModelRef {
        transformer: &model,
        fingerprint: &fp,
    };
    train(
        cfg,
        model_ref,
        &data,
        Some(&corpus()),
        out,
        opts,
        &mut |_| {},
    )
    .expect_err("the run is refused")
    .to_string()
}

#[test]
fn a_second_run_into_the_same_output_is_refused_while_the_first_holds_it() {
    use cartridge_formats::lock::{try_lock, Acquired};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs/busy.cart");
    let c = TrainConfig {
        max_steps: Some(2),
        ..cfg()
    };
    // The output's folder is made by training itself; stand in for a first run holding the lock.
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let Acquired::Held(first) = try_lock(&dir.path().join("runs/busy.lock"), true).unwrap() else {
        panic!("the stand-in takes the lock")
    };
    let err = run_err(&c, &out, &opts());
    assert!(
        err.contains("another process") && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(!out.exists() && !dir.path().join("runs/busy.ckpt").exists());
    drop(first);

    // Once it is gone, a run goes ahead in a folder it creates and leaves no lock file behind.
    let fresh = dir.path().join("new/folder/ok.cart");
    let (s, _) = run(&c, &fresh, &opts());
    assert!(s.finished && fresh.is_file());
    assert!(!dir.path().join("new/folder/ok.lock").exists());
    let (s, _) = run(&c, &out, &opts());
    assert!(s.finished && !dir.path().join("runs/busy.lock").exists());
}

#[test]
fn given_start_continues_a_trained_cartridge() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.cart");
    let c = TrainConfig {
        max_steps: Some(5),
        eval_every: 0,
        ..cfg()
    };
    let (s, _) = run(&c, &first, &opts());
    let trained = s.final_eval.expect("final eval").loss;
    let (_, fp) = tiny_model(11, "model-a");
    let kv = load_cartridge(&first, &fp, &Device::Cpu).unwrap();
    let given = |kv: cartridge_runtime::PrefixKv| RunOptions {
        initial: Some(InitialParams::Kv(kv)),
        ..opts()
    };
    let continued = TrainConfig {
        init: InitKind::Given,
        ..c.clone()
    };

    // No steps: the given cartridge is evaluated and written back unchanged.
    let same = dir.path().join("same.cart");
    let untrained = TrainConfig {
        max_steps: Some(0),
        ..continued.clone()
    };
    let (s0, _) = run(&untrained, &same, &given(kv.clone()));
    assert_eq!(s0.first_eval.expect("eval").loss, trained);
    let back = load_cartridge(&same, &fp, &Device::Cpu).unwrap();
    for ((a, b), (c, d)) in back.layers().iter().zip(kv.layers()) {
        for (x, y) in [(a, c), (b, d)] {
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(x, y);
        }
    }

    // Five more steps go on from there.
    let (s5, _) = run(
        &continued,
        &dir.path().join("more.cart"),
        &given(kv.clone()),
    );
    assert!(
        s5.final_eval.unwrap().loss < trained,
        "continuing did not lower the held-out loss below {trained}"
    );

    // Refused: a given kind without a start, a start under another kind, a start of another
    // size or kind.
    let out = dir.path().join("refused.cart");
    assert!(run_err(&continued, &out, &opts()).contains("no start"));
    assert!(run_err(&c, &out, &given(kv.clone())).contains("init is"));
    let smaller = TrainConfig {
        tokens: 6,
        ..continued.clone()
    };
    assert!(run_err(&smaller, &out, &given(kv.clone())).contains("has 8 slots, the run 6"));
    let soft = RunOptions {
        initial: Some(InitialParams::SoftPrompt(
            Tensor::zeros((8, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )),
        ..opts()
    };
    assert!(run_err(&continued, &out, &soft).contains("is a soft prompt"));
}

#[test]
fn soft_prompt_trains_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("soft.cart");
    let c = TrainConfig {
        artifact: ArtifactKind::SoftPrompt,
        tokens: 4,
        lr: 5e-2,
        max_steps: Some(20),
        eval_every: 0,
        ..cfg()
    };
    let (s, _) = run(&c, &out, &opts());
    let (first, last) = (s.first_eval.unwrap(), s.final_eval.unwrap());
    assert!(last.loss < first.loss, "{} -> {}", first.loss, last.loss);
    let (_, fp) = tiny_model(11, "model-a");
    let sp = load_soft_prompt(&out, &fp, &Device::Cpu).expect("loads");
    assert_eq!(sp.embeddings.dims(), &[4, 32]);
}

#[test]
fn tokens_objective_trains() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tok.cart");
    let c = TrainConfig {
        objective: Objective::Tokens,
        max_steps: Some(15),
        eval_every: 0,
        ..cfg()
    };
    let (s, _) = run(&c, &out, &opts());
    let (first, last) = (s.first_eval.unwrap(), s.final_eval.unwrap());
    assert!(last.loss < first.loss, "{} -> {}", first.loss, last.loss);
}

/// The gathered-rows loss equals `-sum_k exp(t_k) log_softmax(all logits)[id_k]` computed the
/// plain way, and its gradient reaches the prefix.
#[test]
fn loss_matches_the_full_vocabulary_formula() {
    let (model, _) = tiny_model(11, "model-a");
    let data = toy_data(&model, 3, 5);
    let exs: Vec<Example> = data
        .records
        .iter()
        .map(|r| {
            Example::from_record(r, 1024, common::VOCAB)
                .unwrap()
                .unwrap()
        })
        .collect();
    let refs: Vec<&Example> = exs.iter().collect();
    let batch = Batch::new(&refs, Objective::Distill, &Device::Cpu).unwrap();
    let prefix = model.prefix_kv(None, &corpus()[..6]).unwrap();
    let ours = loss_sum(&model, Some(&prefix), &batch, Path::Train)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let mut want = 0f64;
    for e in &exs {
        let ids = Tensor::from_vec(e.tokens.clone(), (1, e.tokens.len()), &Device::Cpu).unwrap();
        let logits = model
            .forward(Some(&prefix), None, &ids, Logits::All, Path::Train)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let lsm: Vec<Vec<f32>> = ops::log_softmax_last_dim(&logits)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (r, &row) in e.rows.iter().enumerate() {
            for j in 0..e.k {
                let id = e.topk_ids[r * e.k + j] as usize;
                let w = f64::from(e.topk_logprobs[r * e.k + j]).exp();
                want -= w * f64::from(lsm[row as usize][id]);
            }
        }
    }
    assert!(
        (ours - want).abs() < 1e-4 * want.abs(),
        "gathered {ours} vs full {want}"
    );
}

/// Gradient accumulation: a step split into micro-batches of 1 trains the same cartridge (up to
/// summation order) as one forward over the whole batch, since the loss is averaged over the
/// step's targets, not per micro-batch.
#[test]
fn micro_batches_accumulate_to_the_full_batch() {
    let dir = tempfile::tempdir().unwrap();
    let base = TrainConfig {
        max_steps: Some(4),
        eval_every: 0,
        ..cfg()
    };
    let read = |name: &str, micro: usize| {
        let out = dir.path().join(name);
        let c = TrainConfig {
            micro_batch: micro,
            ..base.clone()
        };
        let (s, losses) = run(&c, &out, &opts());
        let (_, fp) = tiny_model(11, "model-a");
        let kv = load_cartridge(&out, &fp, &Device::Cpu).unwrap();
        let v: Vec<f32> = kv
            .layers()
            .iter()
            .flat_map(|(k, v)| {
                let mut a: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
                a.extend(v.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                a
            })
            .collect();
        (s, losses, v)
    };
    let (_, la, a) = read("full.cart", 4);
    let (_, lb, b) = read("micro.cart", 1);
    for (x, y) in la.iter().zip(&lb) {
        assert!(
            (x - y).abs() < 1e-4 * x.abs(),
            "step losses {la:?} vs {lb:?}"
        );
    }
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-3, "cartridges differ by {max}");
}

/// A soft prompt trained with a summary in front of every conversation: the summary changes what
/// the student sees (not the bare baseline), goes into the `.cart`, and is refused for KV
/// cartridges.
#[test]
fn soft_prompt_with_summary_trains_and_carries_it() {
    use cartridge_compiler::PromptSummary;
    let dir = tempfile::tempdir().unwrap();
    let (model, fp) = tiny_model(11, "model-a");
    let mut data = toy_data(&model, 16, 8);
    let c = TrainConfig {
        artifact: ArtifactKind::SoftPrompt,
        tokens: 4,
        lr: 5e-2,
        max_steps: Some(10),
        eval_every: 0,
        ..cfg()
    };
    let model_ref = cartridge_compiler::ModelRef {
        transformer: &model,
        fingerprint: &fp,
    };
    let plain_out = dir.path().join("plain.cart");
    let plain = train(
        &c,
        model_ref,
        &data,
        Some(&corpus()),
        &plain_out,
        &opts(),
        &mut |_| {},
    )
    .expect("trains");
    data.summary = Some(PromptSummary {
        text: "A short summary.".into(),
        ids: corpus()[..6].to_vec(),
    });
    let out = dir.path().join("summary.cart");
    let with = train(
        &c,
        model_ref,
        &data,
        Some(&corpus()),
        &out,
        &opts(),
        &mut |_| {},
    )
    .expect("trains");
    let (p0, w0) = (plain.first_eval.unwrap(), with.first_eval.unwrap());
    assert_eq!(
        p0.bare_loss, w0.bare_loss,
        "the bare baseline has no summary"
    );
    assert!(
        (p0.loss - w0.loss).abs() > 1e-6,
        "the summary changes the student's input"
    );
    let (w0, w1) = (w0, with.final_eval.unwrap());
    assert!(w1.loss < w0.loss, "{} -> {}", w0.loss, w1.loss);
    let sp = load_soft_prompt(&out, &fp, &Device::Cpu).expect("loads");
    assert_eq!(sp.summary.as_deref(), Some("A short summary."));
    let kv = TrainConfig {
        artifact: ArtifactKind::Kv,
        ..c
    };
    let err = train(
        &kv,
        model_ref,
        &data,
        Some(&corpus()),
        &dir.path().join("kv.cart"),
        &opts(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("soft prompt"), "{err}");
}
