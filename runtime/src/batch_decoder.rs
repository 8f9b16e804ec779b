//! Continuous batching (Yu et al. 2022, "Orca", iteration-level scheduling): a decode batch that
//! sequences join and leave between steps, for a server whose requests arrive at any time.
//!
//! All sequences of one [`BatchDecoder`] share one resolved prefix (their cartridge set). Each
//! [`BatchDecoder::step`] first decodes one token for every running sequence (one forward of
//! `[running, 1]`), then spends a budget of prompt tokens prefilling waiting sequences, each on
//! its own batch-1 cache in column chunks, so a long prompt never stalls the running batch for
//! more than one budget. A sequence whose prompt is done samples its first token and its cache is
//! [`KvCache::join`]ed to the running batch (left padding re-aligns the lengths, which changes no
//! result). Finished and cancelled sequences leave through [`KvCache::retain`].
//!
//! Every sequence samples with its own seeded [`Sampler`], so its tokens do not depend on what
//! else shares the batch: the result equals [`crate::generate::generate`] on the same prefix.

use std::collections::VecDeque;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::generate::{top_logprobs, FinishReason, GenerateRequest, Sampler};
use crate::kv_cache::KvCache;
use crate::models::{Logits, Transformer};
use crate::ops::Path;
use crate::prefix::PrefixKv;

/// The caller's name for a sequence (unique within one decoder).
pub type SeqId = u64;

/// One generated token of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// Which sequence.
    pub id: SeqId,
    /// The token.
    pub token: u32,
    /// Top-K `(id, logprob)` of the untempered distribution at this position (empty unless the
    /// request asked for them).
    pub top_logprobs: Vec<(u32, f32)>,
    /// Log-probability of `token` under the untempered distribution (only when the request asked
    /// for top log-probabilities; 0 otherwise).
    pub logprob: f32,
    /// Set on the sequence's last token; the sequence has then left the decoder.
    pub finish: Option<FinishReason>,
}

/// A sequence whose prompt is still being prefilled.
struct Waiting {
    id: SeqId,
    request: GenerateRequest,
    cache: KvCache,
    done: usize,
}

/// A sequence in the running batch.
struct Running {
    id: SeqId,
    request: GenerateRequest,
    sampler: Sampler,
    generated: usize,
    last: u32,
}

impl Running {
    /// Sample the next token from this sequence's logits and say whether it ends the sequence.
    fn take(&mut self, logits: &[f32]) -> TokenEvent {
        let token = self.sampler.sample(logits);
        self.generated += 1;
        self.last = token;
        let (top, logprob) = if self.request.top_logprobs > 0 {
            let top = top_logprobs(logits, self.request.top_logprobs);
            let lp = match top.iter().find(|t| t.0 == token) {
                Some(t) => t.1,
                None => logprob_of(logits, token),
            };
            (top, lp)
        } else {
            (Vec::new(), 0.0)
        };
        let finish = if self.request.stop_tokens.contains(&token) {
            Some(FinishReason::StopToken(token))
        } else if self.generated >= self.request.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        TokenEvent {
            id: self.id,
            token,
            top_logprobs: top,
            logprob,
            finish,
        }
    }
}

/// `log softmax(logits)[token]`.
fn logprob_of(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&z| (z as f64 - max).exp()).sum();
    let z = logits
        .get(token as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY) as f64;
    (z - max - sum.ln()) as f32
}

/// A batch of sequences sharing one prefix, decoded step by step; see the module docs.
pub struct BatchDecoder {
    prefix: Option<PrefixKv>,
    num_layers: usize,
    prefill_tokens: usize,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    cache: KvCache,
}

impl std::fmt::Debug for BatchDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchDecoder")
            .field("prefix_len", &self.prefix_len())
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .field("cache_len", &self.cache.len())
            .finish()
    }
}

impl BatchDecoder {
    /// An empty decoder for `model` after `prefix`, prefilling at most `prefill_tokens` prompt
    /// tokens per step (at least 1).
    pub fn new(model: &Transformer, prefix: Option<PrefixKv>, prefill_tokens: usize) -> Self {
        let num_layers = model.config().num_layers;
        Self {
            prefix,
            num_layers,
            prefill_tokens: prefill_tokens.max(1),
            waiting: VecDeque::new(),
            running: Vec::new(),
            cache: KvCache::new(num_layers, 0),
        }
    }

    /// The shared prefix.
    pub fn prefix(&self) -> Option<&PrefixKv> {
        self.prefix.as_ref()
    }

    /// Length of the shared prefix.
    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixKv::len)
    }

    /// Queue a sequence; its prompt is prefilled over the next steps. The prompt must be
    /// non-empty, `max_tokens` at least 1 and `id` not in use.
    pub fn add(&mut self, id: SeqId, request: GenerateRequest) -> Result<()> {
        if request.prompt.is_empty() {
            return Err(Error::Msg("a prompt needs at least one token".into()));
        }
        if request.max_tokens == 0 {
            return Err(Error::Msg("max_tokens must be at least 1".into()));
        }
        if self.contains(id) {
            return Err(Error::Msg(format!("sequence {id} is already in the batch")));
        }
        self.waiting.push_back(Waiting {
            id,
            request,
            cache: KvCache::new(self.num_layers, 1),
            done: 0,
        });
        Ok(())
    }

    /// Whether sequence `id` is waiting or running.
    pub fn contains(&self, id: SeqId) -> bool {
        self.waiting.iter().any(|w| w.id == id) || self.running.iter().any(|r| r.id == id)
    }

    /// Drop sequence `id` (e.g. its client went away); returns whether it was there.
    pub fn cancel(&mut self, id: SeqId) -> Result<bool> {
        if let Some(at) = self.waiting.iter().position(|w| w.id == id) {
            self.waiting.remove(at);
            return Ok(true);
        }
        let Some(at) = self.running.iter().position(|r| r.id == id) else {
            return Ok(false);
        };
        let keep: Vec<usize> = (0..self.running.len()).filter(|&r| r != at).collect();
        self.cache.retain(&keep)?;
        self.running.remove(at);
        Ok(true)
    }

    /// Ids of all sequences, waiting first.
    pub fn ids(&self) -> Vec<SeqId> {
        self.waiting
            .iter()
            .map(|w| w.id)
            .chain(self.running.iter().map(|r| r.id))
            .collect()
    }

    /// Sequences in the running batch.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences still being prefilled.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Waiting plus running sequences.
    pub fn len(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots per running sequence in the batch's cache (padding included).
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// One iteration: a decode step for the running batch, then prefill up to the budget.
    /// Returns the tokens generated, in no particular order across sequences (in order within
    /// one). Sequences whose event carries a `finish` have left.
    pub fn step(&mut self, model: &Transformer) -> Result<Vec<TokenEvent>> {
        let mut events = Vec::new();
        self.decode(model, &mut events)?;
        self.prefill(model, &mut events)?;
        Ok(events)
    }

    fn decode(&mut self, model: &Transformer, events: &mut Vec<TokenEvent>) -> Result<()> {
        let n = self.running.len();
        if n == 0 {
            return Ok(());
        }
        let last: Vec<u32> = self.running.iter().map(|r| r.last).collect();
        let ids = Tensor::from_vec(last, (n, 1), model.device())?;
        let logits = model.forward(
            self.prefix.as_ref(),
            Some(&mut self.cache),
            &ids,
            Logits::Last,
            Path::Infer,
        )?;
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut keep = Vec::with_capacity(n);
        for (row, (seq, z)) in self.running.iter_mut().zip(&rows).enumerate() {
            let event = seq.take(z);
            if event.finish.is_none() {
                keep.push(row);
            }
            events.push(event);
        }
        if keep.len() != n {
            self.cache.retain(&keep)?;
            let mut row = 0;
            self.running.retain(|_| {
                let kept = keep.contains(&row);
                row += 1;
                kept
            });
        }
        Ok(())
    }

    fn prefill(&mut self, model: &Transformer, events: &mut Vec<TokenEvent>) -> Result<()> {
        let mut budget = self.prefill_tokens;
        while budget > 0 {
            let Some(w) = self.waiting.front_mut() else {
                break;
            };
            let len = (w.request.prompt.len() - w.done).min(budget);
            let piece = w.request.prompt[w.done..w.done + len].to_vec();
            let cols = Tensor::from_vec(piece, (1, len), model.device())?;
            let logits = model.forward(
                self.prefix.as_ref(),
                Some(&mut w.cache),
                &cols,
                Logits::Last,
                Path::Infer,
            )?;
            w.done += len;
            budget -= len;
            if w.done < w.request.prompt.len() {
                continue;
            }
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            let z = logits
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?
                .pop()
                .ok_or_else(|| Error::Msg("prefill returned no logits".into()))?;
            let mut seq = Running {
                id: w.id,
                sampler: Sampler::new(w.request.sampling.clone()),
                request: w.request,
                generated: 0,
                last: 0,
            };
            let event = seq.take(&z);
            if event.finish.is_none() {
                self.cache.join(&w.cache)?;
                self.running.push(seq);
            }
            events.push(event);
        }
        Ok(())
    }
}
