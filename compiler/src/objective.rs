//! The training objective on a batch of examples (Eyuboglu et al. 2025, §4: context distillation
//! against the teacher's top-k; DESIGN.md §5):
//!
//! - `distill`: `-sum_k exp(t_k) * log_softmax(student)[id_k]` summed over target tokens (the
//!   reference trainer's loss);
//! - `distill-tail`: `distill` plus `-r * log(1 - sum_k softmax(student)[id_k])`, with
//!   `r = 1 - sum_k exp(t_k)` the teacher's probability outside its top-k: the cross-entropy over
//!   `k + 1` classes, the rest of the vocabulary being the last. `distill`'s minimum puts all of
//!   the student's mass on the teacher's top-k, so every token outside it (a terse answer's
//!   first word where the teacher starts a sentence) is pushed towards zero; this one keeps the
//!   teacher's share there;
//! - `tokens`: next-token cross-entropy `-log_softmax(student)[next]` (ablation).
//!
//! Both are the same computation with different `(ids, weights)`: `tokens` is `k = 1`, weight 1.
//! Callers divide the sum by the number of target tokens of the whole optimiser step, so the loss
//! is averaged per target token however the step is split into micro-batches.
//!
//! Only what is needed is materialised: the forward stops at the final-normed hidden states
//! ([`Logits::Hidden`]), the target rows are gathered, and only those rows go through the (frozen)
//! LM head. The log-softmax is never formed in full: with `x` the shifted logits,
//! `-sum_k w_k (x[id_k] - lse(x))` = `sum_k w_k lse(x) - sum_k w_k x[id_k]`, which needs the
//! gathered columns and one log-sum-exp per row.

use candle_core::{DType, Device, Tensor, D};
use cartridge_runtime::models::Logits;
use cartridge_runtime::{ops, Path, PrefixKv, Transformer};
use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::error::{Error, Result};
use crate::fused_loss::{blockwise_loss_sum, FusedTopkLoss};

/// Which loss trains the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Cross-entropy against the teacher's top-k probabilities.
    #[default]
    Distill,
    /// [`Objective::Distill`] with the teacher's remaining mass (outside its top-k) as one more
    /// class.
    DistillTail,
    /// Plain next-token prediction on the recorded tokens.
    Tokens,
}

/// A batch ready for the forward: examples right-padded one per row, or packed several per row.
///
/// Right padding needs no mask: with causal attention a real token never sees the pad tokens after
/// it, and pad rows are never targets. Packed rows carry their segment lengths, which the forward
/// turns into per-sequence positions and a block-diagonal mask
/// ([`Transformer::forward_packed`]); both layouts give the same loss.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[b, t]` token ids.
    pub tokens: Tensor,
    /// Lengths of the sequences packed in each row (`None`: one example per row, right-padded).
    pub segments: Option<Vec<Vec<usize>>>,
    /// `[m]` flat row indices into `b * t` of the target rows.
    pub rows: Tensor,
    /// `[m, k]` ids whose log-probabilities are weighted.
    pub ids: Tensor,
    /// `[m, k]` weights (teacher probabilities, or 1 for `tokens`).
    pub weights: Tensor,
    /// `[m]` sum of each row's weights.
    pub weight_sums: Tensor,
    /// Whether the teacher's mass outside each row's top-k, `max(0, 1 - weight_sum)`, is one
    /// more class ([`Objective::DistillTail`]).
    pub tail_class: bool,
    /// Number of target tokens `m`.
    pub targets: usize,
    /// Number of real (unpadded) tokens.
    pub real_tokens: usize,
    /// Token slots computed (`b * t`, padding included).
    pub slots: usize,
}

/// First-fit packing in the given order: each example goes into the first row with room for it
/// within `pack_len` tokens (an example longer than that gets a row of its own). Returns, per row,
/// the example indices in order.
pub fn pack_rows(lengths: &[usize], pack_len: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, &len) in lengths.iter().enumerate() {
        match rows.iter_mut().find(|(used, _)| used + len <= pack_len) {
            Some((used, members)) => {
                *used += len;
                members.push(i);
            }
            None => rows.push((len, vec![i])),
        }
    }
    rows.into_iter().map(|(_, members)| members).collect()
}

impl Batch {
    /// One example per row, right-padded, for `objective` on `device`.
    pub fn new(examples: &[&Example], objective: Objective, device: &Device) -> Result<Batch> {
        let rows: Vec<Vec<usize>> = (0..examples.len()).map(|i| vec![i]).collect();
        Self::build(examples, &rows, false, objective, device)
    }

    /// Examples packed into rows of at most `max(pack_len, longest example)` tokens
    /// ([`pack_rows`]): rows are never longer than padding would make them, so packing never
    /// costs more attention than padding; a larger `pack_len` trades attention for fewer rows.
    pub fn packed(
        examples: &[&Example],
        pack_len: usize,
        objective: Objective,
        device: &Device,
    ) -> Result<Batch> {
        let lengths: Vec<usize> = examples.iter().map(|e| e.tokens.len()).collect();
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let rows = pack_rows(&lengths, pack_len.max(longest));
        Self::build(examples, &rows, true, objective, device)
    }

    /// [`Self::packed`] when `pack_len > 0`, else [`Self::new`] (the trainer's setting).
    pub fn arrange(
        examples: &[&Example],
        pack_len: usize,
        objective: Objective,
        device: &Device,
    ) -> Result<Batch> {
        if pack_len == 0 {
            Self::new(examples, objective, device)
        } else {
            Self::packed(examples, pack_len, objective, device)
        }
    }

    fn build(
        examples: &[&Example],
        layout: &[Vec<usize>],
        packed: bool,
        objective: Objective,
        device: &Device,
    ) -> Result<Batch> {
        let b = layout.len();
        let row_len = |members: &Vec<usize>| -> usize {
            members.iter().map(|&i| examples[i].tokens.len()).sum()
        };
        let t = layout.iter().map(row_len).max().unwrap_or(0);
        if b == 0 || t == 0 {
            return Err(Error::Data("an empty batch".into()));
        }
        let k = match objective {
            Objective::Distill | Objective::DistillTail => {
                examples.iter().map(|e| e.k).max().unwrap_or(1)
            }
            Objective::Tokens => 1,
        };
        let mut tokens = vec![0u32; b * t];
        let (mut rows, mut ids, mut w, mut wsum) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut segments = Vec::with_capacity(b);
        let mut real = 0;
        for (bi, members) in layout.iter().enumerate() {
            let mut start = bi * t;
            let mut lens = Vec::with_capacity(members.len());
            for &ei in members {
                let e = examples[ei];
                tokens[start..start + e.tokens.len()].copy_from_slice(&e.tokens);
                real += e.tokens.len();
                lens.push(e.tokens.len());
                for (r, &row) in e.rows.iter().enumerate() {
                    rows.push(start as u32 + row);
                    match objective {
                        Objective::Tokens => {
                            ids.push(e.next[r]);
                            w.push(1f32);
                            wsum.push(1f32);
                        }
                        Objective::Distill | Objective::DistillTail => {
                            let mut s = 0f32;
                            for j in 0..k {
                                // Rows narrower than the batch's widest are padded with weight 0.
                                let (id, p) = if j < e.k {
                                    let lp = e.topk_logprobs[r * e.k + j];
                                    (e.topk_ids[r * e.k + j], lp.exp())
                                } else {
                                    (0, 0.0)
                                };
                                ids.push(id);
                                w.push(p);
                                s += p;
                            }
                            wsum.push(s);
                        }
                    }
                }
                start += e.tokens.len();
            }
            segments.push(lens);
        }
        let m = rows.len();
        if m == 0 {
            return Err(Error::Data("a batch without targets".into()));
        }
        Ok(Batch {
            tokens: Tensor::from_vec(tokens, (b, t), device)?,
            segments: packed.then_some(segments),
            rows: Tensor::from_vec(rows, m, device)?,
            ids: Tensor::from_vec(ids, (m, k), device)?,
            weights: Tensor::from_vec(w, (m, k), device)?,
            weight_sums: Tensor::from_vec(wsum, m, device)?,
            tail_class: objective == Objective::DistillTail,
            targets: m,
            real_tokens: real,
            slots: b * t,
        })
    }
}

/// The summed loss of `batch` after `prefix` (a scalar, f32): divide by the step's target count.
pub fn loss_sum(
    model: &Transformer,
    prefix: Option<&PrefixKv>,
    batch: &Batch,
    path: Path,
) -> Result<Tensor> {
    let hidden = match &batch.segments {
        Some(segments) => {
            model.forward_packed(prefix, &batch.tokens, segments, Logits::Hidden, path)?
        }
        None => model.forward(prefix, None, &batch.tokens, Logits::Hidden, path)?,
    };
    let (b, t, h) = hidden.dims3()?;
    let rows = hidden.reshape((b * t, h))?.index_select(&batch.rows, 0)?;
    target_loss_sum(model, &rows, batch)
}

/// The loss from final-normed hidden states of the target rows `[m, hidden]` (f32; f64 for f64
/// rows).
pub fn target_loss_sum(model: &Transformer, rows: &Tensor, batch: &Batch) -> Result<Tensor> {
    // The fused op where it runs (CPU, f32/f64); the autograd formula elsewhere.
    if rows.device().is_cpu()
        && matches!(rows.dtype(), DType::F32 | DType::F64)
        && rows.dtype() == model.lm_head_weight().dtype()
    {
        let op = FusedTopkLoss::new(
            model.lm_head_products()?,
            batch.ids.clone(),
            batch.weights.to_dtype(rows.dtype())?,
            batch.weight_sums.to_dtype(rows.dtype())?,
            batch.tail_class,
            rows.track_op(),
        );
        return Ok(rows.contiguous()?.apply_op1(op)?.sum_all()?);
    }
    // Elsewhere (CUDA, bf16) the same block loop from plain ops, for its memory: autograd would
    // keep several `[targets, vocab]` f32 tensors until the backward.
    Ok(blockwise_loss_sum(
        model.lm_head_weight(),
        &batch.ids,
        &batch.weights,
        &batch.weight_sums,
        batch.tail_class,
        rows,
    )?)
}

/// [`target_loss_sum`] with plain autograd ops (every device; the reference for the fused op).
pub fn unfused_target_loss_sum(
    model: &Transformer,
    rows: &Tensor,
    batch: &Batch,
) -> Result<Tensor> {
    let logits = ops::frozen_linear(rows, model.lm_head_weight(), Path::Train)?;
    // Half-precision logits are widened for the log-sum-exp; f32 and f64 (gradient checks) stay.
    let logits = match logits.dtype() {
        DType::F16 | DType::BF16 => logits.to_dtype(DType::F32)?,
        _ => logits,
    };
    let weights = batch.weights.to_dtype(logits.dtype())?;
    let weight_sums = batch.weight_sums.to_dtype(logits.dtype())?;
    // Shift by the (detached) row max: exact for the gradient, and exp cannot overflow.
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let x = logits.broadcast_sub(&max)?;
    let lse = x.exp()?.sum_keepdim(D::Minus1)?.log()?.squeeze(1)?;
    let picked = x.gather(&batch.ids, 1)?;
    let weighted = (picked * &weights)?.sum_all()?;
    let norm = (&lse * &weight_sums)?.sum_all()?;
    let loss = (norm - weighted)?;
    if !batch.tail_class {
        return Ok(loss);
    }
    // -r log(tail mass) = r (lse - log sum_{j not in top-k} exp(x_j)); the top-k columns (weight
    // > 0: padding columns are not the teacher's) masked out of the sum.
    let in_topk = weights.gt(0.0)?.to_dtype(x.dtype())?;
    let topk_mask = x
        .zeros_like()?
        .scatter_add(&batch.ids, &in_topk, 1)?
        .clamp(0.0, 1.0)?;
    let rest = (x.exp()? * (1.0 - topk_mask)?)?.sum(1)?;
    let log_rest = rest
        .clamp(f64::from(f32::MIN_POSITIVE), f64::INFINITY)?
        .log()?;
    let tail = (1.0 - weight_sums)?.relu()?;
    Ok((loss + ((lse - log_rest)? * tail)?.sum_all()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(tokens: Vec<u32>, rows: Vec<u32>, k: usize) -> Example {
        let m = rows.len();
        Example {
            next: rows.iter().map(|&r| tokens[r as usize + 1]).collect(),
            tokens,
            rows,
            topk_ids: (0..m * k).map(|i| i as u32 % 5).collect(),
            topk_logprobs: vec![-1.0; m * k],
            k,
        }
    }

    #[test]
    fn batches_are_right_padded_with_flat_rows() {
        let a = ex(vec![3, 4, 5], vec![1], 2);
        let b = ex(vec![6, 7, 8, 9, 1], vec![0, 3], 1);
        let batch = Batch::new(&[&a, &b], Objective::Distill, &Device::Cpu).unwrap();
        assert_eq!(batch.tokens.dims(), &[2, 5]);
        assert_eq!(batch.rows.to_vec1::<u32>().unwrap(), vec![1, 5, 8]);
        assert_eq!(batch.ids.dims(), &[3, 2]);
        // The narrower example's second column has weight 0.
        let w = batch.weights.to_vec2::<f32>().unwrap();
        assert_eq!(w[1][1], 0.0);
        assert!((w[0][1] - (-1f32).exp()).abs() < 1e-7);
        let tok = Batch::new(&[&a, &b], Objective::Tokens, &Device::Cpu).unwrap();
        assert_eq!(
            tok.ids.to_vec2::<u32>().unwrap(),
            vec![vec![5], vec![7], vec![1]]
        );
        assert_eq!(batch.real_tokens, 8);
    }

    #[test]
    fn packing_is_first_fit_and_keeps_flat_rows() {
        assert_eq!(
            pack_rows(&[5, 3, 4, 2, 9], 8),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
        let a = ex(vec![3, 4, 5], vec![1], 2);
        let b = ex(vec![6, 7, 8, 9, 1], vec![0, 3], 1);
        let batch = Batch::packed(&[&a, &b], 8, Objective::Distill, &Device::Cpu).unwrap();
        assert_eq!(batch.tokens.dims(), &[1, 8]);
        assert_eq!(batch.segments, Some(vec![vec![3, 5]]));
        // b's rows 0 and 3 sit after a's three tokens.
        assert_eq!(batch.rows.to_vec1::<u32>().unwrap(), vec![1, 3, 6]);
        assert_eq!((batch.real_tokens, batch.slots), (8, 8));
    }
}
