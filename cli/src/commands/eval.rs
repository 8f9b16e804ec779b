//! `cartridge eval --data QA.jsonl|DIR`: the bare model, the corpus in context (whole, and cut to
//! the cartridges' size), the cartridges (composed) and a soft prompt, side by side: answer
//! log-likelihood, multiple-choice accuracy, KL to the self-study teacher, generated-answer match,
//! KV memory and time to first token. A table, `--json`, and `--plot F.png` (quality vs KV memory).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use cartridge_compiler::plot::{write_scatter, Scatter, ScatterPoint};
use cartridge_compiler::TrainConfig;
use cartridge_eval::kl::{select_examples, Selection};
use cartridge_eval::mode::ModeKind;
use cartridge_eval::{
    corpus_context, data_digest, evaluate, qa, reuse, CorpusContext, EvalData, EvalModel,
    EvalOptions, Mode, Report,
};
use cartridge_formats::dataset::{Dataset, ReadOptions};
use cartridge_runtime::cartridge_file::{load_cartridge, load_soft_prompt};
use cartridge_runtime::{Composition, PrefixKv};
use cartridge_selfstudy::corpus;
use cartridge_selfstudy::local::stop_tokens;
use serde_json::json;

use super::synthesize::CorpusArgs;
use crate::output::human_bytes;
use crate::session::{ComposeArg, ModelArgs};

/// Options of `cartridge eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A question file (JSON lines of {question, answer} or {question, options, answer_index}) or
    /// a dataset folder from `cartridge synthesize` (held-out conversations for the KL to the
    /// teacher); repeat to give one of each.
    #[arg(long, value_name = "QA.jsonl|DIR", required = true)]
    data: Vec<PathBuf>,
    /// The corpus (a file or a folder): adds the in-context modes (whole corpus, and its first
    /// tokens cut to the cartridges' size).
    #[arg(long, value_name = "PATH")]
    corpus: Option<PathBuf>,
    #[command(flatten)]
    corpus_args: CorpusArgs,
    /// The one-line corpus description self-study was given [default: the dataset manifest's].
    #[arg(long)]
    description: Option<String>,
    /// Tokens of the truncated in-context mode [default: the cartridges' total length].
    #[arg(long, value_name = "N")]
    icl_budget: Option<usize>,
    /// A KV cartridge; repeat to compose several (in the order given) into one mode.
    #[arg(long = "cartridge", value_name = "FILE.cart")]
    cartridges: Vec<PathBuf>,
    /// A soft prompt, evaluated as its own mode (and with its summary text, if it has one).
    #[arg(long, value_name = "FILE.cart")]
    soft_prompt: Option<PathBuf>,
    /// How several cartridges share positions; repeat to evaluate each way as its own mode.
    #[arg(long, value_enum, default_values_t = [ComposeArg::Overlap])]
    compose: Vec<ComposeArg>,
    /// With several cartridges, also evaluate each one alone.
    #[arg(long)]
    each: bool,
    #[command(flatten)]
    model: ModelArgs,
    /// Also generate greedy answers and score them (exact match, contains-match, chrF).
    #[arg(long)]
    generate: bool,
    /// Longest generated answer, in tokens.
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// Only the first N questions.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Sequences per forward when scoring answers.
    #[arg(long, default_value_t = EvalOptions::default().batch)]
    batch: usize,
    /// Use every conversation of the dataset folder (one synthesised for evaluation), not the
    /// trainer's held-out split.
    #[arg(long)]
    all_conversations: bool,
    /// Conversations in the trainer's held-out split (its --eval-conversations).
    #[arg(long, default_value_t = TrainConfig::default().eval_conversations)]
    held_out: usize,
    /// Seed of the trainer's split (its --train-seed).
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    split_seed: u64,
    /// Tokens kept per conversation (the trainer's --max-seq-len).
    #[arg(long, default_value_t = TrainConfig::default().max_seq_len)]
    max_seq_len: usize,
    /// Print the report as one JSON object (progress as JSON lines on stderr).
    #[arg(long)]
    json: bool,
    /// An earlier `--json` report of this evaluation: its bare and in-context modes are taken from
    /// it instead of being measured again (the in-context one is most of an evaluation's time on
    /// a CPU). Refused unless its model, questions, conversations, generation settings and, for
    /// the in-context modes, corpus and description are this run's. Repeatable.
    #[arg(long, value_name = "REPORT.json")]
    reuse: Vec<PathBuf>,
    /// Draw quality against KV memory per mode into this PNG.
    #[arg(long, value_name = "F.png")]
    plot: Option<PathBuf>,
}

/// A file's name without its extension, for mode names.
fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The question file and the dataset folder among `--data`.
fn split_data(data: &[PathBuf]) -> Result<(Option<&PathBuf>, Option<&PathBuf>)> {
    let (dirs, files): (Vec<&PathBuf>, Vec<&PathBuf>) = data.iter().partition(|p| p.is_dir());
    if files.len() > 1 || dirs.len() > 1 {
        bail!("--data takes at most one question file and one dataset folder");
    }
    Ok((files.first().copied(), dirs.first().copied()))
}

/// Run the subcommand.
pub fn run(args: Args) -> Result<ExitCode> {
    let (qa_path, dataset_dir) = split_data(&args.data)?;
    let mut questions = match qa_path {
        Some(p) => qa::read_qa(p)?,
        None => Vec::new(),
    };
    if let Some(n) = args.limit {
        questions.truncate(n);
    }
    let loaded = args.model.load()?;
    let transformer = args.model.transformer(&loaded)?;
    let template = loaded
        .chat_template
        .as_ref()
        .context("the model has no chat template; evaluation renders questions as chat")?;
    let model = EvalModel {
        transformer: &transformer,
        tokenizer: &loaded.tokenizer,
        template,
    };
    let mut notes = Vec::new();

    let mut description = args.description.clone();
    let mut conversations = Vec::new();
    let mut dataset_digest = None;
    if let Some(dir) = dataset_dir {
        let ds = Dataset::open(dir, ReadOptions::default())?;
        ds.manifest().check_teacher(&loaded.fingerprint)?;
        if description.is_none() {
            description = corpus_context::manifest_description(&ds.manifest().settings)?;
        }
        dataset_digest = Some(ds.manifest().corpus_digest.clone());
        let selection = if args.all_conversations {
            Selection::All
        } else {
            Selection::HeldOut {
                held_out: args.held_out,
                seed: args.split_seed,
                max_seq_len: args.max_seq_len,
            }
        };
        conversations =
            select_examples(&ds, loaded.config.vocab_size, selection, args.max_seq_len)?;
    }

    // Cartridges and soft prompts go where the model is.
    let device = loaded.device.clone();
    let cartridges: Vec<(String, PrefixKv)> = args
        .cartridges
        .iter()
        .map(|p| Ok((stem(p), load_cartridge(p, &loaded.fingerprint, &device)?)))
        .collect::<Result<_>>()?;
    let mut composes: Vec<ComposeArg> = Vec::new();
    for &c in &args.compose {
        if !composes.contains(&c) {
            composes.push(c);
        }
    }
    let cartridge_tokens =
        Composition::from(composes[0]).slots(cartridges.iter().map(|(_, c)| c.len()));

    let mut modes = vec![Mode::bare()];
    let mut corpus_tokens = None;
    let mut icl_context = None;
    if let Some(path) = &args.corpus {
        let corpus = corpus::ingest(path, &args.corpus_args.options())?;
        let ctx = CorpusContext::new(&corpus, &loaded.tokenizer, description.clone())?;
        if dataset_digest.as_deref().is_some_and(|d| d != ctx.digest()) {
            notes.push(format!(
                "{} is not the corpus the dataset was synthesised from (digests differ): the \
                 in-context modes are not the teacher",
                path.display()
            ));
        }
        corpus_tokens = Some(ctx.tokens());
        let system = ctx.system_message(ctx.tokens(), &loaded.tokenizer)?;
        icl_context = Some(reuse::icl_context_digest(&system));
        modes.push(Mode::icl("icl", ModeKind::Icl, system));
        let budget = args
            .icl_budget
            .or((cartridge_tokens > 0).then_some(cartridge_tokens));
        if let Some(budget) = budget {
            match ctx.truncated(budget, &loaded.tokenizer, template)? {
                Some((system, _)) => modes.push(Mode::icl(
                    format!("icl@{budget}"),
                    ModeKind::IclTruncated,
                    system,
                )),
                None => notes.push(format!(
                    "no corpus token fits a {budget}-token system message: no truncated ICL mode"
                )),
            }
        }
    }
    if args.each && cartridges.len() > 1 {
        for (name, c) in &cartridges {
            modes.push(Mode::cartridges(name.clone(), vec![c.clone()]));
        }
    }
    if !cartridges.is_empty() {
        let name = cartridges
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join("+");
        let parts: Vec<PrefixKv> = cartridges.into_iter().map(|(_, c)| c).collect();
        // One cartridge has nothing to compose: one mode, whatever `--compose` says.
        let several = parts.len() > 1;
        let ways = if several {
            &composes[..]
        } else {
            &composes[..1]
        };
        for &compose in ways {
            let label = match compose {
                ComposeArg::Follow if several => format!("{name} (follow)"),
                _ => name.clone(),
            };
            let mut mode = Mode::cartridges(label, parts.clone());
            mode.stack.composition = compose.into();
            modes.push(mode);
        }
    }
    if let Some(path) = &args.soft_prompt {
        let soft = load_soft_prompt(path, &loaded.fingerprint, &device)?;
        let name = stem(path);
        if let Some(summary) = soft.summary.clone() {
            modes.push(Mode::soft_prompt(
                format!("soft+summary:{name}"),
                soft.embeddings.clone(),
                Some(summary),
            ));
        }
        modes.push(Mode::soft_prompt(
            format!("soft:{name}"),
            soft.embeddings,
            None,
        ));
    }

    let options = EvalOptions {
        batch: args.batch,
        generate: args.generate.then_some(args.max_tokens),
        stop_tokens: stop_tokens(&loaded.tokenizer),
        ..EvalOptions::default()
    };
    let data = EvalData {
        qa: questions,
        conversations,
    };
    let fingerprint = loaded.fingerprint.short();
    let digest = data_digest(&data, &options);
    let mut earlier = Vec::new();
    for path in &args.reuse {
        let report = reuse::read_report(path)?;
        let taken =
            reuse::reusable_modes(&report, path, &fingerprint, &digest, icl_context.as_deref())?;
        // What is reused is not measured again (a cartridge file named `icl.cart` still is).
        modes.retain(|m| !taken.iter().any(|t| t.name == m.name && t.kind == m.kind));
        earlier.push((path.display().to_string(), taken, report.icl_context));
    }
    let json_progress = args.json;
    let mut report = evaluate(model, &fingerprint, &modes, &data, &options, |line| {
        if json_progress {
            eprintln!("{}", json!({ "event": "progress", "message": line }));
        } else {
            eprintln!("{line}");
        }
    })?;
    report.icl_context = icl_context;
    for (source, taken, context) in earlier {
        report.adopt(taken, &source, context);
    }
    report.notes.extend(notes);
    if let Some(png) = &args.plot {
        write_scatter(&plot_of(&report), png)
            .with_context(|| format!("writing {}", png.display()))?;
    }
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("corpus_tokens".into(), json!(corpus_tokens));
        }
        println!("{v}");
    } else {
        if let Some(n) = corpus_tokens {
            println!("corpus: {n} tokens");
        }
        print!("{}", table(&report));
        for note in &report.notes {
            println!("note: {note}");
        }
        if let Some(png) = &args.plot {
            println!("plot: {}", png.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Quality against KV memory: answer log-likelihood when there are questions, else the KL.
fn plot_of(report: &Report) -> Scatter {
    let by_qa = report.qa_items > 0;
    let points = report
        .modes
        .iter()
        .filter_map(|m| {
            let y = if by_qa {
                m.qa.map(|q| q.answer_logprob)
            } else {
                m.kl
            }?;
            Some(ScatterPoint {
                label: m.name.clone(),
                x: m.kv_bytes as f64 / (1024.0 * 1024.0),
                y,
            })
        })
        .collect();
    Scatter {
        title: "quality vs KV memory per mode".into(),
        x_label: "KV memory of the prefix (MiB, f32)".into(),
        y_label: if by_qa {
            "mean answer log-likelihood per token (higher is better)".into()
        } else {
            "KL to the teacher per answer token (lower is better)".into()
        },
        points,
    }
}

fn cell<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

/// The report as an aligned text table, one row per mode.
fn table(report: &Report) -> String {
    let header = [
        "mode", "prefix", "KV", "TTFT", "ans LL", "ppl", "gap", "gap cap", "MC acc", "KL",
        "KL gap", "EM", "contains", "chrF",
    ];
    let pct = |x: f64| format!("{:.0}%", 100.0 * x);
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for m in &report.modes {
        let generated = m.qa.and_then(|q| q.generated);
        rows.push(vec![
            match &m.reused_from {
                Some(_) => format!("{} (reused)", m.name),
                None => m.name.clone(),
            },
            m.prefix_tokens.to_string(),
            human_bytes(m.kv_bytes),
            cell(m.time_to_first_token_s, |s| format!("{s:.2} s")),
            cell(m.qa.map(|q| q.answer_logprob), |x| format!("{x:.3}")),
            cell(m.qa.map(|q| q.perplexity), |x| format!("{x:.2}")),
            cell(m.gap_closed, pct),
            cell(m.gap_closed_capped, pct),
            cell(m.qa.and_then(|q| q.mc_accuracy), pct),
            cell(m.kl, |x| format!("{x:.4}")),
            cell(m.kl_gap_closed, pct),
            cell(generated.map(|g| g.exact_match), pct),
            cell(generated, |g| {
                let (lo, hi) = g.contains_interval;
                format!(
                    "{:.0}% ({:.0}-{:.0})",
                    100.0 * g.contains_match,
                    100.0 * lo,
                    100.0 * hi
                )
            }),
            cell(generated.map(|g| g.chrf), |x| format!("{x:.1}")),
        ]);
        if let Some(why) = &m.skipped {
            let last = rows.len() - 1;
            rows[last].truncate(3);
            rows[last].push(format!("skipped: {why}"));
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .filter(|r| r.len() == header.len())
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if r.len() == header.len() || c < 3 {
                    format!("{v:>w$}", w = widths[c])
                } else {
                    v.clone()
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "{} questions, {} held-out conversations; ans LL: mean log-probability per reference \
         answer token; gap: share of the bare -> ICL gap closed; KL: to the self-study teacher's \
         top-k; contains: share of generated answers containing the reference (95% interval)\n",
        report.qa_items, report.conversations
    ));
    out.push_str(&comparisons_with_icl(report));
    out
}

/// Two decimals, or two significant digits below 0.01 (where two decimals would print 0).
fn p_value(p: f64) -> String {
    if p >= 0.01 {
        format!("{p:.2}")
    } else {
        format!("{p:.1e}")
    }
}

/// One line per mode whose generated answers were compared with ICL's, question by question.
fn comparisons_with_icl(report: &Report) -> String {
    let mut out = String::new();
    for m in &report.modes {
        let Some(c) = m.contains_vs_icl else {
            continue;
        };
        let (lo, hi) = c.difference_interval;
        out.push_str(&format!(
            "contains, {} against ICL on the same {} questions: {} right in both, {} only in {}, \
             {} only with ICL; difference {:+.1} points (95% {:+.1} to {:+.1}), McNemar p = {}\n",
            m.name,
            c.questions,
            c.both,
            c.only_this,
            m.name,
            c.only_other,
            100.0 * c.difference,
            100.0 * lo,
            100.0 * hi,
            p_value(c.p_value),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use cartridge_eval::stats::paired;
    use cartridge_eval::ModeReport;

    use super::*;

    #[test]
    fn p_values_keep_two_significant_digits_when_small() {
        assert_eq!(p_value(0.1797), "0.18");
        assert_eq!(p_value(0.00098), "9.8e-4");
        assert_eq!(p_value(1.0), "1.00");
    }

    #[test]
    fn comparison_lines_name_each_mode_but_icl() {
        let mut cart = ModeReport::new("cart".into(), ModeKind::Cartridges, 4, 0);
        cart.contains_vs_icl = paired(&[true, true, false, false], &[true, false, true, true]);
        let report = Report {
            model: "m".into(),
            qa_items: 4,
            conversations: 0,
            data_digest: String::new(),
            icl_context: None,
            modes: vec![ModeReport::new("icl".into(), ModeKind::Icl, 9, 0), cart],
            notes: vec![],
        };
        let text = comparisons_with_icl(&report);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.starts_with(
                "contains, cart against ICL on the same 4 questions: 1 right in both, 1 only in \
                 cart, 2 only with ICL; difference -25.0 points"
            ),
            "{text}"
        );
        assert!(text.trim_end().ends_with("McNemar p = 1.00"), "{text}");
    }
}
