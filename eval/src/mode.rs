//! Evaluation modes: what stands in front of the questions, and how a question is rendered after
//! it.
//!
//! Every mode is a prefix stack (cartridges composed in order, then a soft prompt) followed by an
//! optional system message (the corpus for in-context learning, or a soft prompt's summary text):
//!
//! | mode | stack | system message | rendering of a question |
//! |---|---|---|---|
//! | bare | empty | none | the model's template as is (its default system prompt, if any) |
//! | ICL, ICL truncated | empty | the corpus (or its first tokens), as self-study showed it | after that system message |
//! | cartridges | the cartridges | none | after a system message (the cartridge stands in for it, as in training) |
//! | soft prompt | the soft prompt | none | as for cartridges |
//! | soft prompt + summary | the soft prompt | the summary | after the summary |
//!
//! This is what `cartridge generate` and `chat` do, so the numbers describe what a user gets; a
//! mode with an empty stack and no system message is the bare model by construction. The system
//! message's tokens are prefilled once after the stack and become part of the prefix, which is how
//! the self-study teacher saw its chunk.

use std::time::Instant;

use candle_core::Tensor;
use cartridge_runtime::chat_template::{ChatMessage, ChatTemplate};
use cartridge_runtime::models::ModelConfig;
use cartridge_runtime::tokenizer::Tokenizer;
use cartridge_runtime::{KvCache, Logits, Path, PrefixKv, PrefixStack, Transformer};
use serde::{Deserialize, Serialize};

use crate::corpus_context::system_ids;
use crate::error::Result;

/// Tokens per forward when a system message is prefilled (bounds the attention scores' memory).
const PREFILL_CHUNK: usize = 512;

/// Content of the placeholder system message a prefix stands in for (only what the template
/// renders after it is used, as `cartridge generate` does).
const PLACEHOLDER_SYSTEM: &str = "system";

/// The kind of a mode, for tables, plots and the gap computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeKind {
    /// No context at all.
    Bare,
    /// The whole corpus in the prompt (the self-study teacher).
    Icl,
    /// The corpus's first tokens, cut to a KV budget.
    IclTruncated,
    /// One or more KV cartridges, composed.
    Cartridges,
    /// A soft prompt.
    SoftPrompt,
    /// A soft prompt followed by its summary text as the system message.
    SoftPromptSummary,
}

/// One mode to evaluate.
#[derive(Debug, Clone)]
pub struct Mode {
    /// Shown in tables and plots (e.g. `cartridge quenmar.cart`).
    pub name: String,
    /// What kind of mode it is.
    pub kind: ModeKind,
    /// Cartridges, then soft prompts.
    pub stack: PrefixStack,
    /// A system message placed after the stack.
    pub system: Option<String>,
}

impl Mode {
    /// The bare model.
    pub fn bare() -> Self {
        Self {
            name: "bare".into(),
            kind: ModeKind::Bare,
            stack: PrefixStack::new(),
            system: None,
        }
    }

    /// A system message (the corpus, whole or truncated) in front of the questions.
    pub fn icl(name: impl Into<String>, kind: ModeKind, system: String) -> Self {
        Self {
            name: name.into(),
            kind,
            stack: PrefixStack::new(),
            system: Some(system),
        }
    }

    /// Cartridges, composed in the order given (an empty list is the bare model).
    pub fn cartridges(name: impl Into<String>, cartridges: Vec<PrefixKv>) -> Self {
        let mut stack = PrefixStack::new();
        for c in cartridges {
            stack = stack.with_cartridge(c);
        }
        Self {
            name: name.into(),
            kind: ModeKind::Cartridges,
            stack,
            system: None,
        }
    }

    /// A soft prompt `[n, hidden]`, with its summary as the system message when `summary` is given.
    pub fn soft_prompt(
        name: impl Into<String>,
        embeddings: Tensor,
        summary: Option<String>,
    ) -> Self {
        Self {
            name: name.into(),
            kind: if summary.is_some() {
                ModeKind::SoftPromptSummary
            } else {
                ModeKind::SoftPrompt
            },
            stack: PrefixStack::new().with_soft_prompt(embeddings),
            system: summary,
        }
    }
}

/// What a model needs to run a mode: the forward, its tokenizer and chat template.
#[derive(Clone, Copy)]
pub struct EvalModel<'a> {
    /// The forward.
    pub transformer: &'a Transformer,
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The model's chat template.
    pub template: &'a ChatTemplate,
}

impl EvalModel<'_> {
    /// Shapes of the model.
    pub fn config(&self) -> &ModelConfig {
        self.transformer.config()
    }

    /// Bytes of f32 K/V for `tokens` prefix slots: `tokens x layers x 2 x kv_heads x head_dim x 4`.
    pub fn kv_bytes(&self, tokens: usize) -> u64 {
        let c = self.config();
        tokens as u64 * c.num_layers as u64 * 2 * c.num_kv_heads as u64 * c.head_dim as u64 * 4
    }
}

/// How a conversation is turned into text after a mode's prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renderer {
    /// The template as is (no prefix).
    Template,
    /// What the template renders after this system message.
    AfterSystem(String),
}

impl Renderer {
    /// The rendering of `mode` (see the module docs).
    pub fn for_mode(mode: &Mode) -> Self {
        match &mode.system {
            Some(s) => Self::AfterSystem(s.clone()),
            None if !mode.stack.is_empty() => Self::AfterSystem(PLACEHOLDER_SYSTEM.into()),
            None => Self::Template,
        }
    }

    /// Token ids of `messages`, ending with the assistant header when `add_generation_prompt`.
    pub fn chat_ids(
        &self,
        model: EvalModel<'_>,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = match self {
            Self::Template => model.template.render(messages, add_generation_prompt)?,
            Self::AfterSystem(s) => {
                model
                    .template
                    .render_after_system(s, messages, add_generation_prompt)?
            }
        };
        Ok(model.tokenizer.encode(&text, false)?)
    }

    /// Token ids of the prompt that asks `question` (user message, then the assistant header).
    pub fn question_ids(&self, model: EvalModel<'_>, question: &str) -> Result<Vec<u32>> {
        self.chat_ids(model, &[ChatMessage::new("user", question)], true)
    }
}

/// Prefix slots `mode` will have (stack plus system message), without computing any K/V.
pub fn planned_prefix_len(model: EvalModel<'_>, mode: &Mode) -> Result<usize> {
    let system = match &mode.system {
        Some(s) => system_ids(model.template, model.tokenizer, s)?.len(),
        None => 0,
    };
    Ok(mode.stack.len() + system)
}

/// A mode ready to score: its prefix computed.
#[derive(Debug, Clone)]
pub struct PreparedMode {
    /// The prefix in front of every sequence (stack, then the system message's K/V).
    pub prefix: Option<PrefixKv>,
    /// How questions are rendered after it.
    pub renderer: Renderer,
    /// Seconds to compute the prefix (resolving the stack, prefilling the system message).
    pub prepare_secs: f64,
}

impl PreparedMode {
    /// Resolve `mode`'s stack and prefill its system message.
    pub fn new(model: EvalModel<'_>, mode: &Mode) -> Result<Self> {
        let start = Instant::now();
        let stack = mode.stack.resolve(model.transformer, Path::Infer)?;
        let prefix = match &mode.system {
            None => stack,
            Some(system) => {
                let ids = system_ids(model.template, model.tokenizer, system)?;
                let own = prefill(model.transformer, stack.as_ref(), &ids)?;
                match (&stack, own) {
                    (Some(s), Some(o)) => Some(PrefixKv::concat(&[s, &o])?),
                    (s, o) => o.or_else(|| s.clone()),
                }
            }
        };
        Ok(Self {
            prefix,
            renderer: Renderer::for_mode(mode),
            prepare_secs: start.elapsed().as_secs_f64(),
        })
    }

    /// Prefix slots (the user's first position).
    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixKv::len)
    }

    /// Token ids of the prompt that asks `question`.
    pub fn question_ids(&self, model: EvalModel<'_>, question: &str) -> Result<Vec<u32>> {
        self.renderer.question_ids(model, question)
    }
}

/// Per-layer K/V of `ids` placed after `prefix`, prefilled in chunks (`None` for no ids).
fn prefill(
    model: &Transformer,
    prefix: Option<&PrefixKv>,
    ids: &[u32],
) -> Result<Option<PrefixKv>> {
    if ids.is_empty() {
        return Ok(None);
    }
    let mut cache = KvCache::new(model.config().num_layers, 1);
    for piece in ids.chunks(PREFILL_CHUNK) {
        let t = Tensor::from_vec(piece.to_vec(), (1, piece.len()), model.device())?;
        model.forward(prefix, Some(&mut cache), &t, Logits::Last, Path::Infer)?;
    }
    Ok(Some(cache.to_prefix(0)?))
}
