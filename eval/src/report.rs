//! What an evaluation reports, per mode and in total (serialisable for `--json`), and the derived
//! "gap closed" figures.

use cartridge_compiler::eval::gap_closed;
use serde::Serialize;

use crate::answers::GeneratedAnswer;
use crate::mode::ModeKind;
use crate::score::ItemScore;

/// Aggregates of generated answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GeneratedSummary {
    /// Share of answers equal to the reference after normalisation.
    pub exact_match: f64,
    /// Share of answers that contain the reference.
    pub contains_match: f64,
    /// Mean chrF2 (0 to 100).
    pub chrf: f64,
}

/// Aggregates over the questions of one mode.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QaSummary {
    /// Questions scored.
    pub items: usize,
    /// Mean over questions of the reference answer's mean log-probability per token.
    pub answer_logprob: f64,
    /// `exp(-answer_logprob)`: the per-token perplexity of the reference answers.
    pub perplexity: f64,
    /// Multiple-choice questions among them.
    pub mc_items: usize,
    /// Share of multiple-choice questions whose right option had the highest log-probability.
    pub mc_accuracy: Option<f64>,
    /// Generated answers against the references (with `--generate`).
    pub generated: Option<GeneratedSummary>,
}

impl QaSummary {
    /// Aggregate per-question scores (and generated answers, when there are any).
    pub fn new(
        scores: &[ItemScore],
        correct: &[bool],
        generated: Option<&[GeneratedAnswer]>,
    ) -> Self {
        let n = scores.len().max(1) as f64;
        let answer_logprob = scores.iter().map(|s| s.answer_logprob).sum::<f64>() / n;
        let mc_items = correct.len();
        let mc_accuracy =
            (mc_items > 0).then(|| correct.iter().filter(|&&c| c).count() as f64 / mc_items as f64);
        let generated = generated.filter(|g| !g.is_empty()).map(|g| {
            let k = g.len() as f64;
            GeneratedSummary {
                exact_match: g.iter().filter(|a| a.exact).count() as f64 / k,
                contains_match: g.iter().filter(|a| a.contains).count() as f64 / k,
                chrf: g.iter().map(|a| a.chrf).sum::<f64>() / k,
            }
        });
        Self {
            items: scores.len(),
            answer_logprob,
            perplexity: (-answer_logprob).exp(),
            mc_items,
            mc_accuracy,
            generated,
        }
    }
}

/// One question's result in one mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemResult {
    /// The question.
    pub question: String,
    /// The reference answer.
    pub reference: String,
    /// Its log-likelihood (and the chosen option).
    #[serde(flatten)]
    pub score: ItemScore,
    /// The generated answer, with `--generate`.
    pub generated: Option<GeneratedAnswer>,
}

/// Everything measured for one mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModeReport {
    /// The mode's name.
    pub name: String,
    /// Its kind.
    pub kind: ModeKind,
    /// Prefix slots in front of every question.
    pub prefix_tokens: usize,
    /// f32 K/V bytes of the prefix: tokens x layers x 2 x kv_heads x head_dim x 4.
    pub kv_bytes: u64,
    /// Seconds from nothing computed to the first answer token: computing the prefix (prefilling
    /// the corpus for ICL; a cartridge file is already loaded) plus the first question's prompt.
    pub time_to_first_token_s: Option<f64>,
    /// Why the mode was not evaluated (e.g. it does not fit the model's window).
    pub skipped: Option<String>,
    /// Question-answer metrics.
    pub qa: Option<QaSummary>,
    /// Mean KL (teacher's top-k) from the self-study teacher, per answer token.
    pub kl: Option<f64>,
    /// `(mode - bare) / (ICL - bare)` on the mean answer log-likelihood.
    pub gap_closed: Option<f64>,
    /// `(bare - mode) / (bare - ICL)` on the KL to the teacher.
    pub kl_gap_closed: Option<f64>,
    /// Per-question results.
    pub items: Vec<ItemResult>,
}

impl ModeReport {
    /// A mode with its prefix size and nothing measured yet.
    pub fn new(name: String, kind: ModeKind, prefix_tokens: usize, kv_bytes: u64) -> Self {
        Self {
            name,
            kind,
            prefix_tokens,
            kv_bytes,
            time_to_first_token_s: None,
            skipped: None,
            qa: None,
            kl: None,
            gap_closed: None,
            kl_gap_closed: None,
            items: Vec::new(),
        }
    }

    /// A mode that was not run, and why.
    pub fn skipped(
        name: String,
        kind: ModeKind,
        prefix_tokens: usize,
        kv_bytes: u64,
        why: String,
    ) -> Self {
        Self {
            skipped: Some(why),
            ..Self::new(name, kind, prefix_tokens, kv_bytes)
        }
    }
}

/// `x` when finite, with `-0.0` written as `0.0` (the bare mode's own gap is `-0 / gap`).
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x + 0.0)
}

/// The whole evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The model's fingerprint (short form).
    pub model: String,
    /// Questions evaluated.
    pub qa_items: usize,
    /// Held-out conversations evaluated.
    pub conversations: usize,
    /// Every mode, in the order asked.
    pub modes: Vec<ModeReport>,
    /// Things the reader should know (e.g. the corpus differs from the dataset's).
    pub notes: Vec<String>,
}

impl Report {
    /// Fill in the gap figures against the first evaluated bare and ICL modes.
    pub fn compute_gaps(&mut self) {
        let find = |kind: ModeKind| {
            self.modes
                .iter()
                .find(|m| m.kind == kind && m.skipped.is_none())
                .map(|m| (m.qa.map(|q| q.answer_logprob), m.kl))
        };
        let (Some(bare), Some(icl)) = (find(ModeKind::Bare), find(ModeKind::Icl)) else {
            return;
        };
        for m in &mut self.modes {
            if m.skipped.is_some() {
                continue;
            }
            // The compiler's `gap_closed` is on losses: a log-likelihood is a negated loss.
            m.gap_closed = match (bare.0, icl.0, m.qa.map(|q| q.answer_logprob)) {
                (Some(b), Some(i), Some(x)) => finite(gap_closed(-b, -i, -x)),
                _ => None,
            };
            m.kl_gap_closed = match (bare.1, icl.1, m.kl) {
                (Some(b), Some(i), Some(x)) => finite(gap_closed(b, i, x)),
                _ => None,
            };
        }
    }
}
