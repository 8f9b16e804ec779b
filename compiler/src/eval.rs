//! Held-out evaluation: the mean per-target loss of a prefix (the cartridge, or nothing for the
//! bare model) on held-out examples, and the teacher's own floor, so the log can report the share
//! of the bare-model -> in-context gap the cartridge has closed.

use cartridge_runtime::{Path, PrefixKv, Transformer};
use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::error::Result;
use crate::objective::{loss_sum, Batch, Objective};

/// Mean per-target loss of `examples` after `prefix`, in micro-batches of `micro_batch` (packed
/// into rows of `pack_len` tokens when non-zero).
/// Runs the inference path (fused kernels, no graph).
pub fn mean_loss(
    model: &Transformer,
    prefix: Option<&PrefixKv>,
    examples: &[&Example],
    objective: Objective,
    micro_batch: usize,
    pack_len: usize,
) -> Result<f64> {
    let mut sum = 0f64;
    let mut targets = 0usize;
    for chunk in examples.chunks(micro_batch.max(1)) {
        let batch = Batch::arrange(chunk, pack_len, objective, model.device())?;
        let l = loss_sum(model, prefix, &batch, Path::Infer)?;
        sum += f64::from(l.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
        targets += batch.targets;
    }
    Ok(if targets == 0 {
        f64::NAN
    } else {
        sum / targets as f64
    })
}

/// The teacher's own mean loss against its top-k on `examples` (`-sum exp(t) t` per target, and
/// the tail class's `-r log r` under [`Objective::DistillTail`]).
pub fn teacher_floor(examples: &[&Example], objective: Objective) -> f64 {
    let targets: usize = examples.iter().map(|e| e.num_targets()).sum();
    let with_tail = objective == Objective::DistillTail;
    let sum: f64 = examples
        .iter()
        .map(|e| e.teacher_self_loss(with_tail))
        .sum();
    if targets == 0 {
        f64::NAN
    } else {
        sum / targets as f64
    }
}

/// Share of the gap between the bare model and the teacher that `loss` has closed:
/// `(bare - loss) / (bare - teacher)`; 1 means as good as the teacher, 0 no better than nothing.
pub fn gap_closed(bare: f64, teacher: f64, loss: f64) -> f64 {
    let gap = bare - teacher;
    if gap.abs() < 1e-12 {
        f64::NAN
    } else {
        (bare - loss) / gap
    }
}

/// One held-out measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Optimiser steps completed when it was taken.
    pub step: usize,
    /// Mean held-out loss with the trained prefix.
    pub loss: f64,
    /// The same for the bare model (no prefix).
    pub bare_loss: f64,
    /// The teacher against its own top-k.
    pub teacher_loss: f64,
    /// [`gap_closed`] of `loss`.
    pub gap_closed: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_closed_is_a_fraction_of_the_gap() {
        assert!((gap_closed(5.0, 1.0, 2.0) - 0.75).abs() < 1e-12);
        assert_eq!(gap_closed(5.0, 1.0, 5.0), 0.0);
        assert!(gap_closed(1.0, 1.0, 1.0).is_nan());
    }
}
