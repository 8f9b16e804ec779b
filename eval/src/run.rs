//! One evaluation: every mode, one after the other, on the same questions and conversations.

use std::time::Instant;

use candle_core::Tensor;
use cartridge_compiler::data::Example;
use cartridge_runtime::{Logits, Path};

use crate::answers::generate_answers;
use crate::error::{Error, Result};
use crate::kl::kl_to_teacher;
use crate::mode::{planned_prefix_len, EvalModel, Mode, PreparedMode, Renderer};
use crate::qa::QaItem;
use crate::report::{ItemResult, ModeReport, QaSummary, Report};
use crate::score::{longest_seq, score_items};

/// What to evaluate on.
#[derive(Debug, Clone, Default)]
pub struct EvalData {
    /// Questions with reference answers.
    pub qa: Vec<QaItem>,
    /// Held-out self-study conversations (for the KL to the teacher).
    pub conversations: Vec<Example>,
}

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Sequences per forward when scoring answers.
    pub batch: usize,
    /// Conversations per forward for the KL.
    pub micro_batch: usize,
    /// Generate greedy answers of at most this many tokens (`None`: no generation).
    pub generate: Option<usize>,
    /// Tokens that end a generated answer.
    pub stop_tokens: Vec<u32>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch: 8,
            micro_batch: 4,
            generate: None,
            stop_tokens: Vec::new(),
        }
    }
}

/// The first prompt a user would send in this evaluation: the first question, else the first
/// conversation up to its first answer token.
fn first_prompt(
    model: EvalModel<'_>,
    renderer: &Renderer,
    data: &EvalData,
) -> Result<Option<Vec<u32>>> {
    if let Some(item) = data.qa.first() {
        return Ok(Some(renderer.question_ids(model, &item.question)?));
    }
    Ok(data.conversations.first().and_then(|e| {
        let end = *e.rows.first()? as usize + 1;
        Some(e.tokens[..end].to_vec())
    }))
}

/// Evaluate every mode on `data`; `progress` hears a line per step.
pub fn evaluate(
    model: EvalModel<'_>,
    fingerprint: &str,
    modes: &[Mode],
    data: &EvalData,
    options: &EvalOptions,
    mut progress: impl FnMut(&str),
) -> Result<Report> {
    if data.qa.is_empty() && data.conversations.is_empty() {
        return Err(Error::Config(
            "nothing to evaluate: no questions and no conversations".into(),
        ));
    }
    let window = model.config().max_position_embeddings;
    let longest_conv = data
        .conversations
        .iter()
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(0);
    let mut reports = Vec::with_capacity(modes.len());
    for mode in modes {
        let renderer = Renderer::for_mode(mode);
        let planned = planned_prefix_len(model, mode)?;
        let longest = longest_seq(model, &renderer, &data.qa)?.max(longest_conv);
        if planned + longest > window {
            let why = format!(
                "{planned} prefix tokens + {longest} sequence tokens exceed the model's \
                 {window}-token window"
            );
            progress(&format!("{}: skipped ({why})", mode.name));
            reports.push(ModeReport::skipped(
                mode.name.clone(),
                mode.kind,
                planned,
                model.kv_bytes(planned),
                why,
            ));
            continue;
        }
        progress(&format!(
            "{}: computing the prefix ({planned} tokens)",
            mode.name
        ));
        let prepared = PreparedMode::new(model, mode)?;
        let ttft = match first_prompt(model, &renderer, data)? {
            Some(ids) => {
                let start = Instant::now();
                let t = Tensor::from_vec(ids.clone(), (1, ids.len()), model.transformer.device())?;
                let logits = model.transformer.forward(
                    prepared.prefix.as_ref(),
                    None,
                    &t,
                    Logits::Last,
                    Path::Infer,
                )?;
                // Reading the logits back waits for the computation (on any device).
                logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
                Some(prepared.prepare_secs + start.elapsed().as_secs_f64())
            }
            None => None,
        };
        let mut report = ModeReport::new(
            mode.name.clone(),
            mode.kind,
            prepared.prefix_len(),
            model.kv_bytes(prepared.prefix_len()),
        );
        report.time_to_first_token_s = ttft;
        if !data.qa.is_empty() {
            progress(&format!(
                "{}: scoring {} questions",
                mode.name,
                data.qa.len()
            ));
            let scores = score_items(model, &prepared, &data.qa, options.batch)?;
            let generated = match options.generate {
                Some(max_tokens) => {
                    progress(&format!("{}: generating answers", mode.name));
                    Some(generate_answers(
                        model,
                        &prepared,
                        &data.qa,
                        max_tokens,
                        &options.stop_tokens,
                    )?)
                }
                None => None,
            };
            let correct: Vec<bool> = data
                .qa
                .iter()
                .zip(&scores)
                .filter_map(|(it, s)| Some(s.chosen? == it.choices.as_ref()?.answer_index))
                .collect();
            report.qa = Some(QaSummary::new(&scores, &correct, generated.as_deref()));
            report.items = data
                .qa
                .iter()
                .zip(scores)
                .enumerate()
                .map(|(i, (it, score))| ItemResult {
                    question: it.question.clone(),
                    reference: it.answer.clone(),
                    score,
                    generated: generated.as_ref().and_then(|g| g.get(i).cloned()),
                })
                .collect();
        }
        if !data.conversations.is_empty() {
            progress(&format!(
                "{}: KL on {} conversations",
                mode.name,
                data.conversations.len()
            ));
            report.kl = Some(kl_to_teacher(
                model.transformer,
                prepared.prefix.as_ref(),
                &data.conversations,
                options.micro_batch,
            )?);
        }
        reports.push(report);
    }
    let mut report = Report {
        model: fingerprint.to_string(),
        qa_items: data.qa.len(),
        conversations: data.conversations.len(),
        modes: reports,
        notes: Vec::new(),
    };
    report.compute_gaps();
    report.compare_with_icl();
    Ok(report)
}
