//! The local backend: the teacher runs in this process on the cartridge runtime. The shared
//! prefix (system message with the chunk) is prefilled once in column chunks and kept as a
//! [`PrefixKv`]; every conversation of the chunk then decodes as one batch after it.

use std::time::Instant;

use candle_core::Tensor;
use cartridge_runtime::chat_template::{ChatMessage, ChatTemplate};
use cartridge_runtime::generate::{self, BatchOptions, Control, GenerateRequest, SamplingParams};
use cartridge_runtime::loader::LoadedModel;
use cartridge_runtime::tokenizer::Tokenizer;
use cartridge_runtime::{KvCache, Logits, Path, PrefixKv, Transformer};

use crate::backend::{Backend, BackendInfo, Completion, CompletionOutput, Scoring, Timings, TopK};
use crate::error::{Error, Result};

/// Prefill the shared prefix this many tokens per forward (bounds the attention scores' memory).
const PREFIX_CHUNK: usize = 512;

/// A teacher running on the cartridge runtime.
pub struct LocalBackend {
    model: Transformer,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    info: BackendInfo,
    cached: Option<(Vec<u32>, PrefixKv)>,
    options: BatchOptions,
    timings: Timings,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("teacher", &self.info.teacher.short())
            .field("context_window", &self.info.context_window)
            .finish()
    }
}

/// Token ids that end an assistant message: the tokenizer's EOS ids plus the end-of-turn tokens
/// of common chat formats that exist in the vocabulary.
pub fn stop_tokens(tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = tokenizer.eos_token_ids().to_vec();
    for t in [
        "<|im_end|>",
        "<|eot_id|>",
        "<|endoftext|>",
        "<end_of_turn>",
        "</s>",
    ] {
        if let Some(id) = tokenizer.token_to_id(t) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl LocalBackend {
    /// Build from a loaded model (weights, tokenizer, chat template, fingerprint).
    pub fn new(loaded: LoadedModel) -> Result<Self> {
        let model = Transformer::load(loaded.var_builder(), &loaded.config)?;
        let template = loaded.chat_template.ok_or_else(|| {
            Error::Config(format!(
                "{} has no chat template; self-study needs a chat model",
                loaded.path.display()
            ))
        })?;
        Self::from_parts(model, loaded.tokenizer, template, loaded.fingerprint)
    }

    /// Build from parts (tests, embedders that already hold a model).
    pub fn from_parts(
        model: Transformer,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        teacher: cartridge_formats::ModelFingerprint,
    ) -> Result<Self> {
        let stop = stop_tokens(&tokenizer);
        if stop.is_empty() {
            return Err(Error::Config(
                "the tokenizer names no EOS or end-of-turn token".into(),
            ));
        }
        let info = BackendInfo {
            teacher,
            context_window: model.config().max_position_embeddings,
            stop_tokens: stop,
        };
        Ok(Self {
            model,
            tokenizer,
            template,
            info,
            cached: None,
            options: BatchOptions::default(),
            timings: Timings::default(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// K/V of `shared`, reusing the last one when the tokens are identical (the user-role and
    /// assistant-role calls of one chunk share it).
    fn prefix(&mut self, shared: &[u32]) -> Result<Option<PrefixKv>> {
        if shared.is_empty() {
            return Ok(None);
        }
        if let Some((ids, kv)) = &self.cached {
            if ids == shared {
                return Ok(Some(kv.clone()));
            }
        }
        self.cached = None;
        let t0 = Instant::now();
        let device = self.model.device().clone();
        let mut cache = KvCache::new(self.model.config().num_layers, 1);
        for piece in shared.chunks(PREFIX_CHUNK) {
            let ids = Tensor::from_vec(piece.to_vec(), (1, piece.len()), &device)
                .map_err(cartridge_runtime::Error::from)?;
            self.model
                .forward(None, Some(&mut cache), &ids, Logits::Last, Path::Infer)?;
        }
        let kv = cache.to_prefix(0)?;
        self.timings.prefix_secs += t0.elapsed().as_secs_f64();
        self.timings.prefix_tokens += shared.len() as u64;
        self.cached = Some((shared.to_vec(), kv.clone()));
        Ok(Some(kv))
    }
}

impl Backend for LocalBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false)?)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self.tokenizer.decode(ids, true)?)
    }

    fn token_text(&self, id: u32) -> Result<String> {
        Ok(self.tokenizer.decode(&[id], false)?)
    }

    fn render_chat(
        &self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let msgs: Vec<ChatMessage> = messages
            .iter()
            .map(|(r, c)| ChatMessage::new(r.clone(), c.clone()))
            .collect();
        Ok(self.template.render(&msgs, add_generation_prompt)?)
    }

    fn complete(
        &mut self,
        shared: &[u32],
        requests: &[Completion],
    ) -> Result<Vec<CompletionOutput>> {
        let prefix = self.prefix(shared)?;
        let t0 = Instant::now();
        let reqs: Vec<GenerateRequest> = requests
            .iter()
            .map(|r| GenerateRequest {
                prompt: r.prompt.clone(),
                sampling: SamplingParams {
                    temperature: r.temperature,
                    top_k: None,
                    top_p: None,
                    seed: r.seed,
                },
                max_tokens: r.max_tokens,
                stop_tokens: self.info.stop_tokens.clone(),
                top_logprobs: r.top_logprobs,
            })
            .collect();
        // The first token is reported right after the prompts are prefilled: split the time there.
        let mut first: Option<Instant> = None;
        let out = generate::generate_batch(
            &self.model,
            prefix.as_ref(),
            &reqs,
            &self.options,
            |_, _| {
                first.get_or_insert_with(Instant::now);
                Control::Continue
            },
        )?;
        let end = Instant::now();
        let first = first.unwrap_or(end);
        self.timings.generate_secs += (end - t0).as_secs_f64();
        self.timings.prompt_secs += (first - t0).as_secs_f64();
        self.timings.decode_secs += (end - first).as_secs_f64();
        Ok(out
            .into_iter()
            .map(|g| {
                self.timings.generated_tokens += g.tokens.len() as u64;
                CompletionOutput {
                    stopped: matches!(g.finish, generate::FinishReason::StopToken(_)),
                    tokens: g.tokens,
                    top_logprobs: g.top_logprobs,
                }
            })
            .collect())
    }

    fn can_score(&self) -> bool {
        true
    }

    fn score(&mut self, shared: &[u32], requests: &[Scoring]) -> Result<Vec<Vec<TopK>>> {
        let prefix = self.prefix(shared)?;
        let t0 = Instant::now();
        let device = self.model.device().clone();
        let mut out = Vec::with_capacity(requests.len());
        for r in requests {
            if r.prompt.is_empty() || r.answer.is_empty() {
                return Err(Error::Backend(
                    "a scored answer needs a prompt and at least one token".into(),
                ));
            }
            // The logits before answer token i sit at position prompt.len() - 1 + i; the last
            // answer token predicts nothing we keep, so it is not fed.
            let mut ids = r.prompt.clone();
            ids.extend_from_slice(&r.answer[..r.answer.len() - 1]);
            let n = ids.len();
            let x =
                Tensor::from_vec(ids, (1, n), &device).map_err(cartridge_runtime::Error::from)?;
            let logits = self
                .model
                .forward(prefix.as_ref(), None, &x, Logits::All, Path::Infer)?;
            let rows = logits
                .squeeze(0)
                .and_then(|l| l.narrow(0, r.prompt.len() - 1, r.answer.len()))
                .and_then(|l| l.to_dtype(candle_core::DType::F32))
                .and_then(|l| l.to_vec2::<f32>())
                .map_err(cartridge_runtime::Error::from)?;
            out.push(
                rows.iter()
                    .map(|row| generate::top_logprobs(row, r.top_logprobs))
                    .collect(),
            );
        }
        let secs = t0.elapsed().as_secs_f64();
        self.timings.generate_secs += secs;
        self.timings.prompt_secs += secs;
        Ok(out)
    }

    fn timings(&self) -> Timings {
        self.timings
    }
}
