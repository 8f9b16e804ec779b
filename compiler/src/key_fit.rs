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
use cartridge_runtime::kernels;
use rayon::prelude::*;

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

/// Observer rows per block of the fused error on the CPU: a block's `[rows, p]` scores stay in
/// cache.
const ROW_BLOCK: usize = 64;

/// Fixed groups of blocks whose key gradients are summed in group order, so that the sum (and
/// so the refined keys) does not depend on how the threads share the work (more groups than
/// cores, so that any number of cores up to this has work).
const CHUNKS: usize = 32;

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
        // A row that sees no slot reads all of them evenly whatever the keys are: it adds a
        // constant to the error and nothing to the keys' gradient.
        let sees_any: Vec<bool> = (0..rows)
            .map(|r| mask[r * p..(r + 1) * p].contains(&0.0))
            .collect();
        let cpu = q.device().is_cpu().then(|| -> Result<CpuRows> {
            Ok(CpuRows {
                q: q.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                o: o.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                visible: mask.iter().map(|&m| m == 0.0).collect(),
                sees_any: sees_any.clone(),
                d: q.dim(1)?,
            })
        });
        let sees_any_rows = Tensor::from_vec(
            sees_any
                .iter()
                .map(|&s| if s { 1f32 } else { 0.0 })
                .collect(),
            (rows, 1),
            q.device(),
        )?
        .to_dtype(q.dtype())?;
        let mask = Tensor::from_vec(mask, (rows, p), q.device())?;
        let scale = o.sqr()?.mean_all()?.to_scalar::<f32>()?.max(1e-12) as f64;
        Ok(Some(ReadError {
            q,
            o,
            mask,
            sees_any: sees_any_rows,
            scale,
            cpu: cpu.transpose()?,
        }))
    }
}

/// A [`ReadError`]'s observers as row-major f32, for the fused CPU error.
struct CpuRows {
    /// `[rows, d]` queries.
    q: Vec<f32>,
    /// `[rows, d]` their reads over the whole segment.
    o: Vec<f32>,
    /// `[rows, p]`: whether the row sees the slot.
    visible: Vec<bool>,
    /// `[rows]`: whether the row sees any slot.
    sees_any: Vec<bool>,
    d: usize,
}

/// The observers' mean squared read error with a head's slots, relative to the mean square of
/// what they read from the whole segment.
pub struct ReadError {
    q: Tensor,
    o: Tensor,
    /// `[rows, p]`: 0 where a row sees the slot, [`HIDDEN`] where not.
    mask: Tensor,
    /// `[rows, 1]`: 1 where a row sees any slot, 0 where it sees none.
    sees_any: Tensor,
    scale: f64,
    /// The same observers for [`Self::loss_and_grad`] (on the CPU only).
    cpu: Option<CpuRows>,
}

impl ReadError {
    /// The error with `keys, values: [p, d]` (each key in its segment's frame), as a graph
    /// (differentiable in both).
    pub fn of(&self, keys: &Tensor, values: &Tensor) -> Result<Tensor> {
        // A row that sees no slot gets scores of 0 before the mask, so that its even read does
        // not pass the keys a gradient (its masked scores round to the same -1e9 anyway).
        let s = (self.q.matmul(&keys.t()?)?.broadcast_mul(&self.sees_any)? + &self.mask)?;
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
        let value_rows: Option<Vec<f32>> = match &self.cpu {
            Some(_) => Some(values.flatten_all()?.to_vec1()?),
            None => None,
        };
        for _ in 0..REFINE_STEPS {
            let grad = match &value_rows {
                Some(v) => {
                    let current: Vec<f32> = k.as_tensor().flatten_all()?.to_vec1()?;
                    let (_, grad) = self.loss_and_grad(&current, v)?;
                    Tensor::from_vec(grad, k.dims(), k.device())?
                }
                None => {
                    let grads = self.of(k.as_tensor(), &values)?.backward()?;
                    match grads.get(k.as_tensor()) {
                        Some(g) => g.clone(),
                        None => continue,
                    }
                }
            };
            adam.update(&[Some(grad)], REFINE_LR)?;
        }
        Ok(k.as_tensor().to_dtype(keys.dtype())?)
    }

    /// The error of [`Self::of`] and its gradient in `keys`, for `keys, values: [p, d]` as
    /// row-major f32 on the CPU (`None` there: the observers are on another device).
    ///
    /// Why: built from candle ops, each of the refinement's steps wrote about twenty
    /// `[rows, p]` tensors forward and backward (8,192 x 512 for quenmar), and the refinement of
    /// a 512-token start took most of an hour on 2 cores, nearly all of it in those passes. Here
    /// blocks of [`ROW_BLOCK`] rows go through scores, softmax, reads, error and the backward
    /// while their scores stay in cache: four small matrix products and three passes per block.
    /// `S = Q K^T` (hidden slots excluded), `A = softmax(S)`, `L = |A V - O|^2 / (rows d scale)`;
    /// `dA = dL/d(AV) V^T`, `dS = A (dA - sum_j A_j dA_j)`, `dK = dS^T Q`.
    fn loss_and_grad(&self, keys: &[f32], values: &[f32]) -> Result<(f64, Vec<f32>)> {
        let Some(cpu) = &self.cpu else {
            return Err(crate::error::Error::Config(
                "the fused read error runs on the CPU only".into(),
            ));
        };
        let d = cpu.d;
        let p = keys.len() / d;
        let rows = cpu.q.len() / d;
        debug_assert_eq!(keys.len(), p * d, "keys are [p, d]");
        debug_assert_eq!(values.len(), p * d, "values are [p, d]");
        debug_assert_eq!(
            cpu.visible.len(),
            rows * p,
            "the keys are the slots observed"
        );
        let blocks = rows.div_ceil(ROW_BLOCK);
        let per_chunk = blocks.div_ceil(CHUNKS);
        let denominator = (rows * d) as f64 * self.scale;
        let d_read = (2.0 / denominator) as f32;
        let parts: Vec<(f64, Vec<f32>)> = (0..CHUNKS)
            .into_par_iter()
            .map(|chunk| {
                let mut grad = vec![0f32; p * d];
                let mut sum_sq = 0f64;
                let mut a = vec![0f32; ROW_BLOCK * p];
                let mut da = vec![0f32; ROW_BLOCK * p];
                let mut y = vec![0f32; ROW_BLOCK * d];
                for block in chunk * per_chunk..((chunk + 1) * per_chunk).min(blocks) {
                    let r0 = block * ROW_BLOCK;
                    let n = ROW_BLOCK.min(rows - r0);
                    let q = &cpu.q[r0 * d..(r0 + n) * d];
                    let (a, da, y) = (&mut a[..n * p], &mut da[..n * p], &mut y[..n * d]);
                    kernels::matmul((n, p, d), a, p, false, q, (d, 1), keys, (1, d));
                    for (r, row) in a.chunks_mut(p).enumerate() {
                        softmax_over_visible(row, &cpu.visible[(r0 + r) * p..(r0 + r + 1) * p]);
                    }
                    kernels::matmul((n, d, p), y, d, false, a, (p, 1), values, (d, 1));
                    // The read's error, then `y` becomes the error's gradient in the read.
                    for (y, &o) in y.iter_mut().zip(&cpu.o[r0 * d..(r0 + n) * d]) {
                        let e = *y - o;
                        sum_sq += f64::from(e) * f64::from(e);
                        *y = d_read * e;
                    }
                    kernels::matmul((n, p, d), da, p, false, y, (d, 1), values, (1, d));
                    // `a` becomes dS (0 on a row that sees no slot: see `read_error`).
                    for (r, (a, da)) in a.chunks_mut(p).zip(da.chunks(p)).enumerate() {
                        if !cpu.sees_any[r0 + r] {
                            a.fill(0.0);
                            continue;
                        }
                        let dot: f32 = a.iter().zip(da.iter()).map(|(a, g)| a * g).sum();
                        for (a, &g) in a.iter_mut().zip(da.iter()) {
                            *a *= g - dot;
                        }
                    }
                    kernels::matmul((p, d, n), &mut grad, d, true, a, (1, p), q, (d, 1));
                }
                (sum_sq, grad)
            })
            .collect();
        let mut grad = vec![0f32; p * d];
        let mut sum_sq = 0f64;
        for (s, g) in parts {
            sum_sq += s;
            for (total, g) in grad.iter_mut().zip(g) {
                *total += g;
            }
        }
        Ok((sum_sq / denominator, grad))
    }
}

/// `row <- softmax(row)` over the entries `visible` marks, 0 elsewhere; a row that sees no slot
/// reads all of them evenly, as the masked graph does (every score is then equally hidden).
fn softmax_over_visible(row: &mut [f32], visible: &[bool]) {
    if !visible.contains(&true) {
        row.fill(1.0 / row.len() as f32);
        return;
    }
    for (s, &v) in row.iter_mut().zip(visible) {
        if !v {
            *s = f32::NEG_INFINITY;
        }
    }
    kernels::softmax(row);
    // Exactly 0 (the softmax leaves ~1e-38), so that a hidden slot gets no gradient at all.
    for (s, &v) in row.iter_mut().zip(visible) {
        if !v {
            *s = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `count` random segments of `n` keys and values `[n, d]`, each observed by two query heads
    /// per KV head in both kinds (in place and at the end); returns the observers and the
    /// segments' `(k, v)`.
    fn observed_segments(
        count: usize,
        n: usize,
        d: usize,
    ) -> Result<(Observed, Vec<(Tensor, Tensor)>)> {
        let dev = Device::Cpu;
        let mut observed = Observed::default();
        let mut segments = Vec::new();
        for segment in 0..count {
            let q = (Tensor::randn(0f32, 1.0, (2 * n, d), &dev)? * 0.7)?;
            let k = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
            observed.add(&q, &k, &v, segment, false)?;
            observed.add(&q, &k, &v, segment, true)?;
            segments.push((k, v));
        }
        Ok((observed, segments))
    }

    /// The fused CPU error and gradient equal the graph's (candle's autograd through the masked
    /// softmax): rows that see some slots, rows that see none (segment 0 has no slot), more rows
    /// than one block and chunk.
    #[test]
    fn the_fused_error_and_gradient_match_the_graph() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d) = (700, 8);
        let (observed, segments) = observed_segments(2, n, d)?;
        let slots: Vec<(usize, usize)> = (0..n).step_by(19).map(|i| (1, i)).collect();
        let (k, v) = &segments[1];
        let pick = |t: &Tensor| -> Result<Tensor> {
            let rows = slots
                .iter()
                .map(|&(_, i)| Ok(t.get(i)?))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&rows, 0)?)
        };
        let keys = (pick(k)? + Tensor::randn(0f32, 0.3, (slots.len(), d), &dev)?)?;
        let values = pick(v)?;
        let error = observed.read_error(&slots)?.expect("observers");
        let rows = error.q.dim(0)?;
        assert!(rows > ROW_BLOCK * CHUNKS, "{rows} rows");
        let var = Var::from_tensor(&keys)?;
        let graph = error.of(var.as_tensor(), &values)?;
        let want_grad: Vec<f32> = graph
            .backward()?
            .get(var.as_tensor())
            .expect("a gradient")
            .flatten_all()?
            .to_vec1()?;
        let (loss, grad) = error.loss_and_grad(
            &keys.flatten_all()?.to_vec1()?,
            &values.flatten_all()?.to_vec1()?,
        )?;
        let want = f64::from(graph.to_scalar::<f32>()?);
        assert!((loss - want).abs() <= 1e-5 * want, "loss {loss} vs {want}");
        let largest = want_grad.iter().fold(0f32, |m, g| m.max(g.abs()));
        assert!(largest > 0.0);
        for (i, (g, w)) in grad.iter().zip(&want_grad).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * largest,
                "gradient {i}: {g} vs {w} (largest {largest})"
            );
        }
        // Slots of a segment no observer belongs to: every row is blind, and neither form
        // passes the keys any gradient.
        let blind: Vec<(usize, usize)> = slots.iter().map(|&(_, i)| (2, i)).collect();
        let error = observed.read_error(&blind)?.expect("observers");
        let (_, grad) = error.loss_and_grad(
            &keys.flatten_all()?.to_vec1()?,
            &values.flatten_all()?.to_vec1()?,
        )?;
        assert!(
            grad.iter().all(|&g| g == 0.0),
            "fused gradient of blind rows"
        );
        let graph = error.of(var.as_tensor(), &values)?.backward()?;
        let graph_grad = graph.get(var.as_tensor()).expect("a gradient");
        assert_eq!(graph_grad.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    /// Off the CPU, `refine` steps on the graph's gradient; it ends where the fused steps do.
    #[test]
    fn the_graph_and_the_fused_refinement_agree() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d) = (150, 8);
        let (observed, segments) = observed_segments(1, n, d)?;
        let (k, v) = &segments[0];
        let slots: Vec<(usize, usize)> = (0..n).step_by(10).map(|i| (0, i)).collect();
        let index = Tensor::new(
            slots.iter().map(|&(_, i)| i as u32).collect::<Vec<_>>(),
            &dev,
        )?;
        let (keys, values) = (k.index_select(&index, 0)?, v.index_select(&index, 0)?);
        let fused = observed.read_error(&slots)?.expect("observers");
        let mut graph = observed.read_error(&slots)?.expect("observers");
        graph.cpu = None;
        let (a, b) = (fused.refine(&keys, &values)?, graph.refine(&keys, &values)?);
        let moved = (&a - &keys)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let apart = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(moved > 0.1, "the keys moved by {moved}");
        assert!(
            apart < 1e-2 * moved,
            "the two refinements differ by {apart} ({moved} moved)"
        );
        Ok(())
    }

    /// Refining lowers the observers' read error, for both kinds of observer over two segments,
    /// and a slot no observer sees stays where it was.
    #[test]
    fn refinement_lowers_the_read_error() -> Result<()> {
        let (n, d) = (120, 8);
        let (observed, segments) = observed_segments(2, n, d)?;
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
