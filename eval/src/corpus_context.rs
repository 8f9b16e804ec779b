//! The corpus as in-context learning sees it: exactly the self-study teacher's system message
//! (`cartridge_selfstudy::prompt::system_message` around the chunk text, file names under `###`
//! lines) over the whole corpus, or over its first tokens so that the message fits a KV budget.
//!
//! With the whole corpus in one chunk (a corpus no longer than self-study's largest chunk), this
//! mode *is* the teacher, so its KL to the recorded top-k is zero up to float rounding.

use cartridge_formats::dataset::{ChunkLocation, ChunkPiece};
use cartridge_runtime::chat_template::{ChatMessage, ChatTemplate};
use cartridge_runtime::tokenizer::Tokenizer;
use cartridge_selfstudy::chunk::{TokenizedCorpus, TokenizedFile};
use cartridge_selfstudy::prompt::system_message;
use cartridge_selfstudy::Corpus;

use crate::error::{Error, Result};

/// A corpus tokenised as self-study tokenises it.
#[derive(Debug, Clone)]
pub struct CorpusContext {
    tokenized: TokenizedCorpus,
    description: Option<String>,
    digest: String,
}

/// The token ids of `system` rendered as a system message by the model's template: what the
/// teacher prefilled before every conversation of a chunk.
pub fn system_ids(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    system: &str,
) -> Result<Vec<u32>> {
    let text = template.render(&[ChatMessage::new("system", system)], false)?;
    Ok(tokenizer.encode(&text, false)?)
}

impl CorpusContext {
    /// Tokenise `corpus` file by file (as self-study does); `description` is the one-line
    /// description synthesis was given, if any.
    pub fn new(
        corpus: &Corpus,
        tokenizer: &Tokenizer,
        description: Option<String>,
    ) -> Result<Self> {
        let mut files = Vec::with_capacity(corpus.files.len());
        for f in &corpus.files {
            let tokens = tokenizer.encode(&f.text, false)?;
            if !tokens.is_empty() {
                files.push(TokenizedFile {
                    path: f.path.clone(),
                    tokens,
                });
            }
        }
        Ok(Self {
            tokenized: TokenizedCorpus::from_files(files)?,
            description,
            digest: corpus.digest.clone(),
        })
    }

    /// Corpus tokens.
    pub fn tokens(&self) -> u64 {
        self.tokenized.total()
    }

    /// `sha256:<hex>` of the corpus (compare with a dataset manifest's `corpus_digest`).
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The system message over the first `n` corpus tokens (the whole corpus when `n` is at least
    /// [`Self::tokens`]).
    pub fn system_message(&self, n: u64, tokenizer: &Tokenizer) -> Result<String> {
        let mut pieces = Vec::new();
        let mut left = n;
        for f in &self.tokenized.files {
            if left == 0 {
                break;
            }
            let take = left.min(f.tokens.len() as u64);
            pieces.push(ChunkPiece {
                file: f.path.clone(),
                start: 0,
                end: take,
            });
            left -= take;
        }
        let location = ChunkLocation { chunk: 0, pieces };
        let text = self
            .tokenized
            .chunk_text_with(&location, |ids| Ok(tokenizer.decode(ids, true)?))?;
        Ok(system_message(&text, self.description.as_deref()))
    }

    /// The system message over the longest leading part of the corpus whose rendered message
    /// has at most `budget` tokens, with the number of corpus tokens it holds; `None` when not
    /// even one corpus token fits.
    pub fn truncated(
        &self,
        budget: usize,
        tokenizer: &Tokenizer,
        template: &ChatTemplate,
    ) -> Result<Option<(String, u64)>> {
        let empty = system_ids(template, tokenizer, &self.system_message(0, tokenizer)?)?.len();
        let mut n = (budget.saturating_sub(empty) as u64).min(self.tokens());
        // Decoding and re-encoding can merge or split tokens at the seams (and file headers add
        // some): shrink by the excess until the message fits.
        while n > 0 {
            let system = self.system_message(n, tokenizer)?;
            let len = system_ids(template, tokenizer, &system)?.len();
            if len <= budget {
                return Ok(Some((system, n)));
            }
            n = n.saturating_sub((len - budget) as u64);
        }
        Ok(None)
    }
}

/// The `description` a dataset manifest's synthesis settings carry, if any.
pub fn manifest_description(settings: &serde_json::Value) -> Result<Option<String>> {
    match settings.get("description") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Error::Config(format!(
            "the dataset manifest's description is not a string: {other}"
        ))),
    }
}
