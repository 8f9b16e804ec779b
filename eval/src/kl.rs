//! KL from the self-study teacher to a mode, on held-out synthesised conversations.
//!
//! Each record stores the teacher's top-k log-probabilities `t_k` at every answer token. The
//! compiler's distillation loss is the cross-entropy `-sum_k exp(t_k) log q(id_k)` of the mode's
//! distribution `q`; subtracting the teacher's own `-sum_k exp(t_k) t_k` gives
//! `sum_k p_k (log p_k - log q(id_k))`: the KL divergence restricted to the teacher's top-k (the
//! mass outside it, typically a few percent, is not seen). It is zero when `q` is the teacher.
//! Averaged per answer token.

use cartridge_compiler::data::{self, Example};
use cartridge_compiler::eval::teacher_floor;
use cartridge_compiler::objective::{loss_sum, Batch, Objective};
use cartridge_formats::dataset::Dataset;
use cartridge_runtime::{Path, PrefixKv, Transformer};

use crate::error::{Error, Result};

/// Which conversations of a dataset folder to evaluate on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every conversation (a dataset synthesised for evaluation only).
    All,
    /// The trainer's held-out split: `held_out` conversations drawn with `seed` after keeping
    /// `max_seq_len` tokens of each (pass the training run's settings to get its exact split).
    HeldOut {
        /// Conversations held out.
        held_out: usize,
        /// The split's seed.
        seed: u64,
        /// Tokens kept per conversation.
        max_seq_len: usize,
    },
}

/// The conversations of `ds` selected by `selection`, as the compiler's examples, keeping at most
/// `max_len` tokens each (for `All`; `HeldOut` uses its own `max_seq_len`).
pub fn select_examples(
    ds: &Dataset,
    vocab: usize,
    selection: Selection,
    max_len: usize,
) -> Result<Vec<Example>> {
    let records = ds.records()?;
    let (examples, usable) = match selection {
        Selection::All => {
            let all = data::prepare(&records, max_len, vocab)?;
            let n = all.len();
            (all, n)
        }
        Selection::HeldOut {
            held_out,
            seed,
            max_seq_len,
        } => {
            let all = data::prepare(&records, max_seq_len, vocab)?;
            // The trainer keeps at least one conversation to train on: with one, none is held out.
            let (_, held) = data::split(all.len(), held_out, seed);
            (
                held.into_iter().map(|i| all[i].clone()).collect(),
                all.len(),
            )
        }
    };
    if examples.is_empty() {
        return Err(Error::Config(format!(
            "{}: no conversation selected ({usable} of {} have answer tokens; the trainer's \
             split holds none out of fewer than 2)",
            ds.dir().display(),
            records.len()
        )));
    }
    Ok(examples)
}

/// Mean per-answer-token KL (restricted to the teacher's top-k) from the teacher to the model
/// after `prefix`, in micro-batches of `micro_batch` conversations.
pub fn kl_to_teacher(
    model: &Transformer,
    prefix: Option<&PrefixKv>,
    examples: &[Example],
    micro_batch: usize,
) -> Result<f64> {
    let refs: Vec<&Example> = examples.iter().collect();
    let (mut sum, mut targets) = (0f64, 0usize);
    for chunk in refs.chunks(micro_batch.max(1)) {
        let batch = Batch::new(chunk, Objective::Distill, model.device())?;
        let l = loss_sum(model, prefix, &batch, Path::Infer)?;
        sum += f64::from(l.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
        targets += batch.targets;
    }
    if targets == 0 {
        return Err(Error::Config("no answer tokens to evaluate on".into()));
    }
    Ok(sum / targets as f64 - teacher_floor(&refs, Objective::Distill))
}
