//! Keys of a cartridge's selected slots refined by gradient descent, so that the few slots read
//! what the whole corpus read ([`crate::InitKind::SelectedRefined`]).
//!
//! Why: the value fit ([`crate::value_fit`]) gives the best read for keys held fixed, but the keys
//! are still corpus keys picked one by one, each standing only for itself. Here, per layer and
//! KV head, the keys move, against the value fit's observers (the corpus's queries where they
//! stood and moved to the end of their segment, [`REFINE_ROWS`] of each kind) and its target (the
//! segment's attention output), from the selected keys, with the fitted values held. Each head is
//! a small problem of its own: `p` keys, a few thousand observer rows, [`REFINE_STEPS`] Adam steps.
//! Moving the values as well read worse on quenmar's questions (BENCHMARKS.md, "Training").

use candle_core::{DType, Tensor, Var, D};

use crate::error::Result;
use crate::optim::{Adam, AdamParams};

/// Observer rows kept per segment, KV head and kind of observer. 4,096 against 2,048: quenmar
/// (p = 628) -3.976 against -3.982 in answer log-likelihood, tidewright -4.680 against -4.687;
/// the refined start took 22 min 32 s against 12 min 54 s for quenmar on 2 cores.
pub const REFINE_ROWS: usize = 4096;

/// Adam steps per head.
pub const REFINE_STEPS: usize = 150;

/// Adam's learning rate (keys are post-RoPE, elements of order 1).
pub const REFINE_LR: f64 = 3e-3;

/// Masked score: far below any real score, finite so that no gradient becomes NaN.
const HIDDEN: f32 = -1e9;

/// A head's observers: queries, what they read from their whole segment, and what they may see.
#[derive(Default)]
pub struct Observed {
    /// `[rows, d]` queries, post-RoPE at their observer positions, scaled as the model scales them.
    q: Vec<Tensor>,
    /// `[rows, d]` their attention outputs over the whole segment.
    o: Vec<Tensor>,
    /// Per row: its segment and the last segment position it sees.
    sees: Vec<(usize, usize)>,
}

impl Observed {
    /// Adds a head's observer rows of one segment and kind, evenly spaced, at most
    /// [`REFINE_ROWS`]: the queries, their reads over the segment, and what they see.
    /// `q: [groups * n, d]` (rows (group, token)), `k, v: [n, d]`; `at_end`: the queries were
    /// moved to the segment's end and see all of it.
    pub fn add(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segment: usize,
        at_end: bool,
    ) -> Result<()> {
        let (n, _) = k.dims2()?;
        let total = q.dim(0)?;
        let step = total.div_ceil(REFINE_ROWS).max(1);
        let rows: Vec<u32> = (0..total).step_by(step).map(|r| r as u32).collect();
        let sees: Vec<(usize, usize)> = rows
            .iter()
            .map(|&r| (segment, if at_end { n - 1 } else { r as usize % n }))
            .collect();
        let mut mask = vec![0f32; rows.len() * n];
        for (r, &(_, last)) in sees.iter().enumerate() {
            mask[r * n + last + 1..(r + 1) * n].fill(f32::NEG_INFINITY);
        }
        let q = q.index_select(&Tensor::from_vec(rows.clone(), rows.len(), q.device())?, 0)?;
        let mask = Tensor::from_vec(mask, (rows.len(), n), q.device())?;
        let o = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? + mask)?)?.matmul(v)?;
        self.q.push(q);
        self.o.push(o);
        self.sees.extend(sees);
        Ok(())
    }

    /// The read error of these observers against slots `slots[j]` = (segment, position) of
    /// the keys' segments (see [`ReadError`]); `None` without observers.
    pub fn read_error(&self, slots: &[(usize, usize)]) -> Result<Option<ReadError>> {
        if self.q.is_empty() {
            return Ok(None);
        }
        let q = Tensor::cat(&self.q, 0)?;
        let o = Tensor::cat(&self.o, 0)?;
        let (rows, p) = (self.sees.len(), slots.len());
        let mut mask = vec![0f32; rows * p];
        for (r, &(seg, last)) in self.sees.iter().enumerate() {
            for (j, &(s, pos)) in slots.iter().enumerate() {
                if s != seg || pos > last {
                    mask[r * p + j] = HIDDEN;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (rows, p), q.device())?;
        let scale = o.sqr()?.mean_all()?.to_scalar::<f32>()?.max(1e-12) as f64;
        Ok(Some(ReadError { q, o, mask, scale }))
    }
}

/// The observers' mean squared read error with a head's slots, relative to the mean square of
/// what they read from the whole segment.
pub struct ReadError {
    q: Tensor,
    o: Tensor,
    /// `[rows, p]`: 0 where a row sees the slot, [`HIDDEN`] where not.
    mask: Tensor,
    scale: f64,
}

impl ReadError {
    /// The error with `keys, values: [p, d]` (each key in its segment's frame), as a graph
    /// (differentiable in both).
    pub fn of(&self, keys: &Tensor, values: &Tensor) -> Result<Tensor> {
        let s = (self.q.matmul(&keys.t()?)? + &self.mask)?;
        // A softmax written out: candle's fused one has no backward (DESIGN.md §3).
        let e = s
            .broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?
            .exp()?;
        let a = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        Ok(((a.matmul(values)? - &self.o)?.sqr()?.mean_all()? / self.scale)?)
    }

    /// `keys: [p, d]` refined by [`REFINE_STEPS`] Adam steps on this error, `values` held.
    pub fn refine(&self, keys: &Tensor, values: &Tensor) -> Result<Tensor> {
        let k = Var::from_tensor(&keys.to_dtype(DType::F32)?.contiguous()?)?;
        let values = values.to_dtype(DType::F32)?.detach();
        let mut adam = Adam::new(vec![k.clone()], AdamParams::default())?;
        for _ in 0..REFINE_STEPS {
            let grads = self.of(k.as_tensor(), &values)?.backward()?;
            adam.update(&[grads.get(k.as_tensor()).cloned()], REFINE_LR)?;
        }
        Ok(k.as_tensor().to_dtype(keys.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Refining lowers the observers' read error, for both kinds of observer over two segments,
    /// and a slot no observer sees stays where it was.
    #[test]
    fn refinement_lowers_the_read_error() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d, groups) = (120, 8, 2);
        let mut observed = Observed::default();
        let mut segments = Vec::new();
        for segment in 0..2 {
            let q = (Tensor::randn(0f32, 1.0, (groups * n, d), &dev)? * 0.7)?;
            let k = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
            observed.add(&q, &k, &v, segment, false)?;
            observed.add(&q, &k, &v, segment, true)?;
            segments.push((k, v));
        }
        // Every 10th key of segment 0, then every 20th of segment 1.
        let slots: Vec<(usize, usize)> = (0..n)
            .step_by(10)
            .map(|i| (0, i))
            .chain((0..n).step_by(20).map(|i| (1, i)))
            .collect();
        // A slot of a third segment, which no observer sees.
        let slots: Vec<(usize, usize)> = slots.into_iter().chain([(2, 0)]).collect();
        // The third segment's slot takes a key and value of segment 1 (it is never seen).
        let pick = |values: bool| -> Result<Tensor> {
            let rows = slots
                .iter()
                .map(|&(s, i)| {
                    let (k, v) = &segments[s.min(1)];
                    Ok(if values { v } else { k }.get(i)?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&rows, 0)?)
        };
        let (keys, values) = (pick(false)?, pick(true)?);
        let error = observed.read_error(&slots)?.expect("observers");
        let before = error.of(&keys, &values)?.to_scalar::<f32>()?;
        let refined = error.refine(&keys, &values)?;
        let after = error.of(&refined, &values)?.to_scalar::<f32>()?;
        assert!(after < 0.9 * before, "read error {before} -> {after}");
        let last = slots.len() - 1;
        let unseen = (refined.get(last)? - keys.get(last)?)?
            .abs()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(unseen, 0.0, "an unobserved slot moved");
        Ok(())
    }
}
