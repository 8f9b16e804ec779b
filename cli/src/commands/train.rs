//! `cartridge train --data DIR --out F.cart`: distil a self-study dataset into a KV cartridge (or,
//! with `--soft-prompt N`, a soft prompt). Checkpoints as it goes; `--resume` continues exactly.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use cartridge_compiler::{
    ArtifactKind, ComputeDtype, InitKind, InitStage, InitialParams, Objective,
    Progress as TrainProgress, PromptSummary, RunOptions, Schedule, TrainConfig, TrainData,
    TrainSummary,
};
use cartridge_eval::corpus_context::{manifest_description, system_ids, CorpusContext};
use cartridge_formats::cart::{CartFile, Compression, Dims};
use cartridge_formats::dataset::{Dataset, ReadOptions};
use cartridge_runtime::cartridge_file::{load_cartridge, load_soft_prompt};
use cartridge_runtime::loader::LoadedModel;
use cartridge_selfstudy::corpus::{self, Corpus, IngestOptions};
use cartridge_selfstudy::local::LocalBackend;
use cartridge_selfstudy::summary::write_summary;
use cartridge_selfstudy::Backend;
use serde_json::json;

use crate::progress::Progress;
use crate::session::ModelArgs;

/// Training settings (shared with `build`).
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Cartridge size `p` in tokens (KV slots).
    #[arg(long, default_value_t = TrainConfig::default().tokens)]
    pub tokens: usize,
    /// Train a soft prompt of N embeddings instead of a KV cartridge.
    #[arg(long, value_name = "N")]
    pub soft_prompt: Option<usize>,
    /// With --soft-prompt: the model first writes a summary of the corpus, which sits between the
    /// soft prompt and every conversation in training and serving (the SoftPromptComp recipe);
    /// both go into the .cart. Needs the corpus.
    #[arg(long, requires = "soft_prompt")]
    pub summary: bool,
    /// Longest summary, in tokens.
    #[arg(long, default_value_t = 128)]
    pub summary_tokens: usize,
    /// Leading cartridge slots kept frozen (the attention sink).
    #[arg(long, default_value_t = TrainConfig::default().frozen_tokens)]
    pub frozen_tokens: usize,
    /// Initialisation: selected-keys (per layer and head, the keys of the whole corpus that best
    /// cover what a question after it reads, cut from the corpus as the self-study teacher saw it:
    /// inside its system message, rendered by the chat template), selected-fitted (the same keys, with values
    /// refitted by least squares to read what the whole corpus read: one more pass over it),
    /// selected-refined (selected-fitted, then its keys refined by gradient descent towards the
    /// same reads: the best answer log-likelihood of the untrained starts; about 5 min more for
    /// 5,000 corpus tokens on 2 CPU cores), corpus (KV of the corpus's first tokens),
    /// random-text, random-vectors, sampled-chunks.
    #[arg(long, default_value = "selected-keys", value_parser = ["corpus", "selected-keys", "selected-fitted", "selected-refined", "random-text", "random-vectors", "sampled-chunks"])]
    pub init: String,
    /// Start from this .cart instead of --init: a cartridge (or soft prompt) made before for the
    /// same model, to train further, or an expensive start computed once (`--init
    /// selected-refined --max-steps 0`) and reused by several runs. Its size and kind replace
    /// --tokens and --soft-prompt.
    #[arg(long, value_name = "F.cart", conflicts_with = "init")]
    pub init_from: Option<PathBuf>,
    /// Loss: distill (cross-entropy against the teacher's top-k, the reference trainer's),
    /// distill-tail (the same with the teacher's mass outside its top-k as one more class, so
    /// training does not push every other token towards zero), or tokens (next-token
    /// prediction, for ablations).
    #[arg(long, default_value = "distill", value_parser = ["distill", "distill-tail", "tokens"])]
    pub objective: String,
    /// Learning rate (Adam, weight decay 0). The reference trainer uses 2e-2 over long GPU runs;
    /// the default suits the short CPU runs of `build` (BENCHMARKS.md, "Training").
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    pub lr: f64,
    /// Warm up linearly over this many steps, then decay with a half cosine (0: constant rate).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Passes over the training conversations.
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    /// Optimiser steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Conversations per optimiser step.
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch_size: usize,
    /// Conversations per forward/backward (gradient accumulation below --batch-size).
    #[arg(long, default_value_t = TrainConfig::default().micro_batch)]
    pub micro_batch: usize,
    /// Pack conversations into rows of at most N tokens, each with its own positions and a
    /// block-diagonal mask (0: one right-padded row per conversation). Same loss, less padding.
    #[arg(long, default_value_t = TrainConfig::default().pack_len)]
    pub pack_len: usize,
    /// Tokens kept per conversation.
    #[arg(long, default_value_t = TrainConfig::default().max_seq_len)]
    pub max_seq_len: usize,
    /// Conversations held out for evaluation.
    #[arg(long, default_value_t = TrainConfig::default().eval_conversations)]
    pub eval_conversations: usize,
    /// Evaluate every N steps (0: at the start and the end only).
    #[arg(long, default_value_t = TrainConfig::default().eval_every)]
    pub eval_every: usize,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = TrainConfig::default().checkpoint_every)]
    pub checkpoint_every: usize,
    /// Seed of the data order, held-out split and random initialisation.
    #[arg(long, default_value_t = 0)]
    pub train_seed: u64,
    /// Write the .cart zstd-compressed (for distribution; loading decompresses it).
    #[arg(long)]
    pub compress: bool,
}

impl TrainArgs {
    /// How the run starts, writes and resumes: `--init-from` (checked against `loaded`),
    /// `--compress`, and `resume`.
    pub fn run_options(&self, resume: bool, loaded: &LoadedModel) -> Result<RunOptions> {
        let initial = match &self.init_from {
            None => None,
            Some(path) => {
                let (fp, device) = (&loaded.fingerprint, &loaded.device);
                let read = || format!("reading the start {}", path.display());
                Some(match self.init_from_dims()? {
                    Dims::Kv(_) => {
                        InitialParams::Kv(load_cartridge(path, fp, device).with_context(read)?)
                    }
                    Dims::SoftPrompt(_) => {
                        let soft = load_soft_prompt(path, fp, device).with_context(read)?;
                        if soft.summary.is_some() {
                            bail!(
                                "{} is a soft prompt with a summary; --init-from takes a \
                                 cartridge or a soft prompt without one",
                                path.display()
                            );
                        }
                        InitialParams::SoftPrompt(soft.embeddings)
                    }
                })
            }
        };
        Ok(RunOptions {
            resume,
            compression: if self.compress {
                Compression::Zstd
            } else {
                Compression::None
            },
            initial,
            ..RunOptions::default()
        })
    }

    /// The dimensions in the header of the `--init-from` file (read, not yet verified).
    fn init_from_dims(&self) -> Result<Dims> {
        let path = self.init_from.as_deref().context("no --init-from file")?;
        let file = CartFile::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(file.header().dims)
    }

    /// The trainer's configuration, computing in `compute_dtype` (the model's `--dtype`).
    pub fn config(&self, compute_dtype: ComputeDtype) -> Result<TrainConfig> {
        let (artifact, tokens) = match (&self.init_from, self.soft_prompt) {
            (Some(_), _) if self.summary => {
                bail!("--init-from does not combine with --summary")
            }
            (Some(path), soft) => match (self.init_from_dims()?, soft) {
                (Dims::Kv(_), Some(_)) => bail!(
                    "--soft-prompt asks for a soft prompt, but {} is a KV cartridge",
                    path.display()
                ),
                (Dims::Kv(d), None) => (ArtifactKind::Kv, d.tokens as usize),
                (Dims::SoftPrompt(d), _) => (ArtifactKind::SoftPrompt, d.tokens as usize),
            },
            (None, Some(n)) => (ArtifactKind::SoftPrompt, n),
            (None, None) => (ArtifactKind::Kv, self.tokens),
        };
        if tokens == 0 {
            bail!("the cartridge needs at least one token");
        }
        Ok(TrainConfig {
            artifact,
            tokens,
            frozen_tokens: self.frozen_tokens,
            init: match self.init.as_str() {
                _ if self.init_from.is_some() => InitKind::Given,
                "random-text" => InitKind::RandomText,
                "random-vectors" => InitKind::RandomVectors,
                "sampled-chunks" => InitKind::SampledChunks,
                "corpus" => InitKind::CorpusText,
                "selected-fitted" => InitKind::SelectedFitted,
                "selected-refined" => InitKind::SelectedRefined,
                _ => InitKind::SelectedKeys,
            },
            objective: match self.objective.as_str() {
                "tokens" => Objective::Tokens,
                "distill-tail" => Objective::DistillTail,
                _ => Objective::Distill,
            },
            lr: self.lr,
            schedule: if self.warmup_steps > 0 {
                Schedule::WarmupCosine {
                    warmup_steps: self.warmup_steps,
                    min_ratio: 0.1,
                }
            } else {
                Schedule::Constant
            },
            batch_size: self.batch_size,
            micro_batch: self.micro_batch,
            pack_len: self.pack_len,
            epochs: self.epochs,
            max_steps: self.max_steps,
            max_seq_len: self.max_seq_len,
            seed: self.train_seed,
            eval_conversations: self.eval_conversations,
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            compute_dtype,
            ..TrainConfig::default()
        })
    }

    /// Whether the initialisation or the summary reads the corpus text.
    pub fn needs_corpus(&self) -> bool {
        self.summary
            || self.init_from.is_none()
                && matches!(
                    self.init.as_str(),
                    "corpus"
                        | "sampled-chunks"
                        | "selected-keys"
                        | "selected-fitted"
                        | "selected-refined"
                )
    }

    /// With `--summary`: the model's summary of `corpus`, written by `backend` (the teacher).
    pub fn corpus_summary(
        &self,
        backend: &mut dyn Backend,
        corpus: &Corpus,
        json: bool,
    ) -> Result<Option<PromptSummary>> {
        if !self.summary {
            return Ok(None);
        }
        let s = write_summary(backend, corpus, None, self.summary_tokens)
            .context("writing the corpus summary")?;
        if json {
            eprintln!(
                "{}",
                json!({"event": "summary", "text": s.text, "tokens": s.ids.len()})
            );
        } else {
            eprintln!("summary ({} tokens): {}", s.ids.len(), s.text);
        }
        Ok(Some(PromptSummary {
            text: s.text,
            ids: s.ids,
        }))
    }
}

/// Options of `cartridge train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The dataset folder written by `cartridge synthesize`; repeat it to train on several
    /// (same teacher and corpus, e.g. question and verbatim conversations made separately).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// The .cart to write.
    #[arg(long)]
    out: PathBuf,
    /// The corpus the dataset came from (needed by --init corpus, selected-keys and sampled-chunks).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Continue from the checkpoint next to --out.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    config: crate::config_file::ConfigArg,
    /// Progress as JSON lines on stderr and the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Run the subcommand.
pub fn run(args: Args) -> Result<ExitCode> {
    let loaded = args.model.load()?;
    let corpus_ids = match (&args.corpus, args.train.needs_corpus()) {
        (Some(path), _) => Some(corpus_token_ids(
            &loaded,
            &corpus::ingest(path, &IngestOptions::default())?,
            &args.train,
            dataset_description(&args.data)?,
        )?),
        (None, true) => bail!(
            "--init {} and --summary need the corpus text: pass --corpus PATH (or --init \
             random-text without --summary)",
            args.train.init
        ),
        (None, false) => None,
    };
    let prompt_summary = match (&args.corpus, args.train.summary) {
        (Some(path), true) => {
            let corpus = corpus::ingest(path, &IngestOptions::default())?;
            let template = loaded
                .chat_template
                .clone()
                .context("--summary needs a chat model (this one has no chat template)")?;
            let mut backend = LocalBackend::from_parts(
                args.model.transformer(&loaded)?,
                loaded.tokenizer.clone(),
                template,
                loaded.fingerprint.clone(),
            )?;
            args.train
                .corpus_summary(&mut backend, &corpus, args.json)?
        }
        _ => None,
    };
    let summary = run_training(
        &args.train.config(args.model.training_dtype())?,
        &args.train.run_options(args.resume, &loaded)?,
        &loaded,
        &training_data(&args.data, prompt_summary)?,
        corpus_ids.as_deref(),
        &args.out,
        args.json,
    )?;
    print_summary(&summary, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// The token ids corpus initialisation reads. For the `selected-*` starts, the corpus as the
/// self-study teacher and in-context learning see it: the teacher's system message around the
/// whole corpus (file names under `###` lines, `description` if synthesis had one), rendered by
/// the model's chat template, so the cartridge is cut from the very context it replaces, template
/// tokens and closing `<|im_end|>` included. (Untrained, fitted, on tidewright's questions:
/// -4.571 against -4.770 for the bare file text; BENCHMARKS.md, "The teacher's context".)
/// Otherwise (a soft prompt starts from the embeddings of the corpus's first tokens), and for a
/// model without a chat template, the files' tokens in order.
pub fn corpus_token_ids(
    loaded: &LoadedModel,
    corpus: &Corpus,
    train: &TrainArgs,
    description: Option<String>,
) -> Result<Vec<u32>> {
    let selects_keys = train.soft_prompt.is_none() && train.init.starts_with("selected");
    if let (true, Some(template)) = (selects_keys, &loaded.chat_template) {
        let context = CorpusContext::new(corpus, &loaded.tokenizer, description)?;
        let system = context.system_message(context.tokens(), &loaded.tokenizer)?;
        return Ok(system_ids(template, &loaded.tokenizer, &system)?);
    }
    let mut ids = Vec::new();
    for f in &corpus.files {
        ids.extend(loaded.tokenizer.encode(&f.text, false)?);
    }
    Ok(ids)
}

fn open_dataset(data: &Path) -> Result<Dataset> {
    Dataset::open(data, ReadOptions::default())
        .with_context(|| format!("opening dataset {}", data.display()))
}

/// The one-line corpus description the datasets were synthesised with, if any (they must agree:
/// corpus initialisation rebuilds the teacher's system message with it).
fn dataset_description(data: &[PathBuf]) -> Result<Option<String>> {
    let mut found: Option<(&Path, Option<String>)> = None;
    for path in data {
        let description = manifest_description(&open_dataset(path)?.manifest().settings)?;
        match &found {
            Some((first, d)) if *d != description => bail!(
                "{} and {} were synthesised with different corpus descriptions",
                first.display(),
                path.display()
            ),
            Some(_) => {}
            None => found = Some((path, description)),
        }
    }
    Ok(found.and_then(|(_, d)| d))
}

/// The training data of one or more dataset folders (records in the order given), with the
/// soft prompt's summary if it has one. The datasets must share their teacher and corpus.
pub fn training_data(data: &[PathBuf], summary: Option<PromptSummary>) -> Result<TrainData> {
    let mut merged: Option<TrainData> = None;
    for path in data {
        let next = TrainData::from_dataset(&open_dataset(path)?)?;
        match &mut merged {
            None => merged = Some(next),
            Some(all) => {
                if next.teacher != all.teacher {
                    bail!(
                        "{} was synthesised by another teacher than {}",
                        path.display(),
                        data[0].display()
                    );
                }
                if next.corpus_digest != all.corpus_digest {
                    bail!(
                        "{} was synthesised from another corpus than {}",
                        path.display(),
                        data[0].display()
                    );
                }
                all.records.extend(next.records);
            }
        }
    }
    let merged = merged.context("no dataset given (--data DIR)")?;
    Ok(TrainData { summary, ..merged })
}

/// Train with a progress display; shared with `build`.
pub fn run_training(
    cfg: &TrainConfig,
    opts: &RunOptions,
    loaded: &LoadedModel,
    train_data: &TrainData,
    corpus_ids: Option<&[u32]>,
    out: &Path,
    json: bool,
) -> Result<TrainSummary> {
    let mut bar: Option<Progress> = None;
    // The start's current part and its display (corpus-selected starts report as they go).
    let mut init_bar: Option<(InitStage, Progress)> = None;
    let summary = cartridge_compiler::train_loaded(
        cfg,
        loaded,
        train_data,
        corpus_ids,
        out,
        opts,
        &mut |p: &TrainProgress| match p {
            TrainProgress::Init(i) => {
                if init_bar.as_ref().is_none_or(|(stage, _)| *stage != i.stage) {
                    if let Some((_, b)) = init_bar.take() {
                        b.finish();
                    }
                    init_bar = Some((i.stage, Progress::new(i.total as u64, i.stage.unit(), json)));
                }
                if let Some((_, b)) = &init_bar {
                    b.update(
                        i.done as u64,
                        format!("start: {}", init_stage_text(i.stage)),
                        json!({"event": "init", "stage": "train", "part": i.stage,
                            "done": i.done, "total": i.total}),
                    );
                }
            }
            TrainProgress::Started {
                start_step,
                total_steps,
                train_examples,
                eval_examples,
                trainable,
            } => {
                if let Some((_, b)) = init_bar.take() {
                    b.finish();
                }
                let b = Progress::new(*total_steps as u64, "steps", json);
                b.update(
                    *start_step as u64,
                    "starting".into(),
                    json!({"event": "started", "stage": "train", "start_step": start_step,
                        "total_steps": total_steps, "train_examples": train_examples,
                        "eval_examples": eval_examples, "trainable": trainable}),
                );
                bar = Some(b);
            }
            TrainProgress::Step(s) => {
                if let Some(b) = &bar {
                    b.update(
                        s.step as u64,
                        format!(
                            "loss {:.4}, {:.0} tok/s",
                            s.loss,
                            s.tokens as f64 / s.seconds
                        ),
                        json!({"event": "step", "stage": "train", "step": s.step,
                            "total_steps": s.total_steps, "loss": s.loss, "lr": s.lr,
                            "tokens": s.tokens, "seconds": s.seconds}),
                    );
                }
            }
            TrainProgress::Eval(e) => {
                let line = json!({"event": "eval", "stage": "train", "step": e.step,
                    "loss": e.loss, "bare_loss": e.bare_loss, "teacher_loss": e.teacher_loss,
                    "gap_closed": e.gap_closed});
                if json {
                    eprintln!("{line}");
                } else {
                    let text = format!(
                        "eval at step {}: loss {:.4} (bare model {:.4}, teacher {:.4}): {:.0}% of the gap closed",
                        e.step, e.loss, e.bare_loss, e.teacher_loss, 100.0 * e.gap_closed
                    );
                    match &bar {
                        Some(b) => b.println(&text),
                        None => eprintln!("{text}"),
                    }
                }
            }
            TrainProgress::Checkpoint { step } => {
                if json {
                    eprintln!(
                        "{}",
                        json!({"event": "checkpoint", "stage": "train", "step": step})
                    );
                }
            }
        },
    );
    if let Some(b) = &bar {
        b.finish();
    }
    if let Some((_, b)) = &init_bar {
        b.finish();
    }
    Ok(summary?)
}

/// What a part of the start does, for the progress line.
fn init_stage_text(stage: InitStage) -> &'static str {
    match stage {
        InitStage::SelectKeys => "selecting the corpus's keys",
        InitStage::FitValues => "refitting values",
        InitStage::RefineKeys => "refining keys",
    }
}

fn print_summary(s: &TrainSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    match &s.out {
        Some(out) => println!(
            "wrote {} ({} bytes) after {} steps",
            out.display(),
            s.out_bytes,
            s.steps
        ),
        None => println!(
            "stopped after {} of {} steps (checkpointed)",
            s.steps, s.total_steps
        ),
    }
    if let (Some(a), Some(b)) = (&s.first_eval, &s.final_eval) {
        println!(
            "held-out loss {:.4} -> {:.4} (bare model {:.4}, teacher {:.4}): {:.0}% of the gap closed",
            a.loss,
            b.loss,
            b.bare_loss,
            b.teacher_loss,
            100.0 * b.gap_closed
        );
    }
    println!("metrics: {}", s.metrics.display());
    Ok(())
}
