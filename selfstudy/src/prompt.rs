//! Prompts as token ids: the system message that holds the chunk (shared by both roles, so it is
//! computed once per chunk), the user role's prompt, and the assistant role's conversation tokens
//! — exactly the ids training will see (no BOS, no system message).
//!
//! Everything is rendered with the teacher's own chat template. The conversation's ids are the
//! rendered text *after* the rendered system message, tokenised separately; the teacher is fed
//! `system ids ++ conversation ids`, so what it saw and what training sees agree by construction.

use crate::backend::Backend;
use crate::error::{Error, Result};

/// Stands in for an assistant message's content to find where the template puts its end-of-turn
/// text (plain letters: templates may trim or escape content).
const SENTINEL: &str = "CARTRIDGESENTINELX7F3A";

/// The system message: an optional one-line description of the corpus, then the excerpt.
pub fn system_message(chunk_text: &str, description: Option<&str>) -> String {
    let intro = match description.map(str::trim).filter(|d| !d.is_empty()) {
        Some(d) => format!("The following is an excerpt of {d}."),
        None => "The following is an excerpt of a corpus.".to_string(),
    };
    format!(
        "{intro} Use it to take part in the conversation below, and be precise about what it \
         says.\n\n<excerpt>\n{chunk_text}\n</excerpt>"
    )
}

/// The simulated user's instruction narrowed to one passage of the excerpt: the passage first,
/// then the seed instruction, so a small model writes about the passage rather than about the
/// excerpt's most salient part. Only the user role sees it; the teacher answers with the whole
/// chunk in its system message.
pub fn focused_seed(seed: &str, passage: &str) -> String {
    format!(
        "Here is one passage of the excerpt:\n<passage>\n{passage}\n</passage>\n\n{seed} Keep to \
         what this passage says."
    )
}

/// A chat whose system message (the chunk) is fixed.
pub struct ChatFrame<'a> {
    backend: &'a dyn Backend,
    system: String,
    rendered_system: String,
    system_ids: Vec<u32>,
}

/// `(role, content)`.
pub type Turn = (String, String);

fn msg(role: &str, content: &str) -> Turn {
    (role.to_string(), content.to_string())
}

impl<'a> ChatFrame<'a> {
    /// Render and tokenise the system message.
    pub fn new(backend: &'a dyn Backend, system: String) -> Result<Self> {
        let rendered_system = backend.render_chat(&[msg("system", &system)], false)?;
        let system_ids = backend.encode(&rendered_system)?;
        Ok(Self {
            backend,
            system,
            rendered_system,
            system_ids,
        })
    }

    /// The shared prefix: the system message's ids.
    pub fn system_ids(&self) -> &[u32] {
        &self.system_ids
    }

    /// The rendered text of `messages` after the system message.
    fn suffix(&self, messages: &[Turn], add_generation_prompt: bool) -> Result<String> {
        let mut all = vec![msg("system", &self.system)];
        all.extend_from_slice(messages);
        let text = self.backend.render_chat(&all, add_generation_prompt)?;
        text.strip_prefix(&self.rendered_system)
            .map(str::to_string)
            .ok_or_else(|| {
                Error::Config(
                    "the chat template does not render the system message as a prefix of the \
                     conversation, so the chunk cannot be shared between conversations"
                        .into(),
                )
            })
    }

    /// The user role's prompt after the system message: the seed instruction as the first user
    /// message; in later turns the roles are swapped (the model plays the user, so the
    /// conversation so far appears from that side).
    pub fn user_role_prompt(&self, seed: &str, history: &[Turn]) -> Result<Vec<u32>> {
        let mut msgs = vec![msg("user", seed)];
        for (role, content) in history {
            let flipped = if role == "user" { "assistant" } else { "user" };
            msgs.push(msg(flipped, content));
        }
        let text = self.suffix(&msgs, true)?;
        self.backend.encode(&text)
    }

    /// The ids to append to the conversation before the assistant answers `history`'s last (user)
    /// message. `prev_stop` is the stop token the previous answer ended with, if any: the
    /// template's end-of-turn text for it is already in the conversation and is not repeated.
    pub fn assistant_glue(&self, history: &[Turn], prev_stop: Option<u32>) -> Result<Vec<u32>> {
        let prev = history.len().checked_sub(2);
        let Some(prev) = prev else {
            let text = self.suffix(history, true)?;
            return self.backend.encode(&text);
        };
        let mut msgs = history.to_vec();
        msgs[prev].1 = SENTINEL.to_string();
        let text = self.suffix(&msgs, true)?;
        let at = text.rfind(SENTINEL).ok_or_else(|| {
            Error::Config("the chat template drops assistant messages; cannot build turns".into())
        })?;
        let mut glue = &text[at + SENTINEL.len()..];
        if let Some(stop) = prev_stop {
            let stop_text = self.backend.token_text(stop)?;
            if !stop_text.is_empty() {
                glue = glue.strip_prefix(stop_text.as_str()).unwrap_or(glue);
            }
        }
        self.backend.encode(glue)
    }
}
