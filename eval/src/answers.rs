//! Greedy answers to the questions, scored against the references by exact match, contains-match
//! and chrF ([`crate::text_match`]).

use cartridge_runtime::generate::{self, BatchOptions, Control, GenerateRequest, SamplingParams};
use serde::Serialize;

use crate::error::Result;
use crate::mode::{EvalModel, PreparedMode};
use crate::qa::QaItem;
use crate::text_match::{chrf, contains_match, exact_match};

/// Questions decoded together (one left-padded batch after the shared prefix).
const GENERATE_BATCH: usize = 16;

/// One generated answer and how it compares with the reference.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct GeneratedAnswer {
    /// The answer, special tokens dropped, whitespace trimmed.
    pub text: String,
    /// Normalised text equals the reference.
    pub exact: bool,
    /// Normalised reference appears in it as whole words.
    pub contains: bool,
    /// chrF2 against the reference, 0 to 100.
    pub chrf: f64,
}

/// Greedy answers of at most `max_tokens` tokens, stopping at any of `stop_tokens`.
pub fn generate_answers(
    model: EvalModel<'_>,
    mode: &PreparedMode,
    items: &[QaItem],
    max_tokens: usize,
    stop_tokens: &[u32],
) -> Result<Vec<GeneratedAnswer>> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(GENERATE_BATCH) {
        let requests = chunk
            .iter()
            .map(|it| {
                Ok(GenerateRequest {
                    prompt: mode.question_ids(model, &it.question)?,
                    sampling: SamplingParams::greedy(),
                    max_tokens,
                    stop_tokens: stop_tokens.to_vec(),
                    top_logprobs: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let results = generate::generate_batch(
            model.transformer,
            mode.prefix.as_ref(),
            &requests,
            &BatchOptions::default(),
            |_, _| Control::Continue,
        )?;
        for (it, g) in chunk.iter().zip(results) {
            let ids: Vec<u32> = g
                .tokens
                .into_iter()
                .filter(|t| !stop_tokens.contains(t))
                .collect();
            let text = model.tokenizer.decode(&ids, true)?.trim().to_string();
            out.push(GeneratedAnswer {
                exact: exact_match(&text, &it.answer),
                contains: contains_match(&text, &it.answer),
                chrf: chrf(&text, &it.answer),
                text,
            });
        }
    }
    Ok(out)
}
