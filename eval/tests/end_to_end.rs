//! Evaluation on a tiny random chat model, end to end: self-study writes a dataset about a small
//! corpus, then every mode is evaluated on questions and on the dataset's conversations, and the
//! numbers must agree with each other where they are the same computation by construction.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use cartridge_eval::corpus_context::system_ids;
use cartridge_eval::kl::{select_examples, Selection};
use cartridge_eval::{
    data_digest, evaluate, qa, reuse, CorpusContext, EvalData, EvalModel, EvalOptions, Mode,
    ModeKind, ModeReport, Report,
};
use cartridge_formats::dataset::{Dataset, ReadOptions};
use cartridge_runtime::loader::{self, LoadedModel};
use cartridge_selfstudy::corpus::{ingest, IngestOptions};
use cartridge_selfstudy::local::{stop_tokens, LocalBackend};
use cartridge_selfstudy::{synthesize, Corpus, SynthesisConfig};

const DESCRIPTION: &str = "a small gardening notebook";

const QUESTIONS: &str = r#"{"question": "How many hours of sun do tomatoes need?", "answer": "six hours"}
{"question": "What grows well next to tomatoes?", "answer": "Basil"}
{"question": "What happens on Friday?", "answer": "harvest beans and peas"}
{"question": "When are the roses pruned?", "options": ["Monday", "Wednesday", "Friday"], "answer_index": 0}
"#;

fn corpus(root: &Path) -> Corpus {
    std::fs::create_dir_all(root.join("notes")).expect("mkdir");
    std::fs::write(
        root.join("guide.md"),
        "# Garden guide\nTomatoes need six hours of sun. Water them at the base, never the \
         leaves. Basil grows well next to tomatoes and keeps some pests away.\n",
    )
    .expect("write");
    std::fs::write(
        root.join("notes/schedule.txt"),
        "Monday: prune the roses. Wednesday: compost. Friday: harvest beans and peas.\n",
    )
    .expect("write");
    ingest(root, &IngestOptions::default()).expect("ingest")
}

fn load(dir: &Path) -> LoadedModel {
    loader::load_hf_dir(dir, &Device::Cpu).expect("load tiny model")
}

/// Self-study with chunks longer than the corpus: every conversation's teacher saw the whole
/// corpus, so in-context learning with the whole corpus is the teacher.
fn synthesise(model_dir: &Path, corpus: &Corpus, out: &Path) {
    let mut backend = LocalBackend::new(load(model_dir)).expect("backend");
    let config = SynthesisConfig {
        num_conversations: 6,
        batch: 3,
        chunk_min_tokens: 600,
        chunk_max_tokens: 600,
        description: Some(DESCRIPTION.into()),
        max_user_tokens: 10,
        max_answer_tokens: 10,
        top_k: 5,
        seed: 3,
        ..SynthesisConfig::default()
    };
    synthesize(&config, &mut backend, corpus, out, false, |_| {}).expect("synthesize");
}

fn mode<'a>(report: &'a Report, name: &str) -> &'a ModeReport {
    report
        .modes
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("no mode {name}"))
}

#[test]
fn modes_agree_where_they_are_the_same_computation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model_dir = tmp.path().join("model");
    std::fs::create_dir_all(&model_dir).expect("mkdir");
    common::write_tiny_chat_model(&model_dir, 7);
    let corpus = corpus(&tmp.path().join("corpus"));
    let data_dir = tmp.path().join("data");
    synthesise(&model_dir, &corpus, &data_dir);

    let loaded = load(&model_dir);
    let net = loaded.transformer().expect("transformer");
    let template = loaded.chat_template.as_ref().expect("template");
    let model = EvalModel {
        transformer: &net,
        tokenizer: &loaded.tokenizer,
        template,
    };
    let items = qa::parse_qa(QUESTIONS, Path::new("questions.jsonl")).expect("questions");
    let ds = Dataset::open(&data_dir, ReadOptions::default()).expect("dataset");
    let conversations =
        select_examples(&ds, loaded.config.vocab_size, Selection::All, 1024).expect("examples");
    assert_eq!(conversations.len(), 6);

    let ctx =
        CorpusContext::new(&corpus, &loaded.tokenizer, Some(DESCRIPTION.into())).expect("context");
    let full = ctx
        .system_message(ctx.tokens(), &loaded.tokenizer)
        .expect("system");
    let budget = 200;
    let (cut, kept) = ctx
        .truncated(budget, &loaded.tokenizer, template)
        .expect("truncate")
        .expect("something fits");
    let cut_ids = system_ids(template, &loaded.tokenizer, &cut).expect("ids");
    assert!(
        cut_ids.len() <= budget && cut_ids.len() > budget - 8,
        "{}",
        cut_ids.len()
    );
    assert!(kept > 0 && kept < ctx.tokens());
    // A cartridge made of the truncated corpus's own K/V: the same prefix as `icl@200`.
    let kv_of_cut = net.prefix_kv(None, &cut_ids).expect("kv");
    let soft =
        Tensor::randn(0f32, 1.0, (3, loaded.config.hidden_size), &Device::Cpu).expect("soft");

    let modes = vec![
        Mode::bare(),
        Mode::icl("icl", ModeKind::Icl, full.clone()),
        Mode::icl("icl@200", ModeKind::IclTruncated, cut),
        Mode::cartridges("no cartridges", Vec::new()),
        Mode::cartridges("kv of icl@200", vec![kv_of_cut]),
        Mode::soft_prompt("soft", soft.clone(), None),
        Mode::soft_prompt("soft+summary", soft, Some("Notes about a garden.".into())),
    ];
    let data = EvalData {
        qa: items,
        conversations,
    };
    let options = EvalOptions {
        batch: 3,
        micro_batch: 2,
        generate: Some(6),
        stop_tokens: stop_tokens(&loaded.tokenizer),
    };
    let report = evaluate(model, "tiny", &modes, &data, &options, |_| {}).expect("evaluate");
    assert_eq!((report.qa_items, report.conversations), (4, 6));

    let icl = mode(&report, "icl");
    let bare = mode(&report, "bare");
    // ICL with the whole corpus is the teacher: its KL to the recorded top-k is zero up to float
    // rounding; the bare model is measurably different.
    let icl_kl = icl.kl.expect("kl");
    assert!(icl_kl.abs() < 1e-4, "ICL's KL to the teacher is {icl_kl}");
    assert!(bare.kl.expect("kl") > 1e-3, "bare KL {:?}", bare.kl);
    assert_eq!(
        icl.prefix_tokens,
        system_ids(template, &loaded.tokenizer, &full)
            .expect("ids")
            .len()
    );
    // KV bytes: tokens x 2 layers x (K, V) x 2 KV heads x head_dim 8 x 4 bytes.
    assert_eq!(icl.kv_bytes, icl.prefix_tokens as u64 * 2 * 2 * 2 * 8 * 4);
    assert_eq!((bare.prefix_tokens, bare.kv_bytes), (0, 0));

    // An empty cartridge list is the bare model.
    let empty = mode(&report, "no cartridges");
    assert_eq!(empty.qa, bare.qa);
    assert_eq!(empty.kl, bare.kl);
    assert_eq!(empty.items, bare.items);
    assert_eq!((empty.prefix_tokens, empty.kv_bytes), (0, 0));

    // Gap closed: 1 for ICL, 0 for bare, by definition; the KL gap the same way.
    assert!((icl.gap_closed.expect("gap") - 1.0).abs() < 1e-12);
    assert!(bare
        .gap_closed
        .is_some_and(|g| g == 0.0 && g.is_sign_positive()));
    assert!((icl.kl_gap_closed.expect("kl gap") - 1.0).abs() < 1e-12);
    assert_eq!(bare.kl_gap_closed, Some(0.0));
    // Capped per question at the better of bare and ICL: the same two fixed points, and a
    // capped log-likelihood is never above the plain one, so it moves the figure towards bare.
    assert!((icl.gap_closed_capped.expect("capped") - 1.0).abs() < 1e-12);
    assert_eq!(bare.gap_closed_capped, Some(0.0));
    let icl_ahead = icl.qa.expect("qa").answer_logprob > bare.qa.expect("qa").answer_logprob;
    for m in report.modes.iter().filter(|m| m.skipped.is_none()) {
        let (plain, capped) = (
            m.gap_closed.expect("gap"),
            m.gap_closed_capped.expect("capped"),
        );
        let towards_bare = if icl_ahead {
            capped - plain
        } else {
            plain - capped
        };
        assert!(
            towards_bare <= 1e-12,
            "{}: capped {capped}, plain {plain}",
            m.name
        );
    }

    // The cartridge made of the truncated corpus's K/V scores like the truncated corpus.
    let cut_mode = mode(&report, "icl@200");
    let kv_mode = mode(&report, "kv of icl@200");
    assert_eq!(kv_mode.prefix_tokens, cut_mode.prefix_tokens);
    let (a, b) = (
        cut_mode.qa.expect("qa").answer_logprob,
        kv_mode.qa.expect("qa").answer_logprob,
    );
    assert!((a - b).abs() < 1e-4, "answer log-likelihood {a} vs {b}");
    let (a, b) = (cut_mode.kl.expect("kl"), kv_mode.kl.expect("kl"));
    assert!((a - b).abs() < 1e-4, "KL {a} vs {b}");
    let g = cut_mode.gap_closed.expect("gap");
    assert!((g - kv_mode.gap_closed.expect("gap")).abs() < 1e-3);

    // Soft prompt with a summary: a longer prefix than without, and a different result.
    let (soft, summary) = (mode(&report, "soft"), mode(&report, "soft+summary"));
    assert_eq!(soft.prefix_tokens, 3);
    assert!(summary.prefix_tokens > 3);
    assert_ne!(soft.qa, summary.qa);

    for m in &report.modes {
        assert!(m.skipped.is_none(), "{} skipped: {:?}", m.name, m.skipped);
        let q = m.qa.expect("qa");
        assert!(q.answer_logprob < 0.0 && q.answer_logprob.is_finite());
        assert!((q.perplexity - (-q.answer_logprob).exp()).abs() < 1e-9);
        assert_eq!(q.mc_items, 1);
        assert!(q.mc_accuracy.is_some());
        let g = q.generated.expect("generated");
        assert!((0.0..=100.0).contains(&g.chrf));
        assert_eq!(m.items.len(), 4);
        assert!(m.items.iter().all(|i| i.generated.is_some()));
        assert!(m.time_to_first_token_s.expect("ttft") > 0.0);

        // The contains figures count the same answers the items show, with an interval around
        // the share, and every mode but ICL is compared with ICL's answers question by question.
        let hits = m
            .items
            .iter()
            .filter(|i| i.generated.as_ref().is_some_and(|g| g.contains))
            .count();
        assert_eq!((g.answers, g.contains_hits), (4, hits));
        let (lo, hi) = g.contains_interval;
        assert!(lo <= g.contains_match && g.contains_match <= hi && lo < hi);
        if m.kind == ModeKind::Icl {
            assert!(m.contains_vs_icl.is_none());
        } else {
            let c = m.contains_vs_icl.expect("compared with ICL");
            let icl_hits = icl.qa.and_then(|q| q.generated).expect("ICL generated");
            assert_eq!(c.questions, 4);
            assert_eq!(c.both + c.only_this, hits, "{}", m.name);
            assert_eq!(c.both + c.only_other, icl_hits.contains_hits, "{}", m.name);
            assert!((0.0..=1.0).contains(&c.p_value));
        }
    }

    // Reuse: the report read back from its JSON stands in for measuring the reference modes
    // again; a run of the other modes that adopts them reads like the run that measured all.
    let mut report = report;
    report.icl_context = Some(reuse::icl_context_digest(&full));
    let path = tmp.path().join("earlier.json");
    std::fs::write(&path, serde_json::to_string(&report).expect("json")).expect("write");
    let earlier = reuse::read_report(&path).expect("read back");
    let digest = data_digest(&data, &options);
    assert_eq!(earlier.data_digest, digest);
    let context = report.icl_context.as_deref();
    let taken = reuse::reusable_modes(&earlier, &path, "tiny", &digest, context).expect("reuse");
    let names = |ms: &[ModeReport]| ms.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&taken), ["bare", "icl", "icl@200"]);
    let rest: Vec<Mode> = modes
        .iter()
        .filter(|m| !taken.iter().any(|t| t.name == m.name))
        .cloned()
        .collect();
    let mut again = evaluate(model, "tiny", &rest, &data, &options, |_| {}).expect("evaluate");
    again.icl_context = report.icl_context.clone();
    again.adopt(taken, "earlier.json", earlier.icl_context.clone());
    assert_eq!(names(&again.modes), names(&report.modes));
    assert!(again
        .notes
        .iter()
        .any(|n| n.contains("taken from earlier.json")));
    for (a, b) in again.modes.iter().zip(&report.modes) {
        assert_eq!(
            a.reused_from.is_some(),
            reuse::is_reference(a.kind),
            "{}",
            a.name
        );
        assert_eq!(a.items.len(), b.items.len());
        let close = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) => (x - y).abs() < 1e-9,
            (x, y) => x.is_none() && y.is_none(),
        };
        assert!(close(a.gap_closed, b.gap_closed), "{}", a.name);
        assert!(
            close(a.gap_closed_capped, b.gap_closed_capped),
            "{}",
            a.name
        );
        assert!(close(a.kl_gap_closed, b.kl_gap_closed), "{}", a.name);
        let counts = |m: &ModeReport| {
            m.contains_vs_icl
                .map(|c| (c.questions, c.both, c.only_this, c.only_other))
        };
        assert_eq!(counts(a), counts(b), "{}", a.name);
    }

    // Refused: another model, other data or generation settings, another corpus in the ICL
    // prompt, a report from before digests, and a file that is no report.
    let refusal = |r: &Report, model: &str, digest: &str, context: Option<&str>| {
        reuse::reusable_modes(r, &path, model, digest, context)
            .expect_err("refused")
            .to_string()
    };
    assert!(refusal(&earlier, "other", &digest, context).contains("this run uses other"));
    let shorter = EvalOptions {
        generate: Some(5),
        ..options.clone()
    };
    let other_digest = data_digest(&data, &shorter);
    assert_ne!(other_digest, digest);
    assert!(refusal(&earlier, "tiny", &other_digest, context).contains("other questions"));
    let other_context = reuse::icl_context_digest("another corpus");
    assert!(refusal(&earlier, "tiny", &digest, Some(&other_context)).contains("another corpus"));
    let old = Report {
        data_digest: String::new(),
        ..earlier.clone()
    };
    assert!(refusal(&old, "tiny", &digest, context).contains("data digest"));
    std::fs::write(&path, "{\"modes\": 3}").expect("write");
    let err = reuse::read_report(&path).expect_err("not a report");
    assert!(err.to_string().contains("not a report"), "{err}");
}

#[test]
fn a_mode_past_the_window_is_skipped_not_failed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    common::write_tiny_chat_model(tmp.path(), 1);
    let loaded = load(tmp.path());
    let net = loaded.transformer().expect("transformer");
    let template = loaded.chat_template.as_ref().expect("template");
    let model = EvalModel {
        transformer: &net,
        tokenizer: &loaded.tokenizer,
        template,
    };
    // 2,000 one-byte tokens: more than the tiny model's 1,024 positions.
    let huge = Mode::icl("icl", ModeKind::Icl, "x".repeat(2000));
    let data = EvalData {
        qa: qa::parse_qa(QUESTIONS, Path::new("q.jsonl")).expect("questions"),
        conversations: Vec::new(),
    };
    let report = evaluate(
        model,
        "tiny",
        &[Mode::bare(), huge],
        &data,
        &EvalOptions::default(),
        |_| {},
    )
    .expect("evaluate");
    let icl = mode(&report, "icl");
    assert!(icl.skipped.as_deref().is_some_and(|s| s.contains("window")));
    let nothing = evaluate(
        model,
        "tiny",
        &[Mode::bare()],
        &EvalData::default(),
        &EvalOptions::default(),
        |_| {},
    );
    assert!(nothing.is_err_and(|e| e.to_string().contains("nothing to evaluate")));
    assert!(icl.qa.is_none() && icl.gap_closed.is_none());
    // Without an evaluated ICL mode there is no gap to close.
    assert!(mode(&report, "bare").gap_closed.is_none());
}
