//! `cartridge chat`: an interactive conversation, streamed token by token. `/reset` clears the
//! conversation, `/exit` (or end of input) leaves.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::Result;
use cartridge_runtime::chat_template::ChatMessage;
use cartridge_runtime::generate::{self, Control, GenerateRequest, IncrementalDecoder};

use crate::session::{ModelArgs, PrefixArgs, SamplingArgs, Session};

/// Options of `cartridge chat`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prefix: PrefixArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Run the subcommand.
pub fn run(args: Args) -> Result<ExitCode> {
    let sampling = args.sampling.params()?;
    let session = Session::open(&args.model, &args.prefix)?;
    eprintln!(
        "model {} ({} prefix tokens). /reset clears the conversation, /exit leaves.",
        session.loaded.path.display(),
        session.prefix_len()
    );
    let stop_tokens = session.loaded.tokenizer.eos_token_ids().to_vec();
    let mut messages: Vec<ChatMessage> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", text.to_string()));
        let request = GenerateRequest {
            prompt: session.chat_ids(&messages)?,
            sampling: sampling.clone(),
            max_tokens: args.sampling.max_tokens,
            stop_tokens: stop_tokens.clone(),
            top_logprobs: 0,
        };
        let mut decoder = IncrementalDecoder::new(|ids: &[u32]| session.decode(ids));
        let mut stdout = std::io::stdout().lock();
        let result =
            generate::generate(&session.model, session.prefix.as_ref(), &request, |tok| {
                if !stop_tokens.contains(&tok) {
                    let _ = stdout.write_all(decoder.push(tok).as_bytes());
                    let _ = stdout.flush();
                }
                Control::Continue
            })?;
        let _ = writeln!(stdout, "{}", decoder.finish());
        let answer: Vec<u32> = result
            .tokens
            .iter()
            .copied()
            .filter(|t| !stop_tokens.contains(t))
            .collect();
        messages.push(ChatMessage::new("assistant", session.decode(&answer)));
    }
    Ok(ExitCode::SUCCESS)
}
