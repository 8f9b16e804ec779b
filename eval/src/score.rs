//! Log-likelihood of reference answers: each answer is appended to its question's prompt and the
//! model's log-probability of every answer token is read off one forward of the whole sequence.
//!
//! Sequences are right-padded into batches (no mask needed: with causal attention a real token
//! never sees the padding after it, and padding is never a target). The forward stops at the
//! final-normed hidden states; only the rows that predict answer tokens go through the LM head.

use candle_core::{DType, Tensor, D};
use cartridge_runtime::{ops, Logits, Path, PrefixKv, Transformer};

use crate::error::{Error, Result};
use crate::mode::{EvalModel, PreparedMode, Renderer};
use crate::qa::QaItem;

/// A token sequence whose positions `start..` are scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoredSeq {
    /// Prompt then answer ids.
    pub ids: Vec<u32>,
    /// First answer position (at least 1: the token before it predicts it).
    pub start: usize,
}

/// Per sequence, the natural-log probability of each token at positions `start..`.
pub fn target_logprobs(
    model: &Transformer,
    prefix: Option<&PrefixKv>,
    seqs: &[ScoredSeq],
    batch: usize,
) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch.max(1)) {
        out.extend(batch_logprobs(model, prefix, chunk)?);
    }
    Ok(out)
}

fn batch_logprobs(
    model: &Transformer,
    prefix: Option<&PrefixKv>,
    seqs: &[ScoredSeq],
) -> Result<Vec<Vec<f64>>> {
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    if t == 0 {
        return Err(Error::Config("nothing to score".into()));
    }
    let mut grid = vec![0u32; seqs.len() * t];
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (b, s) in seqs.iter().enumerate() {
        if s.start == 0 || s.start >= s.ids.len() {
            return Err(Error::Config(format!(
                "a scored sequence of {} tokens has no target after position {}",
                s.ids.len(),
                s.start
            )));
        }
        grid[b * t..b * t + s.ids.len()].copy_from_slice(&s.ids);
        for p in s.start..s.ids.len() {
            rows.push((b * t + p - 1) as u32);
            targets.push(s.ids[p]);
        }
    }
    let device = model.device();
    let tokens = Tensor::from_vec(grid, (seqs.len(), t), device)?;
    let hidden = model.forward(prefix, None, &tokens, Logits::Hidden, Path::Infer)?;
    let (b, t, h) = hidden.dims3()?;
    let m = rows.len();
    let picked = hidden
        .reshape((b * t, h))?
        .index_select(&Tensor::from_vec(rows, m, device)?, 0)?;
    let logits =
        ops::frozen_linear(&picked, model.lm_head_weight(), Path::Infer)?.to_dtype(DType::F32)?;
    // log p(target) = z[target] - logsumexp(z), shifted by the row max so exp cannot overflow.
    let max = logits.max_keepdim(D::Minus1)?;
    let x = logits.broadcast_sub(&max)?;
    let lse = x.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let ids = Tensor::from_vec(targets, (m, 1), device)?;
    let lp = (x.gather(&ids, 1)? - lse)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut lp = lp.into_iter().map(f64::from);
    Ok(seqs
        .iter()
        .map(|s| lp.by_ref().take(s.ids.len() - s.start).collect())
        .collect())
}

/// How one question scored in one mode.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ItemScore {
    /// Mean log-probability per token of the reference answer.
    pub answer_logprob: f64,
    /// Tokens of the reference answer.
    pub answer_tokens: usize,
    /// For multiple choice: the option with the highest total log-probability.
    pub chosen: Option<usize>,
}

/// Tokens of `question`'s prompt followed by `answer` (the answer tokenised on its own, as the
/// model would generate it after the assistant header).
pub fn answer_seq(
    model: EvalModel<'_>,
    renderer: &Renderer,
    question: &str,
    answer: &str,
) -> Result<ScoredSeq> {
    let mut ids = renderer.question_ids(model, question)?;
    let start = ids.len();
    let answer_ids = model.tokenizer.encode(answer, false)?;
    if answer_ids.is_empty() {
        return Err(Error::Config(format!(
            "the answer {answer:?} has no tokens"
        )));
    }
    ids.extend_from_slice(&answer_ids);
    Ok(ScoredSeq { ids, start })
}

/// The sequences scored for `item`: its reference answer, or every option of a multiple-choice
/// item (in order).
pub fn item_seqs(
    model: EvalModel<'_>,
    renderer: &Renderer,
    item: &QaItem,
) -> Result<Vec<ScoredSeq>> {
    match &item.choices {
        None => Ok(vec![answer_seq(
            model,
            renderer,
            &item.question,
            &item.answer,
        )?]),
        Some(c) => c
            .options
            .iter()
            .map(|o| answer_seq(model, renderer, &item.question, o))
            .collect(),
    }
}

/// Score every item after `mode`'s prefix.
pub fn score_items(
    model: EvalModel<'_>,
    mode: &PreparedMode,
    items: &[QaItem],
    batch: usize,
) -> Result<Vec<ItemScore>> {
    let per_item: Vec<Vec<ScoredSeq>> = items
        .iter()
        .map(|it| item_seqs(model, &mode.renderer, it))
        .collect::<Result<_>>()?;
    let flat: Vec<ScoredSeq> = per_item.iter().flatten().cloned().collect();
    let lps = target_logprobs(model.transformer, mode.prefix.as_ref(), &flat, batch)?;
    let mut lps = lps.into_iter();
    let mut out = Vec::with_capacity(items.len());
    for (item, seqs) in items.iter().zip(&per_item) {
        let scores: Vec<Vec<f64>> = lps.by_ref().take(seqs.len()).collect();
        let reference = item.choices.as_ref().map_or(0, |c| c.answer_index);
        let r = scores.get(reference).ok_or_else(|| {
            Error::Config(format!(
                "{:?}: answer_index {reference} is past its {} options",
                item.question,
                scores.len()
            ))
        })?;
        let chosen = item.choices.as_ref().map(|_| {
            // Highest total log-probability; ties go to the first option.
            let totals: Vec<f64> = scores.iter().map(|s| s.iter().sum()).collect();
            (0..totals.len()).fold(0, |best, i| if totals[i] > totals[best] { i } else { best })
        });
        out.push(ItemScore {
            answer_logprob: r.iter().sum::<f64>() / r.len() as f64,
            answer_tokens: r.len(),
            chosen,
        });
    }
    Ok(out)
}

/// The longest sequence `items` produce with `renderer` (to check the model's window).
pub fn longest_seq(model: EvalModel<'_>, renderer: &Renderer, items: &[QaItem]) -> Result<usize> {
    let mut longest = 0;
    for it in items {
        for s in item_seqs(model, renderer, it)? {
            longest = longest.max(s.ids.len());
        }
    }
    Ok(longest)
}
