//! One evaluation: every mode, one after the other, on the same questions and conversations.

use std::time::Instant;

use candle_core::Tensor;
use cartridge_compiler::data::Example;
use cartridge_runtime::{Logits, Path};
use sha2::{Digest, Sha256};

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

/// SHA-256 of what every mode is measured on: the questions with their references and options,
/// the held-out conversations with the teacher's top-k, and the generation settings. Two reports
/// with the same digest (and model) measured their modes on the same thing, so a mode of one can
/// stand in the other (`cartridge eval --reuse`).
pub fn data_digest(data: &EvalData, options: &EvalOptions) -> String {
    let mut h = Sha256::new();
    let text = |h: &mut Sha256, s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    h.update((data.qa.len() as u64).to_le_bytes());
    for item in &data.qa {
        text(&mut h, &item.question);
        text(&mut h, &item.answer);
        match &item.choices {
            Some(c) => {
                h.update((c.options.len() as u64 + 1).to_le_bytes());
                for o in &c.options {
                    text(&mut h, o);
                }
                h.update((c.answer_index as u64).to_le_bytes());
            }
            None => h.update(0u64.to_le_bytes()),
        }
    }
    let ids = |h: &mut Sha256, v: &[u32]| {
        h.update((v.len() as u64).to_le_bytes());
        for x in v {
            h.update(x.to_le_bytes());
        }
    };
    h.update((data.conversations.len() as u64).to_le_bytes());
    for e in &data.conversations {
        ids(&mut h, &e.tokens);
        ids(&mut h, &e.rows);
        ids(&mut h, &e.topk_ids);
        h.update((e.topk_logprobs.len() as u64).to_le_bytes());
        for x in &e.topk_logprobs {
            h.update(x.to_le_bytes());
        }
    }
    h.update(options.generate.map_or(0, |n| n as u64 + 1).to_le_bytes());
    ids(&mut h, &options.stop_tokens);
    format!("sha256:{:x}", h.finalize())
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
        data_digest: data_digest(data, options),
        icl_context: None,
        modes: reports,
        notes: Vec::new(),
    };
    report.compute_gaps();
    report.compare_with_icl();
    Ok(report)
}
