//! `cartridge generate`: one completion, streamed to stdout, or one JSON object with `--json`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use cartridge_runtime::chat_template::ChatMessage;
use cartridge_runtime::generate::{
    self, Control, FinishReason, GenerateRequest, IncrementalDecoder,
};
use serde_json::json;

use crate::session::{ModelArgs, PrefixArgs, SamplingArgs, Session};

/// Options of `cartridge generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prefix: PrefixArgs,
    /// The prompt: a user message, rendered with the model's chat template (see --raw).
    #[arg(long)]
    prompt: String,
    /// Feed the prompt as plain text, without the chat template.
    #[arg(long)]
    raw: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Also record the K most probable tokens and their log-probabilities (untempered) at each
    /// generated position (shown with --json).
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_logprobs: usize,
    /// Print one JSON object (prompt ids, generated ids and text, top log-probs, timings).
    #[arg(long)]
    json: bool,
}

/// Run the subcommand.
pub fn run(args: Args) -> Result<ExitCode> {
    let sampling = args.sampling.params()?;
    let session = Session::open(&args.model, &args.prefix)?;
    let prompt = if args.raw {
        session.raw_ids(&args.prompt)?
    } else {
        session.chat_ids(&[ChatMessage::new("user", args.prompt.clone())])?
    };
    if prompt.is_empty() {
        anyhow::bail!("the prompt is empty after tokenisation");
    }
    let request = GenerateRequest {
        prompt: prompt.clone(),
        sampling,
        max_tokens: args.sampling.max_tokens,
        stop_tokens: session.loaded.tokenizer.eos_token_ids().to_vec(),
        top_logprobs: args.top_logprobs,
    };

    let mut decoder = IncrementalDecoder::new(|ids: &[u32]| session.decode(ids));
    let mut stdout = std::io::stdout().lock();
    let mut first_token_at = None;
    let start = Instant::now();
    let result = generate::generate(&session.model, session.prefix.as_ref(), &request, |tok| {
        first_token_at.get_or_insert_with(|| start.elapsed());
        if !args.json && !request.stop_tokens.contains(&tok) {
            let delta = decoder.push(tok);
            let _ = stdout.write_all(delta.as_bytes());
            let _ = stdout.flush();
        }
        Control::Continue
    })?;
    let total = start.elapsed();
    let ttft = first_token_at.unwrap_or(total).as_secs_f64();
    let decode_tokens = result.tokens.len().saturating_sub(1);
    let decode_rate = if total.as_secs_f64() > ttft && decode_tokens > 0 {
        decode_tokens as f64 / (total.as_secs_f64() - ttft)
    } else {
        0.0
    };
    let finish = match result.finish {
        FinishReason::StopToken(_) => "stop",
        FinishReason::Stopped => "stop",
        FinishReason::Length => "length",
    };
    if args.json {
        let text_ids: Vec<u32> = result
            .tokens
            .iter()
            .copied()
            .filter(|t| !request.stop_tokens.contains(t))
            .collect();
        let out = json!({
            "model": session.loaded.path.display().to_string(),
            "prefix_tokens": session.prefix_len(),
            "prompt_ids": prompt,
            "ids": result.tokens,
            "text": session.decode(&text_ids),
            "top_logprobs": result.top_logprobs.iter().map(|pos| {
                pos.iter().map(|&(id, lp)| json!([id, lp])).collect::<Vec<_>>()
            }).collect::<Vec<_>>(),
            "finish_reason": finish,
            "timings": {
                "load_s": session.load_seconds,
                "time_to_first_token_s": ttft,
                "decode_tokens_per_s": decode_rate,
            },
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        let tail = decoder.finish();
        let _ = writeln!(stdout, "{tail}");
        let _ = stdout.flush();
        eprintln!(
            "[{} prompt + {} prefix tokens, {} generated ({finish}); first token {:.0} ms, {:.1} tok/s]",
            prompt.len(),
            session.prefix_len(),
            result.tokens.len(),
            ttft * 1e3,
            decode_rate
        );
    }
    Ok(ExitCode::SUCCESS)
}
