//! `cartridge build CORPUS`: self-study + distillation + write, in one command. The synthesised
//! dataset is kept next to the output (`<out>.data/`) so that a stopped build resumes where it
//! stopped (`--resume`): finished conversations are not regenerated, and training continues from
//! its last checkpoint.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cartridge_selfstudy::corpus;
use cartridge_selfstudy::local::LocalBackend;

use super::synthesize::{run_synthesis, CorpusArgs, SynthArgs};
use super::train::{corpus_token_ids, run_training, training_data, TrainArgs};
use crate::session::ModelArgs;

/// Options of `cartridge build`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The corpus: a file or a folder.
    corpus: PathBuf,
    /// The .cart to write [default: the corpus name + .cart].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Conversations to synthesise.
    #[arg(long, default_value_t = 64)]
    num: u64,
    /// Continue a stopped build (keeps finished conversations and the training checkpoint).
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    corpus_args: CorpusArgs,
    #[command(flatten)]
    synth: SynthArgs,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    config: crate::config_file::ConfigArg,
    /// Progress as JSON lines on stderr and a summary object on stdout.
    #[arg(long)]
    json: bool,
}

/// Run the subcommand.
pub fn run(args: Args) -> Result<ExitCode> {
    let out = match &args.out {
        Some(o) => o.clone(),
        None => {
            let name = args
                .corpus
                .canonicalize()
                .ok()
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .context("cannot name the output after the corpus: pass --out F.cart")?;
            PathBuf::from(format!("{name}.cart"))
        }
    };
    let data = out.with_extension("data");
    let synth_config = args.synth.config(args.num)?;
    let train_config = args.train.config(args.model.training_dtype())?;
    let options = args.corpus_args.options();
    let corpus = corpus::ingest(&args.corpus, &options)?;

    let loaded = args.model.load()?;
    let model = args.model.transformer(&loaded)?;
    // Self-study renders every conversation with the template, and the selected starts read the
    // corpus through it (`corpus_token_ids`).
    let template = loaded
        .chat_template
        .clone()
        .context("the model has no chat template; self-study needs a chat model")?;
    let mut backend = LocalBackend::from_parts(
        model,
        loaded.tokenizer.clone(),
        template,
        loaded.fingerprint.clone(),
    )?;
    // A resumed build that already has its dataset only fills in missing conversations.
    let resume_data = args.resume && data.join("manifest.json").exists();
    if !args.json {
        eprintln!(
            "[1/2] self-study: {} conversations -> {}",
            args.num,
            data.display()
        );
    }
    let synth = run_synthesis(
        &synth_config,
        &mut backend,
        &corpus,
        &data,
        resume_data,
        args.json,
    )?;
    let prompt_summary = args
        .train
        .corpus_summary(&mut backend, &corpus, args.json)?;
    drop(backend);

    if !args.json {
        eprintln!(
            "[2/2] distillation: {} {} tokens -> {}",
            match train_config.artifact {
                cartridge_compiler::ArtifactKind::Kv => "KV cartridge of",
                cartridge_compiler::ArtifactKind::SoftPrompt => "soft prompt of",
            },
            train_config.tokens,
            out.display()
        );
    }
    let corpus_ids = if args.train.needs_corpus() {
        Some(corpus_token_ids(
            &loaded,
            &corpus,
            &args.train,
            args.synth.description.clone(),
        )?)
    } else {
        None
    };
    let trained = run_training(
        &train_config,
        &args.train.run_options(args.resume, &loaded)?,
        &loaded,
        &training_data(std::slice::from_ref(&data), prompt_summary)?,
        corpus_ids.as_deref(),
        &out,
        args.json,
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "out": out, "data": data, "synthesis": synth, "training": trained })
        );
    } else {
        println!(
            "built {} from {} ({} conversations, {} answer tokens)",
            out.display(),
            args.corpus.display(),
            synth.already_present + synth.written,
            synth.answer_tokens
        );
        if let Some(e) = &trained.final_eval {
            println!(
                "held-out: loss {:.4}, bare model {:.4}, teacher {:.4}: {:.0}% of the gap closed",
                e.loss,
                e.bare_loss,
                e.teacher_loss,
                100.0 * e.gap_closed
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
