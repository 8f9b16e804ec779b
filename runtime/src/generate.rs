//! Generation: sampling (greedy, temperature, top-k, top-p with a seeded RNG — Holtzman et al.
//! 2020, "The Curious Case of Neural Text Degeneration", for nucleus sampling), top-K log-probs of
//! the untempered distribution, stop tokens and stop strings, streaming detokenisation without
//! broken UTF-8, and batched decoding of many sequences that share one prefix stack.
//!
//! # Sampling semantics
//! Given logits `z`: `temperature <= 0` is greedy (the lowest id among equal maxima). Otherwise
//! probabilities are `softmax(z / temperature)`; `top_k = Some(k)` keeps the `k` most probable
//! tokens (ties broken by lower id); `top_p = Some(p)` then keeps the smallest set of most probable
//! tokens whose probability mass (renormalised after top-k) reaches `p` — always at least one.
//! The kept set is renormalised and sampled with the request's own `StdRng` seeded from `seed`,
//! so a request's output does not depend on what else is in the batch.
//!
//! # Batched decoding
//! [`generate_batch`] left-pads the prompts (see [`crate::kv_cache`]), prefills them in chunks,
//! then decodes one token per live sequence per step, dropping finished sequences from the cache.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::models::{Logits, Transformer};
use crate::ops::Path;
use crate::prefix::PrefixKv;

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// `<= 0` means greedy.
    pub temperature: f32,
    /// Keep only the `k` most probable tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most probable tokens with mass `>= p`.
    pub top_p: Option<f32>,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// A sampler: parameters plus the request's own seeded RNG.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler whose RNG is seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// The tokens sampling may pick from and their renormalised probabilities, most probable
    /// first (ties: lower id first). Greedy returns the single argmax with probability 1.
    pub fn candidates(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let p = &self.params;
        if logits.is_empty() {
            return Vec::new();
        }
        if p.temperature <= 0.0 {
            return vec![(argmax(logits), 1.0)];
        }
        let inv_t = 1.0 / p.temperature as f64;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &z)| (i as u32, ((z as f64 - max) * inv_t).exp()))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = p.top_k {
            probs.truncate(k.max(1));
        }
        let total: f64 = probs.iter().map(|x| x.1).sum();
        if let Some(top_p) = p.top_p {
            let mut acc = 0.0;
            let mut keep = 0;
            for (_, q) in &probs {
                acc += q / total;
                keep += 1;
                if acc >= top_p as f64 {
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        let total: f64 = probs.iter().map(|x| x.1).sum();
        probs
            .into_iter()
            .map(|(i, q)| (i, (q / total) as f32))
            .collect()
    }

    /// Pick the next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature > 0.0 && p.top_k.is_none() && p.top_p.is_none() && !logits.is_empty() {
            return self.sample_full(logits);
        }
        let cands = self.candidates(logits);
        if cands.len() == 1 {
            return cands[0].0;
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for &(id, q) in &cands {
            acc += q;
            if r < acc {
                return id;
            }
        }
        // Rounding left the mass a hair under 1: the last candidate takes the remainder.
        cands.last().map_or(0, |c| c.0)
    }

    /// Sample from the whole tempered distribution. Nothing is cut, so no order is needed: the
    /// draw walks the vocabulary in id order (the same distribution as walking the sorted
    /// candidates, without sorting the vocabulary at every step).
    fn sample_full(&mut self, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / self.params.temperature as f64;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let weights: Vec<f64> = logits
            .iter()
            .map(|&z| ((z as f64 - max) * inv_t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let r = self.rng.random::<f64>() * total;
        let mut acc = 0.0;
        let mut last = 0;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                acc += w;
                last = i;
                if r < acc {
                    return i as u32;
                }
            }
        }
        // Rounding left the mass a hair under the total: the last token with any mass takes it.
        last as u32
    }
}

/// Index of the largest value (the lowest index among equal maxima).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` most probable `(id, log-probability)` pairs of `softmax(logits)` (untempered), most
/// probable first; equal logits in id order.
///
/// Self-study calls this at every answer token of every sequence, so it is one pass for the
/// normaliser (a vectorised exp, summed in f64 lanes) and one for the selection, keeping the best
/// `k` in a sorted buffer that most logits fail to enter at the first comparison.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    use crate::cpu_kernel::Elem;
    use std::cmp::Ordering;
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    const LANES: usize = 16;
    let mut acc = [0f64; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&z| (z - max).exp_nonpositive() as f64)
        .sum();
    for c in chunks {
        for (s, &z) in acc.iter_mut().zip(c) {
            *s += (z - max).exp_nonpositive() as f64;
        }
    }
    let lse = max as f64 + (acc.iter().sum::<f64>() + tail).ln();
    // Descending by logit; a later id with an equal logit goes after (ids arrive in order).
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (i, &z) in logits.iter().enumerate() {
        if best.len() == k && z.total_cmp(&best[k - 1].0) != Ordering::Greater {
            continue;
        }
        let at = best.partition_point(|x| x.0.total_cmp(&z) != Ordering::Less);
        best.insert(at, (z, i as u32));
        best.truncate(k);
    }
    best.into_iter()
        .map(|(z, i)| (i, (z as f64 - lse) as f32))
        .collect()
}

/// Streams text from tokens without splitting a UTF-8 character across two chunks.
///
/// Byte-level BPE tokens can end in the middle of a character; decoding them alone yields U+FFFD.
/// We decode a small window of recent tokens and emit only the text that became stable (the
/// incremental scheme of Hugging Face text-generation-inference).
pub struct IncrementalDecoder<F: Fn(&[u32]) -> String> {
    decode: F,
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<F: Fn(&[u32]) -> String> IncrementalDecoder<F> {
    /// A decoder over `decode`, which turns token ids into text.
    pub fn new(decode: F) -> Self {
        Self {
            decode,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Add a token; returns the newly stable text (possibly empty).
    pub fn push(&mut self, token: u32) -> String {
        self.tokens.push(token);
        let prefix = (self.decode)(&self.tokens[self.prefix_offset..self.read_offset]);
        let full = (self.decode)(&self.tokens[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(delta) = full.get(prefix.len()..) {
                if full.starts_with(&prefix) {
                    self.prefix_offset = self.read_offset;
                    self.read_offset = self.tokens.len();
                    return delta.to_string();
                }
            }
        }
        String::new()
    }

    /// The text still held back (an incomplete character at the very end), decoded as is.
    pub fn finish(&mut self) -> String {
        let prefix = (self.decode)(&self.tokens[self.prefix_offset..self.read_offset]);
        let full = (self.decode)(&self.tokens[self.prefix_offset..]);
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        full.get(prefix.len()..).unwrap_or("").to_string()
    }

    /// All tokens pushed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

/// Stop-string detection over streamed text, holding back any tail that could still become a stop
/// string so that a stop string is never partly emitted.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl StopStrings {
    /// Watch for any of `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Add streamed text. Returns the text safe to emit now and whether a stop string was found
    /// (the text up to, not including, the earliest stop string is emitted; nothing after it).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.text.push_str(delta);
        // Search from slightly before the emitted point: a stop string may straddle it.
        if let Some(pos) = find_stop(&self.text, &self.stops) {
            let out = self.text.get(self.emitted..pos).unwrap_or("").to_string();
            self.emitted = pos;
            self.stopped = true;
            return (out, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.text, s))
            .max()
            .unwrap_or(0);
        let mut end = self.text.len() - hold;
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        (out, false)
    }

    /// At the end of generation: whatever was held back.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let out = self.text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = self.text.len();
        out
    }

    /// Whether a stop string was seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }
}

/// Streaming text of one sequence: [`IncrementalDecoder`] followed by [`StopStrings`].
pub struct TextStream<F: Fn(&[u32]) -> String> {
    decoder: IncrementalDecoder<F>,
    stops: StopStrings,
}

impl<F: Fn(&[u32]) -> String> TextStream<F> {
    /// Decode with `decode`, stop at any of `stops`.
    pub fn new(decode: F, stops: Vec<String>) -> Self {
        Self {
            decoder: IncrementalDecoder::new(decode),
            stops: StopStrings::new(stops),
        }
    }

    /// Add a generated token: the text to show now, and whether a stop string was reached (then
    /// return [`Control::Stop`] from the generation callback).
    pub fn push(&mut self, token: u32) -> (String, bool) {
        let delta = self.decoder.push(token);
        self.stops.push(&delta)
    }

    /// At the end: the text still held back (unless a stop string ended the stream).
    pub fn finish(&mut self) -> String {
        let tail = self.decoder.finish();
        let (mut out, stopped) = self.stops.push(&tail);
        if !stopped {
            out.push_str(&self.stops.finish());
        }
        out
    }
}

/// Byte offset of the earliest occurrence of any of `stops` in `text`.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn partial_suffix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| text.as_bytes().ends_with(&stop.as_bytes()[..n]))
        .unwrap_or(0)
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids (at least one), placed after the shared prefix.
    pub prompt: Vec<u32>,
    /// Sampling parameters (each request has its own RNG).
    pub sampling: SamplingParams,
    /// Stop after this many generated tokens.
    pub max_tokens: usize,
    /// Stop when one of these is generated (it is included in the output tokens).
    pub stop_tokens: Vec<u32>,
    /// Record the top-K `(id, logprob)` of the untempered distribution at each generated
    /// position (0: none).
    pub top_logprobs: usize,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    StopToken(u32),
    /// The caller's callback asked to stop (e.g. a stop string).
    Stopped,
    /// `max_tokens` reached.
    Length,
}

/// The result for one sequence.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids (including a final stop token).
    pub tokens: Vec<u32>,
    /// Per generated position, the top-K `(id, logprob)` pairs (empty when not requested).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Why it stopped.
    pub finish: FinishReason,
}

/// What the per-token callback tells the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep going.
    Continue,
    /// Stop this sequence now (the token just reported is kept).
    Stop,
}

/// Options of [`generate_batch`].
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Prefill at most this many tokens (summed over the batch) per forward, bounding the
    /// attention scores' memory.
    pub prefill_tokens: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            prefill_tokens: 2048,
        }
    }
}

/// Generate for many sequences sharing one resolved prefix (`None`: no prefix).
///
/// `on_token(seq, token)` is called for every generated token of request `seq` (in order, per
/// sequence) and may stop that sequence — this is where streaming and stop strings go (see
/// [`IncrementalDecoder`] and [`StopStrings`]). Results come back in request order.
pub fn generate_batch(
    model: &Transformer,
    prefix: Option<&PrefixKv>,
    requests: &[GenerateRequest],
    options: &BatchOptions,
    mut on_token: impl FnMut(usize, u32) -> Control,
) -> Result<Vec<Generation>> {
    let n = requests.len();
    let mut results: Vec<Generation> = (0..n)
        .map(|_| Generation {
            tokens: Vec::new(),
            top_logprobs: Vec::new(),
            finish: FinishReason::Length,
        })
        .collect();
    if requests.iter().any(|r| r.prompt.is_empty()) {
        return Err(Error::Msg("every prompt needs at least one token".into()));
    }
    // Sequences with nothing to generate never enter the batch.
    let mut active: Vec<usize> = (0..n).filter(|&i| requests[i].max_tokens > 0).collect();
    if active.is_empty() {
        return Ok(results);
    }
    let mut samplers: Vec<Sampler> = requests
        .iter()
        .map(|r| Sampler::new(r.sampling.clone()))
        .collect();
    let device = model.device();

    let prompts: Vec<&[u32]> = active
        .iter()
        .map(|&i| requests[i].prompt.as_slice())
        .collect();
    let (mut cache, mut logits) = prefill_prompts(model, prefix, &prompts, options)?;

    loop {
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (row, &i) in active.iter().enumerate() {
            let req = &requests[i];
            let z = &rows[row];
            let tok = samplers[i].sample(z);
            let res = &mut results[i];
            res.tokens.push(tok);
            if req.top_logprobs > 0 {
                res.top_logprobs.push(top_logprobs(z, req.top_logprobs));
            }
            let ctrl = on_token(i, tok);
            if req.stop_tokens.contains(&tok) {
                res.finish = FinishReason::StopToken(tok);
            } else if ctrl == Control::Stop {
                res.finish = FinishReason::Stopped;
            } else if res.tokens.len() >= req.max_tokens {
                res.finish = FinishReason::Length;
            } else {
                keep.push(row);
                next.push(tok);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() != active.len() {
            cache.retain(&keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
        }
        let ids = Tensor::from_vec(next, (active.len(), 1), device)?;
        logits = model.forward(prefix, Some(&mut cache), &ids, Logits::Last, Path::Infer)?;
    }
    Ok(results)
}

/// Prefill `prompts` after `prefix`: one KV cache row and one row of last-position logits per
/// prompt, in order.
///
/// Identical prompts (self-study draws its seed prompts from a small bank) are computed once and
/// copied. The distinct ones are sorted by length and prefilled in groups of similar length, each
/// left-padded to its own longest prompt and joined afterwards, so little work goes to padding.
fn prefill_prompts(
    model: &Transformer,
    prefix: Option<&PrefixKv>,
    prompts: &[&[u32]],
    options: &BatchOptions,
) -> Result<(KvCache, Tensor)> {
    let mut distinct: Vec<&[u32]> = Vec::new();
    let mut row_of: Vec<usize> = Vec::with_capacity(prompts.len());
    for p in prompts {
        match distinct.iter().position(|d| d == p) {
            Some(r) => row_of.push(r),
            None => {
                row_of.push(distinct.len());
                distinct.push(p);
            }
        }
    }
    let mut order: Vec<usize> = (0..distinct.len()).collect();
    order.sort_by_key(|&r| distinct[r].len());

    let mut cache = KvCache::new(model.config().num_layers, 0);
    let mut logits = Vec::new();
    // Position in the joined cache of each distinct prompt.
    let mut slot = vec![0usize; distinct.len()];
    let mut start = 0;
    while start < order.len() {
        let end = length_group_end(&order, start, |r| distinct[r].len());
        let group: Vec<&[u32]> = order[start..end].iter().map(|&r| distinct[r]).collect();
        let (c, l) = prefill_padded(model, prefix, &group, options)?;
        for (i, &r) in order[start..end].iter().enumerate() {
            slot[r] = cache.batch() + i;
        }
        cache.join(&c)?;
        logits.push(l);
        start = end;
    }
    let logits = Tensor::cat(&logits, 0)?;
    let rows: Vec<usize> = row_of.iter().map(|&r| slot[r]).collect();
    if rows.iter().enumerate().any(|(i, &r)| i != r) {
        cache.retain(&rows)?;
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            logits.device(),
        )?;
        return Ok((cache, logits.index_select(&idx, 0)?));
    }
    Ok((cache, logits))
}

/// End of the group that starts at `order[start]` (sorted by length, ascending): the longest
/// prefix of the rest whose padding stays under an eighth of its real tokens.
fn length_group_end(order: &[usize], start: usize, len: impl Fn(usize) -> usize) -> usize {
    let mut real = 0;
    let mut end = start;
    while end < order.len() {
        let longest = len(order[end]);
        let rows = end + 1 - start;
        let with = real + longest;
        if end > start && (rows * longest - with) * 8 > with {
            break;
        }
        real = with;
        end += 1;
    }
    end
}

/// Prefill `prompts` as one left-padded batch, in column chunks of at most
/// `options.prefill_tokens` tokens.
fn prefill_padded(
    model: &Transformer,
    prefix: Option<&PrefixKv>,
    prompts: &[&[u32]],
    options: &BatchOptions,
) -> Result<(KvCache, Tensor)> {
    let device = model.device();
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut grid = vec![0u32; prompts.len() * longest];
    for (row, p) in prompts.iter().enumerate() {
        grid[row * longest + pads[row]..(row + 1) * longest].copy_from_slice(p);
    }
    let grid = Tensor::from_vec(grid, (prompts.len(), longest), device)?;
    let mut cache = KvCache::with_left_padding(model.config().num_layers, pads);
    let chunk = (options.prefill_tokens / prompts.len()).max(1);
    let mut logits = None;
    let mut start = 0;
    while start < longest {
        let len = chunk.min(longest - start);
        let cols = grid.narrow(1, start, len)?;
        logits = Some(model.forward(prefix, Some(&mut cache), &cols, Logits::Last, Path::Infer)?);
        start += len;
    }
    let logits = logits.ok_or_else(|| Error::Msg("empty prefill".into()))?;
    Ok((cache, logits))
}

/// Generate for one prompt; `on_token` as in [`generate_batch`].
pub fn generate(
    model: &Transformer,
    prefix: Option<&PrefixKv>,
    request: &GenerateRequest,
    mut on_token: impl FnMut(u32) -> Control,
) -> Result<Generation> {
    let mut out = generate_batch(
        model,
        prefix,
        std::slice::from_ref(request),
        &BatchOptions::default(),
        |_, t| on_token(t),
    )?;
    out.pop()
        .ok_or_else(|| Error::Msg("generation returned nothing".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_restrict() {
        let logits = [1.0f32, 3.0, 2.0, 0.0, 2.0];
        let s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            top_p: None,
            seed: 1,
        });
        let c: Vec<u32> = s.candidates(&logits).iter().map(|c| c.0).collect();
        // Ties (ids 2 and 4) broken by the lower id.
        assert_eq!(c, vec![1, 2]);
        let s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.5),
            seed: 1,
        });
        // p(1) = e^3 / sum ~ 0.53 >= 0.5: only id 1 survives.
        let c: Vec<u32> = s.candidates(&logits).iter().map(|c| c.0).collect();
        assert_eq!(c, vec![1]);
        let s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.8),
            seed: 1,
        });
        let c: Vec<u32> = s.candidates(&logits).iter().map(|c| c.0).collect();
        assert_eq!(c, vec![1, 2, 4]);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_stays_in_the_kept_set() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_k: Some(5),
            top_p: Some(0.9),
            seed: 42,
        };
        let kept: Vec<u32> = Sampler::new(params.clone())
            .candidates(&logits)
            .iter()
            .map(|c| c.0)
            .collect();
        let mut a = Sampler::new(params.clone());
        let mut b = Sampler::new(params.clone());
        let xa: Vec<u32> = (0..200).map(|_| a.sample(&logits)).collect();
        let xb: Vec<u32> = (0..200).map(|_| b.sample(&logits)).collect();
        assert_eq!(xa, xb);
        assert!(xa.iter().all(|t| kept.contains(t)));
        // More than one token is actually drawn (the sampler is not stuck on the argmax).
        assert!(xa.iter().any(|&t| t != xa[0]));
        let mut c = Sampler::new(SamplingParams { seed: 43, ..params });
        let xc: Vec<u32> = (0..200).map(|_| c.sample(&logits)).collect();
        assert_ne!(xa, xc);
    }

    /// Plain temperature sampling (no cut) draws each token with its tempered probability.
    #[test]
    fn full_distribution_sampling_matches_the_tempered_probabilities() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY, 2.5];
        let params = SamplingParams {
            temperature: 0.7,
            top_k: None,
            top_p: None,
            seed: 9,
        };
        let expected = Sampler::new(params.clone()).candidates(&logits);
        let mut s = Sampler::new(params);
        let n = 20_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(counts[3], 0, "a token without mass was drawn");
        for (id, q) in expected {
            let f = counts[id as usize] as f32 / n as f32;
            // Binomial standard deviation is at most 0.0036 here: 0.015 is over 4 of them.
            assert!(
                (f - q).abs() < 0.015,
                "token {id}: drawn {f}, probability {q}"
            );
        }
    }

    #[test]
    fn top_logprobs_are_normalised_and_sorted() {
        let logits = [0.5f32, 2.0, -1.0, 2.0];
        let t = top_logprobs(&logits, 3);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 0]);
        let total: f32 = logits.iter().map(|&z| (z - 2.0).exp()).sum();
        assert!((t[0].1 - (1.0 / total).ln()).abs() < 1e-6);
        assert_eq!(top_logprobs(&logits, 9).len(), 4);
        assert!(top_logprobs(&logits, 0).is_empty());
    }

    #[test]
    fn top_logprobs_agree_with_a_full_sort_on_a_vocabulary() {
        // A vocabulary-sized row with ties, against sorting every id and an f64 log-sum-exp.
        let mut rng = StdRng::seed_from_u64(7);
        let logits: Vec<f32> = (0..49_157)
            .map(|_| (rng.random::<f32>() * 40.0 - 20.0).round() / 4.0)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + logits
                .iter()
                .map(|&z| (z as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        ids.sort_by(|a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        for k in [1, 20, 100] {
            let got = top_logprobs(&logits, k);
            assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), ids[..k]);
            for &(i, lp) in &got {
                let want = logits[i as usize] as f64 - lse;
                assert!((lp as f64 - want).abs() < 1e-5, "id {i}: {lp} vs {want}");
            }
        }
    }

    #[test]
    fn incremental_decoder_never_splits_a_character() {
        // A byte-level "tokenizer": each token is one byte of UTF-8.
        let text = "héllo €!";
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        let decode = |ids: &[u32]| {
            let b: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            String::from_utf8_lossy(&b).into_owned()
        };
        let mut d = IncrementalDecoder::new(decode);
        let mut out = String::new();
        for &b in &bytes {
            let delta = d.push(b);
            assert!(!delta.contains('\u{FFFD}'), "broken char in {delta:?}");
            out.push_str(&delta);
        }
        out.push_str(&d.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn text_stream_stops_inside_a_token() {
        let decode = |ids: &[u32]| {
            ids.iter()
                .map(|&i| ["he", "llo", " wo", "rld", "!"][i as usize])
                .collect::<String>()
        };
        let mut s = TextStream::new(decode, vec!["o w".into()]);
        let mut out = String::new();
        let mut stopped = false;
        for t in 0..5 {
            let (d, stop) = s.push(t);
            out.push_str(&d);
            if stop {
                stopped = true;
                break;
            }
        }
        out.push_str(&s.finish());
        assert!(stopped);
        assert_eq!(out, "hell");
    }

    #[test]
    fn stop_strings_hold_back_partial_matches() {
        let mut s = StopStrings::new(vec!["</end>".into()]);
        let (a, stop) = s.push("hello </e");
        assert_eq!((a.as_str(), stop), ("hello ", false));
        let (b, stop) = s.push("nd> more");
        assert_eq!((b.as_str(), stop), ("", true));
        let mut s = StopStrings::new(vec!["</end>".into()]);
        let (a, _) = s.push("x </e");
        let (b, stop) = s.push("x");
        assert_eq!(format!("{a}{b}"), "x </ex");
        assert!(!stop);
        assert_eq!(s.finish(), "");
    }
}
