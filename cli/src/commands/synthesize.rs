//! `cartridge synthesize CORPUS --out DIR --num N`: self-study. The model writes conversations about
//! random chunks of the corpus and the teacher's top-k log-probabilities at every answer token go
//! into dataset shards (format: `formats/SPEC.md`). `--resume` continues a stopped run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cartridge_selfstudy::corpus::{self, IngestOptions, InvalidUtf8};
use cartridge_selfstudy::local::LocalBackend;
use cartridge_selfstudy::remote::{RemoteBackend, RemoteOptions};
use cartridge_selfstudy::Backend;
use cartridge_selfstudy::{parse_seed_file, synthesize, SeedWeights, SynthesisConfig};
use serde_json::json;

use crate::progress::Progress;
use crate::session::ModelArgs;

/// Corpus reading options (shared with `build`).
#[derive(Debug, Clone, clap::Args)]
pub struct CorpusArgs {
    /// Leave out files and folders matching this glob (relative to the corpus root); repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Read files that .gitignore would skip.
    #[arg(long)]
    pub no_gitignore: bool,
    /// Include hidden files and folders (`.git` is always skipped).
    #[arg(long)]
    pub hidden: bool,
    /// Decode invalid UTF-8 lossily instead of refusing the file.
    #[arg(long)]
    pub lossy_utf8: bool,
    /// Refuse a corpus with more text than this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = IngestOptions::default().max_bytes)]
    pub max_corpus_bytes: u64,
}

impl CorpusArgs {
    /// The ingestion options.
    pub fn options(&self) -> IngestOptions {
        IngestOptions {
            exclude: self.exclude.clone(),
            gitignore: !self.no_gitignore,
            hidden: self.hidden,
            invalid_utf8: if self.lossy_utf8 {
                InvalidUtf8::Lossy
            } else {
                InvalidUtf8::Error
            },
            max_bytes: self.max_corpus_bytes,
        }
    }
}

/// Synthesis settings (shared with `build`).
#[derive(Debug, Clone, clap::Args)]
pub struct SynthArgs {
    /// Conversations per chunk, decoded as one batch after one prefill of the chunk.
    #[arg(long, default_value_t = SynthesisConfig::default().batch)]
    pub batch: usize,
    /// Smallest chunk, in tokens.
    #[arg(long, default_value_t = SynthesisConfig::default().chunk_min_tokens)]
    pub chunk_min: usize,
    /// Largest chunk, in tokens (clipped to the model's window minus room for the conversation).
    #[arg(long, default_value_t = SynthesisConfig::default().chunk_max_tokens)]
    pub chunk_max: usize,
    /// One line describing the corpus, shown with every chunk.
    #[arg(long)]
    pub description: Option<String>,
    /// Seed-kind weights, e.g. `question=2,creative=0.5` (kinds: structuring, summarization,
    /// question, use_case, creative; recall: no user role, a request to repeat the excerpt word
    /// for word from a quoted opening; verbatim: the same request answered with the excerpt's own
    /// text, which the teacher scores instead of writing (local teacher only); the last two are
    /// off by default; kinds not named get weight 0, so `question=1` draws only question seeds).
    #[arg(long, value_name = "KIND=W,...")]
    pub seed_weights: Option<String>,
    /// A file of extra seed prompts, one per line as `kind: text`.
    #[arg(long, value_name = "FILE")]
    pub seed_file: Option<PathBuf>,
    /// User/assistant exchanges per conversation.
    #[arg(long, default_value_t = SynthesisConfig::default().turns)]
    pub turns: usize,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = SynthesisConfig::default().max_answer_tokens)]
    pub max_answer_tokens: usize,
    /// Longest user message, in tokens.
    #[arg(long, default_value_t = SynthesisConfig::default().max_user_tokens)]
    pub max_user_tokens: usize,
    /// Teacher log-probabilities recorded per answer token.
    #[arg(long, default_value_t = SynthesisConfig::default().top_k)]
    pub top_k: usize,
    /// Temperature of the simulated user.
    #[arg(long, default_value_t = SynthesisConfig::default().user_temperature)]
    pub user_temperature: f32,
    /// Temperature of the answering assistant (0: greedy).
    #[arg(long, default_value_t = SynthesisConfig::default().assistant_temperature)]
    pub assistant_temperature: f32,
    /// Seed of everything random (chunks, seed prompts, sampling).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Show the simulated user one random passage of N tokens of the chunk with its seed
    /// instruction, so its questions spread over the chunk instead of its most salient part; the
    /// teacher still answers with the whole chunk in context (0: off). Most useful with a large
    /// chunk, e.g. `--chunk-min` above the corpus size, where every chunk is the whole corpus.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub focus_tokens: usize,
}

impl SynthArgs {
    /// The synthesis configuration for `num` conversations.
    pub fn config(&self, num: u64) -> Result<SynthesisConfig> {
        let extra_seeds = match &self.seed_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading seed file {}", path.display()))?;
                parse_seed_file(&text)?
            }
            None => Vec::new(),
        };
        let seed_weights = match &self.seed_weights {
            Some(s) => SeedWeights::parse(s)?,
            None => SeedWeights::default(),
        };
        Ok(SynthesisConfig {
            num_conversations: num,
            batch: self.batch,
            chunk_min_tokens: self.chunk_min,
            chunk_max_tokens: self.chunk_max,
            description: self.description.clone(),
            seed_weights,
            extra_seeds,
            turns: self.turns,
            user_temperature: self.user_temperature,
            assistant_temperature: self.assistant_temperature,
            max_user_tokens: self.max_user_tokens,
            max_answer_tokens: self.max_answer_tokens,
            top_k: self.top_k,
            seed: self.seed,
            focus_tokens: self.focus_tokens,
            ..SynthesisConfig::default()
        })
    }
}

/// Where the teacher runs.
#[derive(Debug, Clone, clap::Args)]
pub struct BackendArgs {
    /// Run the teacher on an OpenAI-compatible server (`http://HOST:PORT/v1`: another `cartridge
    /// serve`, vLLM, SGLang, llama.cpp) instead of in this process. --model names the same model:
    /// its tokenizer and chat template are used here, and the server must match its fingerprint
    /// (or, without one, its tokenizer).
    #[arg(long, value_name = "URL")]
    pub backend: Option<String>,
    /// Requests in flight to --backend at once.
    #[arg(long, default_value_t = RemoteOptions::default().concurrency)]
    pub backend_concurrency: usize,
    /// Retries of a failed request to --backend (exponential backoff; 429 and 5xx are retried).
    #[arg(long, default_value_t = RemoteOptions::default().retries)]
    pub backend_retries: u32,
}

/// Options of `cartridge synthesize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The corpus: a file or a folder (walked recursively).
    corpus: PathBuf,
    /// The dataset folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Conversations to synthesise.
    #[arg(long, default_value_t = 256)]
    num: u64,
    /// Continue a stopped run in --out (a torn last record is dropped; nothing is lost or repeated).
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    corpus_args: CorpusArgs,
    #[command(flatten)]
    synth: SynthArgs,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    config: crate::config_file::ConfigArg,
    /// Progress as JSON lines on stderr and the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Run the subcommand.
pub fn run(args: Args) -> Result<ExitCode> {
    let config = args.synth.config(args.num)?;
    let corpus = corpus::ingest(&args.corpus, &args.corpus_args.options())?;
    let loaded = args.model.load()?;
    let summary = match &args.backend.backend {
        Some(url) => {
            let options = RemoteOptions {
                concurrency: args.backend.backend_concurrency.max(1),
                retries: args.backend.backend_retries,
                ..RemoteOptions::default()
            };
            let mut backend = RemoteBackend::connect(url, loaded, options)
                .with_context(|| format!("connecting to the teacher at {url}"))?;
            run_synthesis(
                &config,
                &mut backend,
                &corpus,
                &args.out,
                args.resume,
                args.json,
            )?
        }
        None => {
            let model = args.model.transformer(&loaded)?;
            let template = loaded
                .chat_template
                .context("the model has no chat template; self-study needs a chat model")?;
            let mut backend =
                LocalBackend::from_parts(model, loaded.tokenizer, template, loaded.fingerprint)?;
            run_synthesis(
                &config,
                &mut backend,
                &corpus,
                &args.out,
                args.resume,
                args.json,
            )?
        }
    };
    print_summary(&summary, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// Synthesise with a progress display; shared with `build`.
pub fn run_synthesis(
    config: &SynthesisConfig,
    backend: &mut dyn Backend,
    corpus: &corpus::Corpus,
    out: &std::path::Path,
    resume: bool,
    json: bool,
) -> Result<cartridge_selfstudy::Summary> {
    let progress = Progress::new(config.num_conversations, "conversations", json);
    let summary = synthesize(config, backend, corpus, out, resume, |p| {
        progress.update(
            p.done,
            format!("{:.1} answer tok/s", p.answer_tokens_per_sec),
            json!({
                "event": "progress",
                "stage": "synthesize",
                "done": p.done,
                "total": p.total,
                "answer_tokens": p.answer_tokens,
                "answer_tokens_per_s": p.answer_tokens_per_sec,
                "elapsed_s": p.elapsed_secs,
                "eta_s": p.eta_secs,
            }),
        );
    });
    progress.finish();
    Ok(summary?)
}

fn print_summary(s: &cartridge_selfstudy::Summary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    println!(
        "{}: {} conversations ({} new, {} already there), {} answer tokens in {:.1} s ({:.1} tok/s)",
        s.out_dir.display(),
        s.already_present + s.written,
        s.written,
        s.already_present,
        s.answer_tokens,
        s.elapsed_secs,
        s.answer_tokens_per_sec
    );
    println!(
        "corpus: {} files, {} tokens ({} binary skipped, {} with invalid UTF-8), {}",
        s.corpus_files, s.corpus_tokens, s.skipped_binary, s.invalid_utf8, s.corpus_digest
    );
    Ok(())
}
