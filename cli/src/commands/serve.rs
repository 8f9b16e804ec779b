//! `cartridge serve --cartridges DIR`: the OpenAI-compatible server (crate `cartridge-server`).
//! Requests name cartridges of DIR in a `cartridges` field; concurrent requests are decoded
//! together. Prints `listening on http://ADDR` on stdout once the socket is bound.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use cartridge_server::{EngineConfig, Limits, ServerConfig};

use crate::session::{ComposeArg, ModelArgs};

/// Options of `cartridge serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The folder of .cart files that requests may name (by file name, with or without .cart).
    #[arg(long, value_name = "DIR")]
    cartridges: PathBuf,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Name of the model in requests and /v1/models [default: the model file's stem].
    #[arg(long)]
    name: Option<String>,
    /// Sequences decoded together, over all cartridge sets.
    #[arg(long, default_value_t = EngineConfig::default().max_batch)]
    max_batch: usize,
    /// Requests allowed to wait for a place in the batch; more get 429 with Retry-After.
    #[arg(long, default_value_t = EngineConfig::default().queue)]
    queue: usize,
    /// Prompt tokens prefilled per step and cartridge set (a long prompt stalls decoding at most
    /// this long).
    #[arg(long, default_value_t = EngineConfig::default().prefill_tokens)]
    prefill_tokens: usize,
    /// How the cartridges a request names share positions.
    #[arg(long, value_enum, default_value_t = ComposeArg::Overlap)]
    compose: ComposeArg,
    /// Bytes of cartridges kept in memory; least recently used ones are evicted past it.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30)]
    cache_bytes: u64,
    /// Longest prompt accepted, in tokens (after the cartridges).
    #[arg(long, default_value_t = Limits::default().max_prompt_tokens)]
    max_prompt_tokens: usize,
    /// Most tokens one request may generate.
    #[arg(long, default_value_t = Limits::default().max_output_tokens)]
    max_output_tokens: usize,
    /// Most alternatives per position in `top_logprobs` (a self-study client asks for its top-k).
    #[arg(long, default_value_t = Limits::default().max_top_logprobs)]
    max_top_logprobs: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Seconds a request may take, queueing included; then 504.
    #[arg(long, default_value_t = Limits::default().timeout.as_secs())]
    timeout_secs: u64,
    /// Async worker threads for HTTP (the model runs on its own thread).
    #[arg(long, default_value_t = 2)]
    http_threads: usize,
}

/// Run the subcommand (until Ctrl-C).
pub fn run(args: Args) -> Result<ExitCode> {
    if args.max_batch == 0 || args.prefill_tokens == 0 {
        anyhow::bail!("--max-batch and --prefill-tokens must be at least 1");
    }
    let loaded = args.model.load()?;
    let model = args.model.transformer(&loaded)?;
    let config = ServerConfig {
        addr: args.addr,
        cartridges_dir: args.cartridges.clone(),
        cache_bytes: args.cache_bytes,
        engine: EngineConfig {
            max_batch: args.max_batch,
            queue: args.queue,
            prefill_tokens: args.prefill_tokens,
        },
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            max_prompt_tokens: args.max_prompt_tokens,
            max_output_tokens: args.max_output_tokens,
            max_top_logprobs: args.max_top_logprobs,
            timeout: Duration::from_secs(args.timeout_secs),
            ..Limits::default()
        },
        model_name: args.name.clone(),
        http_threads: args.http_threads,
        composition: args.compose.into(),
    };
    let server = cartridge_server::spawn(config, &loaded, model)
        .with_context(|| format!("starting the server on {}", args.addr))?;
    println!("listening on http://{}", server.addr());
    let _ = std::io::stdout().flush();
    eprintln!(
        "model {} ({}), cartridges from {}; Ctrl-C stops",
        loaded.path.display(),
        loaded.fingerprint.short(),
        args.cartridges.display()
    );
    server.wait()?;
    Ok(ExitCode::SUCCESS)
}
