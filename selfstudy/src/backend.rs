//! The generating backend: what the synthesis loop needs from a teacher model, and nothing about
//! where it runs. [`crate::local::LocalBackend`] runs the model in-process; a remote backend (an
//! OpenAI-compatible server with token-id prompts and `top_logprobs`) implements the same trait.
//!
//! Requests come in groups that share a token prefix (the system message holding the chunk): a
//! backend computes that prefix once per group (the local one keeps its K/V; a server's prefix
//! cache hits because the prefix tokens are identical).

use cartridge_formats::ModelFingerprint;

use crate::error::Result;

/// What the synthesis loop needs to know about the teacher.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    /// The teacher's identity (stored in the dataset manifest).
    pub teacher: ModelFingerprint,
    /// Context window in tokens.
    pub context_window: usize,
    /// Token ids that end a message (EOS, `<|im_end|>`, ...).
    pub stop_tokens: Vec<u32>,
}

/// One completion after the shared prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Token ids after the shared prefix (at least one).
    pub prompt: Vec<u32>,
    /// Sampling temperature (`<= 0`: greedy).
    pub temperature: f32,
    /// RNG seed of this completion (its result must not depend on the rest of the batch).
    pub seed: u64,
    /// Stop after this many tokens.
    pub max_tokens: usize,
    /// Record the top-k of the untempered distribution at each generated position (0: none).
    pub top_logprobs: usize,
}

/// The result of one [`Completion`].
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionOutput {
    /// Generated ids, including a final stop token.
    pub tokens: Vec<u32>,
    /// Per generated position, `(id, natural-log probability)`, most probable first.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Whether it ended on a stop token (otherwise it hit `max_tokens`).
    pub stopped: bool,
}

/// The teacher's top-k at one position: `(id, natural-log probability)`, most probable first.
pub type TopK = Vec<(u32, f32)>;

/// An answer the teacher scores instead of writing (teacher forcing), after the shared prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Scoring {
    /// Token ids after the shared prefix, up to where the answer starts (at least one).
    pub prompt: Vec<u32>,
    /// The answer's token ids (at least one).
    pub answer: Vec<u32>,
    /// Width of the top-k recorded before each answer token.
    pub top_logprobs: usize,
}

/// Where the time went, accumulated over calls (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Computing the shared prefixes.
    pub prefix_secs: f64,
    /// Prefilling the per-request prompts and decoding (the next two together).
    pub generate_secs: f64,
    /// Of which: prefilling the per-request prompts, up to the first generated token.
    pub prompt_secs: f64,
    /// Of which: decoding after the first token (includes top-k extraction).
    pub decode_secs: f64,
    /// Prefix tokens computed.
    pub prefix_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
}

impl Timings {
    /// What accumulated since `earlier`.
    pub fn since(&self, earlier: &Timings) -> Timings {
        Timings {
            prefix_secs: self.prefix_secs - earlier.prefix_secs,
            generate_secs: self.generate_secs - earlier.generate_secs,
            prompt_secs: self.prompt_secs - earlier.prompt_secs,
            decode_secs: self.decode_secs - earlier.decode_secs,
            prefix_tokens: self.prefix_tokens.saturating_sub(earlier.prefix_tokens),
            generated_tokens: self
                .generated_tokens
                .saturating_sub(earlier.generated_tokens),
        }
    }
}

/// A teacher model the synthesis loop can drive.
pub trait Backend {
    /// Identity, window and stop tokens.
    fn info(&self) -> &BackendInfo;
    /// Token ids of `text` (no BOS/EOS added; special-token text becomes special ids).
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Text of `ids` (special tokens dropped).
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// Text of one token including special tokens (to recognise a stop token in template text).
    fn token_text(&self, id: u32) -> Result<String>;
    /// Render chat `messages` (`(role, content)`) with the teacher's template.
    fn render_chat(
        &self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String>;
    /// Run `requests`, each placed after the shared token prefix `shared`.
    fn complete(
        &mut self,
        shared: &[u32],
        requests: &[Completion],
    ) -> Result<Vec<CompletionOutput>>;
    /// Whether [`Backend::score`] works (verbatim seeds need it).
    fn can_score(&self) -> bool {
        false
    }
    /// For each request, the teacher's top-k `(id, natural-log probability)` before each of its
    /// answer tokens, most probable first, with `shared ++ prompt` in front.
    fn score(&mut self, _shared: &[u32], _requests: &[Scoring]) -> Result<Vec<Vec<TopK>>> {
        Err(crate::error::Error::Config(
            "this backend cannot score given text; verbatim seeds need the local backend".into(),
        ))
    }
    /// Accumulated timings (zero when the backend does not measure).
    fn timings(&self) -> Timings {
        Timings::default()
    }
}
