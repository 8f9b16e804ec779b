//! The corpus summary a soft prompt can carry (the SoftPromptComp recipe: Wang et al. 2024,
//! "Adapting LLMs for Efficient Context Processing through Soft Prompt Compression"): the teacher
//! reads the head of the corpus and writes a short summary; the summary text then sits in the
//! prompt during training and serving, and the soft embeddings learn what it misses.

use crate::backend::{Backend, Completion};
use crate::corpus::Corpus;
use crate::error::{Error, Result};
use crate::prompt::{system_message, ChatFrame};

/// What the teacher is asked.
pub const SUMMARY_REQUEST: &str = "Summarize the excerpt in one short paragraph for someone who \
    will answer questions about it. Keep the names, numbers and dates that matter most.";

/// Tokens kept free in the window besides the corpus head: the request and the chat markup.
const PROMPT_ROOM: usize = 256;

/// The corpus's files joined as self-study shows them (each under a `### path` line when there
/// are several).
pub fn corpus_text(corpus: &Corpus) -> String {
    if corpus.files.len() == 1 {
        return corpus.files[0].text.clone();
    }
    let parts: Vec<String> = corpus
        .files
        .iter()
        .map(|f| format!("### {}\n{}", f.path, f.text))
        .collect();
    parts.join("\n\n")
}

/// The summary cut at its first repeated sentence (small models loop) and at its last complete
/// sentence (when the token limit cut it mid-sentence and a complete one exists).
fn tidy(text: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let end = rest.find(['.', '!', '?']).map_or(rest.len(), |i| i + 1);
        let sentence = rest[..end].trim();
        // Short pieces ("Dr.") repeat innocently; a repeated sentence of several words is a loop.
        if sentence.split_whitespace().count() >= 3 && kept.contains(&sentence) {
            break;
        }
        kept.push(sentence);
        rest = rest[end..].trim_start();
    }
    if kept.len() > 1 && !kept.last().is_some_and(|s| s.ends_with(['.', '!', '?'])) {
        kept.pop();
    }
    kept.join(" ")
}

/// A summary and the tokens that carry it.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusSummary {
    /// The text.
    pub text: String,
    /// The chat template's system turn holding `text`: what the runtime places between a soft
    /// prompt and the conversation, so training must see exactly these ids.
    pub ids: Vec<u32>,
}

/// A greedy summary of as much of the corpus as fits the teacher's window, at most `max_tokens`
/// long.
pub fn write_summary(
    backend: &mut dyn Backend,
    corpus: &Corpus,
    description: Option<&str>,
    max_tokens: usize,
) -> Result<CorpusSummary> {
    if max_tokens == 0 {
        return Err(Error::Config("a summary needs at least one token".into()));
    }
    let window = backend.info().context_window;
    let budget = window
        .checked_sub(max_tokens + PROMPT_ROOM)
        .filter(|&b| b > 0)
        .ok_or_else(|| {
            Error::Config(format!(
                "a {max_tokens}-token summary leaves no room for the corpus in a {window}-token window"
            ))
        })?;
    let text = corpus_text(corpus);
    let ids = backend.encode(&text)?;
    let head = if ids.len() > budget {
        backend.decode(&ids[..budget])?
    } else {
        text
    };
    let (shared, prompt) = {
        let frame = ChatFrame::new(backend, system_message(&head, description))?;
        let prompt =
            frame.assistant_glue(&[("user".to_string(), SUMMARY_REQUEST.to_string())], None)?;
        (frame.system_ids().to_vec(), prompt)
    };
    let request = Completion {
        prompt,
        temperature: 0.0,
        seed: 0,
        max_tokens,
        top_logprobs: 0,
    };
    let out = backend
        .complete(&shared, std::slice::from_ref(&request))?
        .pop()
        .ok_or_else(|| Error::Config("the backend returned no completion".into()))?;
    let mut tokens = out.tokens;
    if out.stopped {
        tokens.pop();
    }
    let summary = tidy(&backend.decode(&tokens)?);
    if summary.is_empty() {
        return Err(Error::Config(
            "the model wrote an empty summary of the corpus".into(),
        ));
    }
    let turn = backend.render_chat(&[("system".to_string(), summary.clone())], false)?;
    let ids = backend.encode(&turn)?;
    Ok(CorpusSummary { text: summary, ids })
}

#[cfg(test)]
mod tests {
    use super::tidy;

    #[test]
    fn tidy_cuts_loops_and_unfinished_sentences() {
        assert_eq!(tidy(" A is 1. B is 2. B is 2. C"), "A is 1. B is 2.");
        assert_eq!(tidy("A is 1. B is"), "A is 1.");
        assert_eq!(tidy("no stop at all"), "no stop at all");
        assert_eq!(tidy("Dr. X met Y. Dr. X left."), "Dr. X met Y. Dr. X left.");
    }
}
