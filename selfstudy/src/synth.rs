//! The synthesis loop (DESIGN.md §4): per chunk, many conversations decoded as one batch after the
//! chunk's system message (computed once); the user role writes a message from the seed prompt at
//! a temperature, the assistant role answers (greedy by default) while the teacher's untempered
//! top-k is recorded at every answer token; records are appended to the dataset shards.
//!
//! # Determinism and resume
//! Conversation `id` belongs to chunk `id / batch`; everything about chunk `j` (window, seeds,
//! sampling seeds) comes from an RNG seeded by `(seed, j)` alone. A resumed run therefore
//! regenerates exactly the conversations that are missing and writes only those: nothing is lost
//! and nothing is stored twice.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cartridge_formats::dataset::{
    ChunkLocation, ChunkPiece, DatasetError, DatasetWriter, Manifest, Message, Record,
    DEFAULT_SHARD_BYTES,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Completion, CompletionOutput, Scoring, Timings};
use crate::chunk::{draw_chunk, location_tokens, passage, ChunkSizes, TokenizedCorpus};
use crate::corpus::Corpus;
use crate::error::{Error, Result};
use crate::prompt::{focused_seed, system_message, ChatFrame, Turn};
use crate::seeds::{Seed, SeedBank, SeedKind, SeedWeights, OPENING, RECALL_FOLLOW_UP};

/// Everything that decides what gets synthesised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthesisConfig {
    /// Conversations in the dataset (ids `0..num_conversations`).
    pub num_conversations: u64,
    /// Conversations per chunk, decoded as one batch after one prefill of the chunk.
    pub batch: usize,
    /// Smallest chunk, in tokens.
    pub chunk_min_tokens: usize,
    /// Largest chunk, in tokens (clipped to the model's window minus the conversation's room).
    pub chunk_max_tokens: usize,
    /// One line describing the corpus, shown before every chunk.
    pub description: Option<String>,
    /// Weights of the seed-prompt kinds.
    pub seed_weights: SeedWeights,
    /// Extra seed phrasings (e.g. from a seed file).
    pub extra_seeds: Vec<(SeedKind, String)>,
    /// User/assistant exchanges per conversation.
    pub turns: usize,
    /// Temperature of the user role.
    pub user_temperature: f32,
    /// Temperature of the assistant role (`<= 0`: greedy).
    pub assistant_temperature: f32,
    /// Longest user message, in tokens.
    pub max_user_tokens: usize,
    /// Longest answer, in tokens.
    pub max_answer_tokens: usize,
    /// Teacher top-k recorded per answer token.
    pub top_k: usize,
    /// Seed of everything random.
    pub seed: u64,
    /// Show the simulated user a passage of this many tokens of the chunk, drawn per
    /// conversation, with its seed instruction (0: none). Questions then spread over the chunk;
    /// the teacher still answers with the whole chunk in context. Left out of the stored
    /// settings when 0, so datasets made before it existed still resume.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub focus_tokens: usize,
    /// Start a new shard when the current one exceeds this many bytes.
    pub shard_bytes: u64,
}

impl Default for SynthesisConfig {
    fn default() -> Self {
        Self {
            num_conversations: 256,
            batch: 16,
            chunk_min_tokens: 512,
            chunk_max_tokens: 4096,
            description: None,
            seed_weights: SeedWeights::default(),
            extra_seeds: Vec::new(),
            turns: 1,
            user_temperature: 0.6,
            assistant_temperature: 0.0,
            max_user_tokens: 128,
            max_answer_tokens: 384,
            top_k: 20,
            seed: 0,
            focus_tokens: 0,
            shard_bytes: DEFAULT_SHARD_BYTES,
        }
    }
}

impl SynthesisConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if self.num_conversations == 0 {
            return bad("ask for at least one conversation");
        }
        if self.batch == 0 {
            return bad("batch (conversations per chunk) must be at least 1");
        }
        if self.turns == 0 {
            return bad("turns must be at least 1");
        }
        if self.max_user_tokens == 0 || self.max_answer_tokens == 0 {
            return bad("message lengths must be at least 1 token");
        }
        if self.top_k == 0 || self.top_k > cartridge_formats::dataset::record::MAX_TOP_K as usize {
            return bad("top-k must be in 1..=1024");
        }
        if !self.user_temperature.is_finite() || !self.assistant_temperature.is_finite() {
            return bad("temperatures must be finite");
        }
        Ok(())
    }

    /// Tokens a chunk must leave free in the window: every turn's messages plus headers and the
    /// seed prompt.
    fn room(&self) -> usize {
        let passage_room = if self.focus_tokens > 0 {
            self.focus_tokens + 32
        } else {
            0
        };
        self.turns * (self.max_user_tokens + self.max_answer_tokens + 32) + 256 + passage_room
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Where the run is, reported after every chunk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    /// Conversations in the dataset now (including those found on resume).
    pub done: u64,
    /// Conversations asked for.
    pub total: u64,
    /// Conversations written by this run.
    pub written: u64,
    /// Answer tokens (targets) written by this run.
    pub answer_tokens: u64,
    /// Seconds since the run started.
    pub elapsed_secs: f64,
    /// Answer tokens per second in this run.
    pub answer_tokens_per_sec: f64,
    /// Estimated seconds left.
    pub eta_secs: Option<f64>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The dataset folder.
    pub out_dir: PathBuf,
    /// Conversations asked for.
    pub total: u64,
    /// Conversations written by this run.
    pub written: u64,
    /// Conversations already present (resume).
    pub already_present: u64,
    /// Chunks synthesised by this run.
    pub chunks: u64,
    /// Answer (target) tokens written by this run.
    pub answer_tokens: u64,
    /// Token ids written by this run (what training reads).
    pub tokens: u64,
    /// Wall time of the run.
    pub elapsed_secs: f64,
    /// Answer tokens per second.
    pub answer_tokens_per_sec: f64,
    /// The backend's time split during this run.
    pub timings: Timings,
    /// Text files in the corpus.
    pub corpus_files: usize,
    /// Tokens in the corpus.
    pub corpus_tokens: u64,
    /// Binary files skipped.
    pub skipped_binary: usize,
    /// Files with invalid UTF-8 skipped or decoded lossily.
    pub invalid_utf8: usize,
    /// The corpus digest.
    pub corpus_digest: String,
    /// Bytes of a torn record dropped on resume.
    pub dropped_torn_bytes: u64,
    /// The chunk window actually used (after clipping).
    pub chunk_tokens: (usize, usize),
}

/// Per-chunk RNG seed: SplitMix64 of the run seed and the chunk number, so chunks are
/// independent of each other and of how many ran before.
fn chunk_seed(seed: u64, chunk: u64) -> u64 {
    let mut z = seed
        ^ chunk
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixed with a conversation's base seed to place its passage (`focus_tokens`).
const FOCUS_STREAM: u64 = 0xF0C5;

/// Mixed with a conversation's base seed to place a recall seed's quoted opening.
const RECALL_STREAM: u64 = 0x2EC4;

/// Tokens of the chunk a recall opening is cut from, and the whole words it keeps.
const OPENING_TOKENS: u64 = 24;
const OPENING_WORDS: usize = 8;

/// A passage of up to `len` tokens of the chunk, placed from a conversation's own seed mixed
/// with `stream`, so it never depends on the other conversations' draws.
fn placed_passage(
    location: &ChunkLocation,
    base_seed: u64,
    stream: u64,
    len: u64,
) -> ChunkLocation {
    let span = location_tokens(location);
    let len = len.min(span);
    passage(
        location,
        chunk_seed(base_seed, stream) % (span - len + 1),
        len,
    )
}

/// `text` from its first whole word on (a cut token range may start mid-word: a leading partial
/// word is dropped unless `whole_start` says the text starts at a word), leading white space
/// trimmed.
fn from_first_whole_word(text: &str, whole_start: bool) -> &str {
    let mut rest = text;
    if !whole_start && !text.starts_with(char::is_whitespace) {
        if let Some(i) = text.find(char::is_whitespace) {
            rest = &text[i..];
        }
    }
    rest.trim_start()
}

/// `text` without a partial word at either end: a leading one as [`from_first_whole_word`], a
/// trailing one unless the text ends in white space (kept whole when it is one word), and
/// surrounding white space.
fn whole_words(text: &str, whole_start: bool) -> &str {
    let rest = from_first_whole_word(text, whole_start);
    if !rest.ends_with(char::is_whitespace) {
        if let Some(i) = rest.rfind(char::is_whitespace) {
            return rest[..i].trim_end();
        }
    }
    rest.trim_end()
}

/// Up to `words` whole words from the start of `text`, as written there (line breaks kept). A cut
/// token range may start and end mid-word: a leading partial word is dropped unless `whole_start`
/// says the text starts at a word, and a last word with no space after it is dropped unless it
/// is the only one.
fn opening_words(text: &str, whole_start: bool, words: usize) -> String {
    let rest = from_first_whole_word(text, whole_start);
    let (mut seen, mut end) = (0, 0);
    let mut in_word = false;
    for (i, ch) in rest.char_indices() {
        if ch.is_whitespace() {
            if in_word {
                seen += 1;
                end = i;
                if seen == words {
                    break;
                }
            }
            in_word = false;
        } else {
            in_word = true;
        }
    }
    if seen == 0 {
        return rest.trim_end().to_string();
    }
    rest[..end].to_string()
}

/// The settings that must match to resume (everything but the count, which may grow).
fn resume_key(cfg: &SynthesisConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).unwrap_or(serde_json::Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("num_conversations");
        o.remove("shard_bytes");
    }
    v
}

/// One conversation being built.
struct Conv {
    id: u64,
    seed: Seed,
    base_seed: u64,
    history: Vec<Turn>,
    tokens: Vec<u32>,
    targets: Vec<(u32, u32)>,
    topk_ids: Vec<u32>,
    topk_logprobs: Vec<f32>,
    top_k: Option<usize>,
    prev_stop: Option<u32>,
    /// A verbatim seed's first answer (never empty): the excerpt's own text, as token ids,
    /// scored rather than generated.
    verbatim: Option<Vec<u32>>,
}

/// Synthesise `config.num_conversations` conversations about `corpus` with `backend` into the
/// dataset folder `out_dir`. With `resume`, an existing dataset is continued (same teacher,
/// corpus and settings required); without, `out_dir` must not hold one. `progress` is called
/// after every chunk.
pub fn synthesize(
    config: &SynthesisConfig,
    backend: &mut dyn Backend,
    corpus: &Corpus,
    out_dir: &Path,
    resume: bool,
    mut progress: impl FnMut(&Progress),
) -> Result<Summary> {
    config.validate()?;
    let start = Instant::now();
    let timings_before = backend.timings();
    let info = backend.info().clone();
    let sizes = ChunkSizes::clipped(
        config.chunk_min_tokens,
        config.chunk_max_tokens,
        info.context_window,
        config.room(),
    )?;
    let bank = SeedBank::new(config.seed_weights, config.extra_seeds.clone())?;
    if config.seed_weights.verbatim > 0.0 && !backend.can_score() {
        return Err(Error::Config(
            "verbatim seeds need a backend that scores given text (the local one); this one \
             only generates"
                .into(),
        ));
    }
    let tokenized = TokenizedCorpus::new(corpus, &*backend)?;

    let settings = serde_json::to_value(config).map_err(|e| Error::Config(e.to_string()))?;
    let (writer, present, dropped) = if resume && out_dir.join("manifest.json").exists() {
        let (w, state) = DatasetWriter::resume(out_dir, &info.teacher, &corpus.digest)?;
        let stored: SynthesisConfig = serde_json::from_value(w.manifest().settings.clone())
            .map_err(|e| Error::Config(format!("the dataset's settings are unreadable: {e}")))?;
        if resume_key(&stored) != resume_key(config) {
            return Err(Error::Config(
                "the settings differ from those the dataset was made with; resume with the same \
                 settings (only the number of conversations may change)"
                    .into(),
            ));
        }
        (w, state.ids, state.dropped_torn_bytes)
    } else {
        let created = cartridge_formats::time::now_rfc3339();
        let manifest = Manifest::new(info.teacher.clone(), &corpus.digest, created, settings);
        let w = DatasetWriter::create(out_dir, manifest).map_err(|e| match e {
            DatasetError::AlreadyExists { dir } => Error::Config(format!(
                "{} already holds a dataset: pass --resume to continue it, or choose another folder",
                dir.display()
            )),
            other => Error::Dataset(other),
        })?;
        (w, BTreeSet::new(), 0)
    };
    let mut writer = writer.with_shard_cap(config.shard_bytes);

    let total = config.num_conversations;
    let already_present = present.range(..total).count() as u64;
    let batch = config.batch as u64;
    let n_chunks = total.div_ceil(batch);
    let mut summary = Summary {
        out_dir: out_dir.to_path_buf(),
        total,
        written: 0,
        already_present,
        chunks: 0,
        answer_tokens: 0,
        tokens: 0,
        elapsed_secs: 0.0,
        answer_tokens_per_sec: 0.0,
        timings: Timings::default(),
        corpus_files: corpus.files.len(),
        corpus_tokens: tokenized.total(),
        skipped_binary: corpus.skipped_binary,
        invalid_utf8: corpus.invalid_utf8.len(),
        corpus_digest: corpus.digest.clone(),
        dropped_torn_bytes: dropped,
        chunk_tokens: (sizes.min, sizes.max),
    };
    let to_write = total - already_present;
    for j in 0..n_chunks {
        let ids: Vec<u64> = (j * batch..((j + 1) * batch).min(total)).collect();
        if ids.iter().all(|id| present.contains(id)) {
            continue;
        }
        let mut rng = StdRng::seed_from_u64(chunk_seed(config.seed, j));
        let location = draw_chunk(&tokenized, sizes, j, &mut rng);
        // Draw for every id of the chunk (present or not) so each id's draws never change.
        let mut convs: Vec<Conv> = Vec::new();
        for &id in &ids {
            let seed = bank.draw(&mut rng);
            let base_seed: u64 = rng.random();
            if !present.contains(&id) {
                convs.push(Conv {
                    id,
                    seed,
                    base_seed,
                    history: Vec::new(),
                    tokens: Vec::new(),
                    targets: Vec::new(),
                    topk_ids: Vec::new(),
                    topk_logprobs: Vec::new(),
                    top_k: None,
                    prev_stop: None,
                    verbatim: None,
                });
            }
        }
        let records = synthesize_chunk(config, backend, &tokenized, &location, convs)?;
        for r in &records {
            writer.append(r)?;
            summary.written += 1;
            summary.answer_tokens += r.num_targets() as u64;
            summary.tokens += r.tokens.len() as u64;
        }
        writer.sync()?;
        summary.chunks += 1;
        let elapsed = start.elapsed().as_secs_f64();
        let rate = summary.answer_tokens as f64 / elapsed.max(1e-9);
        let left = to_write - summary.written;
        progress(&Progress {
            done: already_present + summary.written,
            total,
            written: summary.written,
            answer_tokens: summary.answer_tokens,
            elapsed_secs: elapsed,
            answer_tokens_per_sec: rate,
            eta_secs: (summary.written > 0).then(|| elapsed / summary.written as f64 * left as f64),
        });
    }
    summary.elapsed_secs = start.elapsed().as_secs_f64();
    summary.answer_tokens_per_sec = summary.answer_tokens as f64 / summary.elapsed_secs.max(1e-9);
    summary.timings = backend.timings().since(&timings_before);
    Ok(summary)
}

/// A verbatim answer's span of the chunk: a window of up to `len` tokens whose start is drawn so
/// that every token of the chunk (but the first and last few) is equally likely to fall in it,
/// the window hanging over either end of the chunk and cut there (keeping at least
/// `OPENING_TOKENS`); then the longest one-file piece of it. A window placed wholly inside the
/// chunk would reach the chunk's first tokens, and with them the first lines of the corpus,
/// once in `len` draws.
fn verbatim_passage(location: &ChunkLocation, base_seed: u64, len: u64) -> ChunkLocation {
    let span = location_tokens(location);
    let len = len.min(span);
    let keep = OPENING_TOKENS.min(len);
    // Window starts `s - (len - keep)` for `s` in `0..=span + len - 2 keep`.
    let s = chunk_seed(base_seed, RECALL_STREAM) % (span + len - 2 * keep + 1);
    let from = s.saturating_sub(len - keep);
    let to = (s + keep).min(span);
    let window = passage(location, from, to - from);
    let mut longest: Option<ChunkPiece> = None;
    for p in window.pieces {
        if longest
            .as_ref()
            .is_none_or(|l| p.end - p.start > l.end - l.start)
        {
            longest = Some(p);
        }
    }
    ChunkLocation {
        chunk: location.chunk,
        pieces: longest.into_iter().collect(),
    }
}

/// Largest `max_tokens` that keeps `shared + prompt + generated` inside the window.
fn fit(window: usize, shared: usize, prompt: usize, want: usize) -> Result<usize> {
    let left = window.saturating_sub(shared + prompt);
    if left == 0 {
        return Err(Error::Config(format!(
            "a prompt of {} tokens fills the model's {window}-token window; lower the chunk size",
            shared + prompt
        )));
    }
    Ok(want.min(left))
}

/// Run every turn of the conversations of one chunk; returns their records in id order.
fn synthesize_chunk(
    config: &SynthesisConfig,
    backend: &mut dyn Backend,
    tokenized: &TokenizedCorpus,
    location: &ChunkLocation,
    mut convs: Vec<Conv>,
) -> Result<Vec<Record>> {
    let window = backend.info().context_window;
    let stops = backend.info().stop_tokens.clone();
    let text = tokenized.chunk_text(location, &*backend)?;
    let system = system_message(&text, config.description.as_deref());
    for c in convs.iter_mut().filter(|c| c.seed.kind.is_fixed_message()) {
        // The user's message is the phrasing itself, quoting a few words from a random place;
        // a verbatim answer is the text from there on.
        let cut = match c.seed.kind {
            SeedKind::Verbatim => {
                verbatim_passage(location, c.base_seed, config.max_answer_tokens as u64)
            }
            _ => placed_passage(location, c.base_seed, RECALL_STREAM, OPENING_TOKENS),
        };
        // Only a file's first token surely starts a word (a chunk may start mid-word).
        let (cut, whole_start) = tokenized.first_piece_text(&cut, &*backend)?;
        let opening = if c.seed.kind == SeedKind::Verbatim {
            let answer = whole_words(&cut, whole_start);
            let opening = opening_words(answer, true, OPENING_WORDS);
            c.verbatim = Some(backend.encode(answer)?).filter(|ids| !ids.is_empty());
            opening
        } else {
            opening_words(&cut, whole_start, OPENING_WORDS)
        };
        c.seed.text = c.seed.text.replace(OPENING, &opening);
    }
    if config.focus_tokens > 0 {
        for c in convs.iter_mut().filter(|c| !c.seed.kind.is_fixed_message()) {
            let shown = placed_passage(
                location,
                c.base_seed,
                FOCUS_STREAM,
                config.focus_tokens as u64,
            );
            let shown = tokenized.chunk_text(&shown, &*backend)?;
            c.seed.text = focused_seed(&c.seed.text, &shown);
        }
    }
    // Prompts are built first (they borrow the backend immutably), then sent.
    let shared = ChatFrame::new(&*backend, system.clone())?
        .system_ids()
        .to_vec();
    for turn in 0..config.turns {
        // User role. A fixed-message seed is the first message as it stands.
        let writes = |c: &Conv| turn > 0 || !c.seed.kind.is_fixed_message();
        let reqs = {
            let frame = ChatFrame::new(&*backend, system.clone())?;
            convs
                .iter()
                .filter(|c| writes(c))
                .map(|c| {
                    let instruction = if c.seed.kind.is_fixed_message() {
                        RECALL_FOLLOW_UP
                    } else {
                        &c.seed.text
                    };
                    let prompt = frame.user_role_prompt(instruction, &c.history)?;
                    let max_tokens =
                        fit(window, shared.len(), prompt.len(), config.max_user_tokens)?;
                    Ok(Completion {
                        prompt,
                        temperature: config.user_temperature,
                        seed: c.base_seed.wrapping_add(2 * turn as u64),
                        max_tokens,
                        top_logprobs: 0,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        let outs = if reqs.is_empty() {
            Vec::new()
        } else {
            backend.complete(&shared, &reqs)?
        };
        let mut outs = outs.iter();
        for c in convs.iter_mut() {
            let text = if writes(c) {
                let o = outs
                    .next()
                    .ok_or_else(|| Error::Backend("fewer user messages than requests".into()))?;
                backend.decode(&o.tokens)?
            } else {
                c.seed.text.clone()
            };
            c.history.push(("user".into(), text.trim().to_string()));
        }
        // Assistant role: answers written by the teacher, and (a verbatim seed's first turn)
        // the excerpt's own text scored by it.
        let (reqs, scorings) = {
            let frame = ChatFrame::new(&*backend, system.clone())?;
            let (mut reqs, mut scorings) = (Vec::new(), Vec::new());
            for c in convs.iter_mut() {
                let glue = frame.assistant_glue(&c.history, c.prev_stop)?;
                c.tokens.extend_from_slice(&glue);
                let max_tokens = fit(
                    window,
                    shared.len(),
                    c.tokens.len(),
                    config.max_answer_tokens,
                )?;
                match c.verbatim.as_ref().filter(|_| turn == 0) {
                    Some(ids) => scorings.push(Scoring {
                        prompt: c.tokens.clone(),
                        answer: ids[..ids.len().min(max_tokens)].to_vec(),
                        top_logprobs: config.top_k,
                    }),
                    None => reqs.push(Completion {
                        prompt: c.tokens.clone(),
                        temperature: config.assistant_temperature,
                        seed: c.base_seed.wrapping_add(2 * turn as u64 + 1),
                        max_tokens,
                        top_logprobs: config.top_k,
                    }),
                }
            }
            (reqs, scorings)
        };
        let generated = if reqs.is_empty() {
            Vec::new()
        } else {
            backend.complete(&shared, &reqs)?
        };
        let scored = if scorings.is_empty() {
            Vec::new()
        } else {
            backend.score(&shared, &scorings)?
        };
        if generated.len() != reqs.len() || scored.len() != scorings.len() {
            return Err(Error::Backend("fewer answers than requests".into()));
        }
        let mut scored =
            scorings
                .into_iter()
                .zip(scored)
                .map(|(s, top_logprobs)| CompletionOutput {
                    tokens: s.answer,
                    top_logprobs,
                    stopped: false,
                });
        let mut generated = generated.into_iter();
        let mut outs = Vec::with_capacity(convs.len());
        for c in &convs {
            let next = if turn == 0 && c.verbatim.is_some() {
                scored.next()
            } else {
                generated.next()
            };
            outs.push(next.ok_or_else(|| Error::Backend("fewer answers than requests".into()))?);
        }
        for (c, o) in convs.iter_mut().zip(outs) {
            if o.top_logprobs.len() != o.tokens.len() {
                return Err(Error::Backend(format!(
                    "{} answer tokens but {} top-k rows",
                    o.tokens.len(),
                    o.top_logprobs.len()
                )));
            }
            let start = c.tokens.len() as u32;
            for row in &o.top_logprobs {
                let k = *c.top_k.get_or_insert(row.len());
                if row.len() != k || k == 0 {
                    return Err(Error::Backend(format!(
                        "top-k rows of different widths ({} and {k})",
                        row.len()
                    )));
                }
                for &(id, lp) in row {
                    c.topk_ids.push(id);
                    c.topk_logprobs.push(lp);
                }
            }
            c.targets.push((start, o.tokens.len() as u32));
            c.tokens.extend_from_slice(&o.tokens);
            let answer = backend.decode(&o.tokens)?;
            c.history
                .push(("assistant".into(), answer.trim().to_string()));
            c.prev_stop = o
                .tokens
                .last()
                .copied()
                .filter(|t| o.stopped && stops.contains(t));
        }
    }
    Ok(convs
        .into_iter()
        .map(|c| Record {
            id: c.id,
            seed_kind: c.seed.kind.name().to_string(),
            seed_prompt: c.seed.text,
            location: location.clone(),
            messages: c
                .history
                .into_iter()
                .map(|(role, content)| Message { role, content })
                .collect(),
            tokens: c.tokens,
            targets: c.targets,
            top_k: c.top_k.unwrap_or(1) as u32,
            topk_ids: c.topk_ids,
            topk_logprobs: c.topk_logprobs,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::{opening_words, verbatim_passage, whole_words};
    use cartridge_formats::dataset::{ChunkLocation, ChunkPiece};

    /// Over many draws, every token of a two-file chunk but the outermost few is in a verbatim
    /// answer about as often as any other, the first lines of the second file included.
    #[test]
    fn verbatim_passages_cover_the_chunk_evenly() {
        let piece = |file: &str, start, end| ChunkPiece {
            file: file.into(),
            start,
            end,
        };
        let location = ChunkLocation {
            chunk: 0,
            pieces: vec![piece("a", 0, 300), piece("b", 0, 300)],
        };
        let mut hits = vec![0u32; 600];
        let draws = 20_000;
        for seed in 0..draws {
            let p = verbatim_passage(&location, seed, 100);
            assert_eq!(p.pieces.len(), 1);
            let q = &p.pieces[0];
            assert!(q.end - q.start >= 24, "{q:?}");
            let offset = if q.file == "a" { 0 } else { 300 };
            for t in q.start..q.end {
                hits[(offset + t) as usize] += 1;
            }
        }
        // A token mid-file is in 100 of 600 + 100 - 48 + 1 windows: about 3,070 of 20,000.
        let middle = hits[150] as f64;
        assert!((2_700.0..3_400.0).contains(&middle), "{middle}");
        // The chunk's first tokens (past the opening's few) and the second file's first
        // token: within a factor of two of that, where a window kept inside the chunk would
        // reach the very first token once in 500 draws.
        for t in [24, 300, 320] {
            assert!(
                hits[t] as f64 > middle / 2.0,
                "token {t}: {} of {middle}",
                hits[t]
            );
        }
        assert!(hits[0] > 0);
    }

    #[test]
    fn verbatim_answers_drop_partial_words_at_both_ends() {
        assert_eq!(whole_words("ing the fox jum", false,), "the fox");
        assert_eq!(whole_words("the fox jumps ", true), "the fox jumps");
        assert_eq!(whole_words(" the fox\njumps", false), "the fox");
        assert_eq!(whole_words("fox", true), "fox");
        assert_eq!(whole_words("", false), "");
    }

    #[test]
    fn openings_are_whole_words_as_written() {
        assert_eq!(opening_words("ing the fox jumps", false, 2), "the fox");
        assert_eq!(opening_words(" the fox jumps", false, 2), "the fox");
        assert_eq!(opening_words("the fox jumps", true, 2), "the fox");
        assert_eq!(opening_words("ab\ncd  ef gh", true, 3), "ab\ncd  ef");
        assert_eq!(opening_words("few words", true, 8), "few");
        assert_eq!(opening_words("few words ", true, 8), "few words");
        assert_eq!(opening_words("one", true, 8), "one");
        assert_eq!(opening_words("", false, 8), "");
    }
}
