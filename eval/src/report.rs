//! What an evaluation reports, per mode and in total (serialisable for `--json`), and the derived
//! "gap closed" figures.

use cartridge_compiler::eval::gap_closed;
use serde::{Deserialize, Serialize};

use crate::answers::GeneratedAnswer;
use crate::mode::ModeKind;
use crate::score::ItemScore;
use crate::stats::{paired, wilson_interval, PairedComparison};

/// Aggregates of generated answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GeneratedSummary {
    /// Share of answers equal to the reference after normalisation.
    pub exact_match: f64,
    /// Share of answers that contain the reference.
    pub contains_match: f64,
    /// Answers scored.
    pub answers: usize,
    /// Answers that contain the reference.
    pub contains_hits: usize,
    /// 95% Wilson interval of `contains_match`.
    pub contains_interval: (f64, f64),
    /// Mean chrF2 (0 to 100).
    pub chrf: f64,
}

/// Aggregates over the questions of one mode.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
            let contains_hits = g.iter().filter(|a| a.contains).count();
            GeneratedSummary {
                exact_match: g.iter().filter(|a| a.exact).count() as f64 / k,
                contains_match: contains_hits as f64 / k,
                answers: g.len(),
                contains_hits,
                contains_interval: wilson_interval(contains_hits, g.len()),
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// `gap_closed` with each question's log-likelihood counted at most up to the better of the
    /// bare model's and ICL's on that question: a prefix gets no credit for beating both. An
    /// untrained cartridge can beat ICL on terse references through the answer's form (it
    /// expects a short answer where ICL starts a sentence), which says nothing about the corpus.
    pub gap_closed_capped: Option<f64>,
    /// `(bare - mode) / (bare - ICL)` on the KL to the teacher.
    pub kl_gap_closed: Option<f64>,
    /// Contains-match of the generated answers against ICL's, question by question (every
    /// generating mode but ICL itself, when ICL generated too).
    pub contains_vs_icl: Option<PairedComparison>,
    /// Per-question results.
    pub items: Vec<ItemResult>,
    /// The earlier report this mode was taken from instead of being measured (`--reuse`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<String>,
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
            gap_closed_capped: None,
            kl_gap_closed: None,
            contains_vs_icl: None,
            items: Vec::new(),
            reused_from: None,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The model's fingerprint (short form).
    pub model: String,
    /// Questions evaluated.
    pub qa_items: usize,
    /// Held-out conversations evaluated.
    pub conversations: usize,
    /// SHA-256 of what every mode was measured on: the questions, the conversations and the
    /// generation settings (empty in reports from before it was recorded).
    #[serde(default)]
    pub data_digest: String,
    /// SHA-256 of the in-context modes' system message (corpus and description), when the
    /// report has them.
    #[serde(default)]
    pub icl_context: Option<String>,
    /// Every mode, in the order asked.
    pub modes: Vec<ModeReport>,
    /// Things the reader should know (e.g. the corpus differs from the dataset's).
    pub notes: Vec<String>,
}

impl Report {
    /// Fill in the gap figures against the first evaluated bare and ICL modes (from scratch: the
    /// modes may have been measured against other references before, see [`Report::adopt`]).
    pub fn compute_gaps(&mut self) {
        for m in &mut self.modes {
            (m.gap_closed, m.gap_closed_capped, m.kl_gap_closed) = (None, None, None);
        }
        let find = |kind: ModeKind| {
            self.first_evaluated(kind)
                .map(|m| (m.qa.map(|q| q.answer_logprob), m.kl))
        };
        let (Some(bare), Some(icl)) = (find(ModeKind::Bare), find(ModeKind::Icl)) else {
            return;
        };
        let ceilings = self.per_question_ceilings();
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
            m.gap_closed_capped = match (bare.0, icl.0, &ceilings) {
                (Some(b), Some(i), Some(c)) => {
                    capped_mean(c, &m.items).and_then(|x| finite(gap_closed(-b, -i, -x)))
                }
                _ => None,
            };
        }
    }

    /// The first mode of `kind` that was evaluated (not skipped): the reference the others are
    /// measured against.
    fn first_evaluated(&self, kind: ModeKind) -> Option<&ModeReport> {
        self.modes
            .iter()
            .find(|m| m.kind == kind && m.skipped.is_none())
    }

    /// Compare every mode's generated answers with ICL's, question by question (from scratch, as
    /// [`Report::compute_gaps`]).
    pub fn compare_with_icl(&mut self) {
        for m in &mut self.modes {
            m.contains_vs_icl = None;
        }
        let hits = |m: &ModeReport| -> Option<Vec<bool>> {
            m.items
                .iter()
                .map(|i| i.generated.as_ref().map(|g| g.contains))
                .collect()
        };
        let Some(icl) = self.first_evaluated(ModeKind::Icl).and_then(hits) else {
            return;
        };
        for m in &mut self.modes {
            if m.kind != ModeKind::Icl && m.skipped.is_none() {
                m.contains_vs_icl = hits(m).and_then(|h| paired(&h, &icl));
            }
        }
    }

    /// Per question, the better of the bare model's and ICL's answer log-likelihoods, when both
    /// modes scored the same questions.
    fn per_question_ceilings(&self) -> Option<Vec<f64>> {
        let items = |kind: ModeKind| {
            self.modes
                .iter()
                .find(|m| m.kind == kind && m.skipped.is_none() && !m.items.is_empty())
                .map(|m| &m.items)
        };
        let (bare, icl) = (items(ModeKind::Bare)?, items(ModeKind::Icl)?);
        (bare.len() == icl.len()).then(|| {
            bare.iter()
                .zip(icl)
                .map(|(b, i)| b.score.answer_logprob.max(i.score.answer_logprob))
                .collect()
        })
    }
}

/// The mean answer log-likelihood of `items`, each capped at its question's ceiling; `None` when
/// `items` are not the same questions.
fn capped_mean(ceilings: &[f64], items: &[ItemResult]) -> Option<f64> {
    if items.len() != ceilings.len() || items.is_empty() {
        return None;
    }
    let sum: f64 = items
        .iter()
        .zip(ceilings)
        .map(|(x, &c)| x.score.answer_logprob.min(c))
        .sum();
    Some(sum / items.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(name: &str, kind: ModeKind, logprobs: &[f64]) -> ModeReport {
        let mut m = ModeReport::new(name.into(), kind, 0, 0);
        m.items = logprobs
            .iter()
            .map(|&answer_logprob| ItemResult {
                question: "q".into(),
                reference: "a".into(),
                score: ItemScore {
                    answer_logprob,
                    answer_tokens: 1,
                    chosen: None,
                },
                generated: None,
            })
            .collect();
        let scores: Vec<ItemScore> = m.items.iter().map(|i| i.score.clone()).collect();
        m.qa = Some(QaSummary::new(&scores, &[], None));
        m
    }

    #[test]
    fn capped_gap_credits_each_question_up_to_the_better_of_bare_and_icl() {
        // Question 1: ICL knows (-1 vs -5). Question 2: ICL is worse than bare (-4 vs -3).
        let mut report = Report {
            model: "m".into(),
            qa_items: 2,
            conversations: 0,
            data_digest: String::new(),
            icl_context: None,
            modes: vec![
                mode("bare", ModeKind::Bare, &[-5.0, -3.0]),
                mode("icl", ModeKind::Icl, &[-1.0, -4.0]),
                // Beats both on question 2: by -2.0 there, but capped at bare's -3.0.
                mode("cart", ModeKind::Cartridges, &[-3.0, -2.0]),
                // Above ICL on question 1: capped at ICL's -1.0.
                mode("over", ModeKind::Cartridges, &[0.0, -4.0]),
                mode("other questions", ModeKind::Cartridges, &[-1.0]),
            ],
            notes: vec![],
        };
        report.compute_gaps();
        let get = |name: &str| {
            let m = report.modes.iter().find(|m| m.name == name).expect(name);
            (m.gap_closed, m.gap_closed_capped)
        };
        // Means: bare -4, ICL -2.5 (gap 1.5).
        assert_eq!(get("bare"), (Some(0.0), Some(0.0)));
        assert_eq!(get("icl"), (Some(1.0), Some(1.0)));
        // cart: plain mean -2.5 -> 100%; capped (-3 + -3) / 2 = -3 -> (4 - 3) / 1.5.
        let (plain, capped) = get("cart");
        assert!((plain.expect("plain") - 1.0).abs() < 1e-12);
        assert!((capped.expect("capped") - 1.0 / 1.5).abs() < 1e-12);
        // over: plain mean -2 -> 4/3; capped (-1 + -4) / 2 = -2.5 -> exactly ICL.
        let (plain, capped) = get("over");
        assert!((plain.expect("plain") - 2.0 / 1.5).abs() < 1e-12);
        assert!((capped.expect("capped") - 1.0).abs() < 1e-12);
        assert_eq!(get("other questions").1, None);
    }
}
