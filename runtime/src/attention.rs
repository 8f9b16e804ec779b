//! Fused attention on the CPU over a shared prefix and each sequence's own keys, with its own
//! backward: one op per layer instead of a dozen, and no `[queries, keys]` tensor kept alive.
//!
//! Why: composed from candle ops, attention writes the score matrix to memory six times (scores,
//! mask, max, shift, exp, sum) and the backward keeps every intermediate; a 2048-token prefill ran
//! at half the speed its FLOPs allow (BENCHMARKS.md), and training kept gigabytes of scores for the
//! backward. Here each block of 64 queries computes its scores against the keys it can see, takes
//! the softmax in a buffer that stays in cache, and multiplies by V, all with the `gemm` crate; the
//! backward recomputes those probabilities block by block (as FlashAttention does, Dao et al.
//! 2022) instead of storing them.
//!
//! Visibility is given per query as the whole prefix plus one contiguous range of the sequence's
//! own slots, which covers every mask the decoder builds: causal after a cache with left padding
//! (a padding query sees only itself), and packed rows (a token sees its own segment's earlier
//! tokens). Blocks compute scores only over the union of their queries' ranges, so the causal
//! upper triangle and other segments' tokens cost nothing.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_kernel::{mm, slice, softmax, with_values, Elem};
use crate::error::{Error, Result};
use crate::prefix::PrefixLayer;

/// Queries per block: the score buffer is `BLOCK x keys`, small enough to stay in cache.
const BLOCK: usize = 64;

/// Which of a sequence's own key slots (cache + new tokens) each query sees; every query also
/// sees the whole prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visibility {
    /// `[batch * queries]` half-open ranges `[lo, hi)` of own slots.
    ranges: Vec<(u32, u32)>,
    batch: usize,
    queries: usize,
    /// Own slots per sequence (cache length + new tokens).
    slots: usize,
}

impl Visibility {
    /// Causal attention for `t` new tokens after `past` cached slots, sequence `b` left-padded
    /// by `pads[b]` slots: a query sees the real slots up to itself; a padding query sees only
    /// itself (its output is never read, but its softmax must not be empty).
    pub fn causal(pads: &[usize], past: usize, t: usize) -> Self {
        let mut ranges = Vec::with_capacity(pads.len() * t);
        for &pad in pads {
            for i in 0..t {
                let q = past + i;
                let lo = if q >= pad { pad } else { q };
                ranges.push((lo as u32, q as u32 + 1));
            }
        }
        Self {
            ranges,
            batch: pads.len(),
            queries: t,
            slots: past + t,
        }
    }

    /// Packed rows of `t` tokens: `segments[r]` lists the lengths of the sequences packed at the
    /// start of row `r`; a token sees the earlier tokens of its own segment, padding only itself.
    pub fn packed(segments: &[Vec<usize>], t: usize) -> Self {
        let mut ranges = Vec::with_capacity(segments.len() * t);
        for segs in segments {
            let mut start = 0;
            for &len in segs {
                for i in start..start + len {
                    ranges.push((start as u32, i as u32 + 1));
                }
                start += len;
            }
            for i in start..t {
                ranges.push((i as u32, i as u32 + 1));
            }
        }
        Self {
            ranges,
            batch: segments.len(),
            queries: t,
            slots: t,
        }
    }
}

/// Softmax attention of `q: [b, kv_heads, groups * t, d]` (already scaled by `1/sqrt(d)`; rows
/// ordered (group, token)) over `prefix` (`[kv_heads, P, d]` keys and values shared by the batch,
/// with its logit bias if any) followed by each sequence's own `k, v: [b, kv_heads, slots, d]`,
/// as `vis` says. Returns `[b, kv_heads, groups * t, d]`. Differentiable in `q`, the prefix's
/// keys and values and `k, v` (the bias is a constant).
pub fn attention(
    q: &Tensor,
    prefix: Option<PrefixLayer<'_>>,
    k: &Tensor,
    v: &Tensor,
    vis: &Arc<Visibility>,
) -> Result<Tensor> {
    let (b, kvh, gt, d) = q.dims4()?;
    let (kb, kkvh, slots, kd) = k.dims4()?;
    if kb != b || kkvh != kvh || kd != d || v.dims() != k.dims() {
        return Err(Error::Msg(format!(
            "fused attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if vis.batch != b || vis.slots != slots || vis.queries == 0 || gt % vis.queries != 0 {
        return Err(Error::Msg(format!(
            "fused attention: visibility for {} x {} queries over {} slots, tensors {b} x {gt} over {slots}",
            vis.batch, vis.queries, vis.slots
        )));
    }
    if vis.ranges.len() != vis.batch * vis.queries
        || vis
            .ranges
            .iter()
            .any(|&(lo, hi)| lo >= hi || hi as usize > slots)
    {
        return Err(Error::Msg(format!(
            "fused attention: a visible range lies outside the {slots} slots or is empty"
        )));
    }
    // Keys of one KV head as one matrix: the prefix, then sequence 0's slots, sequence 1's, ...
    // (a copy of the new K/V, never of the prefix per sequence).
    let own = |x: &Tensor| -> Result<Tensor> {
        Ok(x.transpose(0, 1)?
            .contiguous()?
            .reshape((kvh, b * slots, d))?)
    };
    let (k_all, v_all, p) = match prefix {
        Some(PrefixLayer { k: kp, v: vp, .. }) if kp.dim(1)? > 0 => (
            Tensor::cat(&[kp, &own(k)?], 1)?.contiguous()?,
            Tensor::cat(&[vp, &own(v)?], 1)?.contiguous()?,
            kp.dim(1)?,
        ),
        _ => (own(k)?, own(v)?, 0),
    };
    let bias = match prefix {
        Some(pl) => pl.bias_values(kvh, "fused attention")?,
        None => Vec::new(),
    };
    let op = FusedAttention {
        dims: Dims {
            b,
            kvh,
            g: gt / vis.queries,
            t: vis.queries,
            d,
            p,
            slots,
        },
        vis: vis.clone(),
        bias: Arc::new(bias),
    };
    Ok(q.contiguous()?.apply_op3(&k_all, &v_all, op)?)
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    kvh: usize,
    g: usize,
    t: usize,
    d: usize,
    /// Prefix slots.
    p: usize,
    /// Own slots per sequence.
    slots: usize,
}

impl Dims {
    /// Rows of one KV head's key matrix.
    fn key_rows(&self) -> usize {
        self.p + self.b * self.slots
    }
}

struct FusedAttention {
    dims: Dims,
    vis: Arc<Visibility>,
    /// `[kv_heads, p]` logit bias of the prefix slots, or empty (none).
    bias: Arc<Vec<f32>>,
}

/// One block of queries of one (sequence, query head): where its keys are.
struct Block<'a, T> {
    /// `[nb, d]` queries.
    q: &'a [T],
    /// Visible own range per query.
    ranges: &'a [(u32, u32)],
    /// Union of the ranges.
    lo: usize,
    hi: usize,
    /// `[p, d]` prefix keys / values of this KV head.
    kp: &'a [T],
    vp: &'a [T],
    /// `[p]` logit bias of the prefix slots of this KV head, or empty.
    bias: &'a [f32],
    /// `[slots, d]` this sequence's own keys / values for this KV head.
    ko: &'a [T],
    vo: &'a [T],
}

impl<'a, T: Elem> Block<'a, T> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        dims: &Dims,
        vis: &'a Visibility,
        bias: &'a [f32],
        q: &'a [T],
        k: &'a [T],
        v: &'a [T],
        bi: usize,
        kh: usize,
        i0: usize,
    ) -> Self {
        let Dims { d, p, slots, .. } = *dims;
        let nb = q.len() / d;
        let ranges = &vis.ranges[bi * dims.t + i0..bi * dims.t + i0 + nb];
        let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0) as usize;
        let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0) as usize;
        let head = kh * dims.key_rows() * d;
        let own = head + (p + bi * slots) * d;
        Self {
            q,
            ranges,
            lo,
            hi,
            kp: &k[head..head + p * d],
            vp: &v[head..head + p * d],
            bias: bias.get(kh * p..(kh + 1) * p).unwrap_or(&[]),
            ko: &k[own..own + slots * d],
            vo: &v[own..own + slots * d],
        }
    }

    /// Score columns: the prefix, then own slots `lo..hi`.
    fn width(&self, p: usize) -> usize {
        p + self.hi - self.lo
    }

    /// The block's attention probabilities `[nb, width]` (masked entries 0).
    fn probabilities(&self, d: usize, p: usize) -> Vec<T> {
        let nb = self.q.len() / d;
        let w = self.width(p);
        let span = self.hi - self.lo;
        let mut s = vec![T::zero(); nb * w];
        mm(
            (nb, p, d),
            &mut s,
            w,
            false,
            self.q,
            (d, 1),
            self.kp,
            (1, d),
        );
        mm(
            (nb, span, d),
            &mut s[p..],
            w,
            false,
            self.q,
            (d, 1),
            &self.ko[self.lo * d..],
            (1, d),
        );
        for (row, &(rlo, rhi)) in s.chunks_mut(w).zip(self.ranges) {
            let (pre, own) = row.split_at_mut(p);
            for (x, &b) in pre.iter_mut().zip(self.bias) {
                *x += T::from_f64(b as f64);
            }
            let (a, b) = (rlo as usize - self.lo, rhi as usize - self.lo);
            own[..a].fill(T::zero());
            own[b..].fill(T::zero());
            softmax(pre, &mut own[a..b]);
        }
        s
    }
}

fn forward<T: Elem>(op: &FusedAttention, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    let (dims, vis, bias) = (&op.dims, &*op.vis, op.bias.as_slice());
    let Dims {
        kvh, g, t, d, p, ..
    } = *dims;
    let mut out = vec![T::zero(); q.len()];
    // One slab per (sequence, query head): `t` rows of `d`; blocks of BLOCK rows inside.
    out.par_chunks_mut(t * d)
        .zip(q.par_chunks(t * d))
        .enumerate()
        .for_each(|(slab, (o, qs))| {
            let (bi, kh) = (slab / (kvh * g), (slab / g) % kvh);
            o.par_chunks_mut(BLOCK * d)
                .zip(qs.par_chunks(BLOCK * d))
                .enumerate()
                .for_each(|(blk, (ob, qb))| {
                    let block = Block::new(dims, vis, bias, qb, k, v, bi, kh, blk * BLOCK);
                    let nb = qb.len() / d;
                    let w = block.width(p);
                    let s = block.probabilities(d, p);
                    mm((nb, d, p), ob, d, false, &s, (w, 1), block.vp, (d, 1));
                    mm(
                        (nb, d, block.hi - block.lo),
                        ob,
                        d,
                        p > 0,
                        &s[p..],
                        (w, 1),
                        &block.vo[block.lo * d..],
                        (d, 1),
                    );
                });
        });
    out
}

/// Gradients `(dq, dk, dv)` in the layouts of `q` and of the joined key / value matrices.
fn backward<T: Elem>(
    op: &FusedAttention,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    grad: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (dims, vis, bias) = (&op.dims, &*op.vis, op.bias.as_slice());
    let Dims {
        b,
        kvh,
        g,
        t,
        d,
        p,
        slots,
    } = *dims;
    let mut dq = vec![T::zero(); q.len()];
    // One task per (sequence, KV head): it owns the dq rows of its query heads and the gradient
    // of its own slots, and sums its share of the prefix's gradient, added up afterwards.
    let parts: Vec<[Vec<T>; 4]> = dq
        .par_chunks_mut(g * t * d)
        .enumerate()
        .map(|(task, dq_task)| {
            let (bi, kh) = (task / kvh, task % kvh);
            let mut dkp = vec![T::zero(); p * d];
            let mut dvp = vec![T::zero(); p * d];
            let mut dko = vec![T::zero(); slots * d];
            let mut dvo = vec![T::zero(); slots * d];
            let base = task * g * t * d;
            for gi in 0..g {
                for i0 in (0..t).step_by(BLOCK) {
                    let nb = BLOCK.min(t - i0);
                    let rows = base + (gi * t + i0) * d..base + (gi * t + i0 + nb) * d;
                    let block = Block::new(dims, vis, bias, &q[rows.clone()], k, v, bi, kh, i0);
                    let (lo, span, w) = (block.lo, block.hi - block.lo, block.width(p));
                    let (go, oo) = (&grad[rows.clone()], &out[rows.clone()]);
                    let pr = block.probabilities(d, p);
                    // dV += P^T dO
                    mm((p, d, nb), &mut dvp, d, true, &pr, (1, w), go, (d, 1));
                    mm(
                        (span, d, nb),
                        &mut dvo[lo * d..],
                        d,
                        true,
                        &pr[p..],
                        (1, w),
                        go,
                        (d, 1),
                    );
                    // dP = dO V^T, then dS = P * (dP - rowsum(dO * O)).
                    let mut ds = vec![T::zero(); nb * w];
                    mm((nb, p, d), &mut ds, w, false, go, (d, 1), block.vp, (1, d));
                    mm(
                        (nb, span, d),
                        &mut ds[p..],
                        w,
                        false,
                        go,
                        (d, 1),
                        &block.vo[lo * d..],
                        (1, d),
                    );
                    for r in 0..nb {
                        let dot = go[r * d..(r + 1) * d]
                            .iter()
                            .zip(&oo[r * d..(r + 1) * d])
                            .fold(T::zero(), |acc, (&x, &y)| acc + x * y);
                        for (s, &pv) in ds[r * w..(r + 1) * w].iter_mut().zip(&pr[r * w..]) {
                            *s = pv * (*s - dot);
                        }
                    }
                    // dQ = dS K; dK += dS^T Q.
                    let dqb = &mut dq_task[(gi * t + i0) * d..(gi * t + i0 + nb) * d];
                    mm((nb, d, p), dqb, d, false, &ds, (w, 1), block.kp, (d, 1));
                    mm(
                        (nb, d, span),
                        dqb,
                        d,
                        p > 0,
                        &ds[p..],
                        (w, 1),
                        &block.ko[lo * d..],
                        (d, 1),
                    );
                    mm((p, d, nb), &mut dkp, d, true, &ds, (1, w), block.q, (d, 1));
                    mm(
                        (span, d, nb),
                        &mut dko[lo * d..],
                        d,
                        true,
                        &ds[p..],
                        (1, w),
                        block.q,
                        (d, 1),
                    );
                }
            }
            [dkp, dvp, dko, dvo]
        })
        .collect();
    let rows = dims.key_rows();
    let mut dk = vec![T::zero(); kvh * rows * d];
    let mut dv = vec![T::zero(); kvh * rows * d];
    for (task, [dkp, dvp, dko, dvo]) in parts.into_iter().enumerate() {
        let (bi, kh) = (task / kvh, task % kvh);
        let head = kh * rows * d;
        for (dst, src) in [(&mut dk, &dkp), (&mut dv, &dvp)] {
            for (x, &y) in dst[head..head + p * d].iter_mut().zip(src) {
                *x += y;
            }
        }
        let own = head + (p + bi * slots) * d;
        dk[own..own + slots * d].copy_from_slice(&dko);
        dv[own..own + slots * d].copy_from_slice(&dvo);
    }
    debug_assert_eq!(b * kvh, dq.len() / (g * t * d));
    (dq, dk, dv)
}

impl FusedAttention {
    fn check_shapes(&self, lq: &Layout, lk: &Layout) -> candle_core::Result<()> {
        let Dims {
            b, kvh, g, t, d, ..
        } = self.dims;
        if lq.shape().dims() != [b, kvh, g * t, d]
            || lk.shape().dims() != [kvh, self.dims.key_rows(), d]
        {
            candle_core::bail!(
                "fused attention: shapes {:?} / {:?} do not match {:?}",
                lq.shape(),
                lk.shape(),
                self.dims
            );
        }
        Ok(())
    }

    fn backward_typed<T: Elem>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (dq, dk, dv) = with_values::<T, _, 5>([q, k, v, res, grad], |[q, k, v, o, g]| {
            Ok(backward(self, q, k, v, o, g))
        })?;
        Ok((
            Tensor::from_vec(dq, q.shape(), q.device())?,
            Tensor::from_vec(dk, k.shape(), k.device())?,
            Tensor::from_vec(dv, v.shape(), v.device())?,
        ))
    }
}

impl candle_core::CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check_shapes(lq, lk)?;
        if lv.shape() != lk.shape() {
            candle_core::bail!(
                "fused attention: values {:?} vs keys {:?}",
                lv.shape(),
                lk.shape()
            );
        }
        let out = match sq {
            CpuStorage::F32(_) => CpuStorage::F32(forward::<f32>(
                self,
                slice(sq, lq)?,
                slice(sk, lk)?,
                slice(sv, lv)?,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(forward::<f64>(
                self,
                slice(sq, lq)?,
                slice(sk, lk)?,
                slice(sv, lv)?,
            )),
            _ => candle_core::bail!("fused attention: f32 or f64 only"),
        };
        Ok((out, lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.backward_typed::<f32>(q, k, v, res, grad)?,
            DType::F64 => self.backward_typed::<f64>(q, k, v, res, grad)?,
            d => candle_core::bail!("fused attention: no backward in {d:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The plain formulation: scores against prefix ++ own keys, an additive mask from the
    /// ranges (carrying the prefix's bias `[kv_heads, p]`), softmax, times V.
    fn reference(
        q: &Tensor,
        (kp, vp, bias): (&Tensor, &Tensor, &[f64]),
        k: &Tensor,
        v: &Tensor,
        vis: &Visibility,
    ) -> candle_core::Result<Tensor> {
        let (b, kvh, gt, _) = q.dims4()?;
        let p = kp.dim(1)?;
        let t = vis.queries;
        let w = p + vis.slots;
        let mut mask = vec![f64::NEG_INFINITY; b * kvh * gt * w];
        for bi in 0..b {
            for h in 0..kvh {
                for r in 0..gt {
                    let (lo, hi) = vis.ranges[bi * t + r % t];
                    let row = &mut mask[((bi * kvh + h) * gt + r) * w..][..w];
                    for (j, x) in row[..p].iter_mut().enumerate() {
                        *x = bias.get(h * p + j).copied().unwrap_or(0.0);
                    }
                    row[p + lo as usize..p + hi as usize].fill(0.0);
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, kvh, gt, w), q.device())?.to_dtype(q.dtype())?;
        let (kall, vall) = if p == 0 {
            (k.clone(), v.clone())
        } else {
            (
                Tensor::cat(&[&kp.unsqueeze(0)?.repeat((b, 1, 1, 1))?, k], 2)?,
                Tensor::cat(&[&vp.unsqueeze(0)?.repeat((b, 1, 1, 1))?, v], 2)?,
            )
        };
        let s = q.matmul(&kall.t()?)?.broadcast_add(&mask)?;
        let m = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&m)?.exp()?;
        let pr = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        pr.matmul(&vall.contiguous()?)
    }

    /// The fused op against [`reference`], forward and gradients; `biased`: the prefix carries a
    /// random logit bias.
    fn check(vis: Visibility, p: usize, dtype: DType, biased: bool) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, kvh, g, d) = (vis.batch, 2, 3, 8);
        let gt = g * vis.queries;
        let rnd = |shape: &[usize]| Tensor::randn(0f64, 1.0, shape, &dev)?.to_dtype(dtype);
        let q = Var::from_tensor(&rnd(&[b, kvh, gt, d])?)?;
        let kp = Var::from_tensor(&rnd(&[kvh, p, d])?)?;
        let vp = Var::from_tensor(&rnd(&[kvh, p, d])?)?;
        let k = Var::from_tensor(&rnd(&[b, kvh, vis.slots, d])?)?;
        let v = Var::from_tensor(&rnd(&[b, kvh, vis.slots, d])?)?;
        let weights = rnd(&[b, kvh, gt, d])?;
        let vis = Arc::new(vis);
        let bias = if biased {
            Some((Tensor::randn(0f32, 1.0, (kvh, p), &dev)? * 2.0)?)
        } else {
            None
        };
        let prefix = PrefixLayer {
            k: &kp,
            v: &vp,
            bias: bias.as_ref(),
        };
        let fused = attention(&q, Some(prefix), &k, &v, &vis).map_err(candle_core::Error::wrap)?;
        let bias: Vec<f64> = match &bias {
            Some(b) => b.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?,
            None => Vec::new(),
        };
        let plain = reference(&q, (&kp, &vp, &bias), &k, &v, &vis)?;
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
        let diff = (&fused - &plain)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        assert!(diff < tol, "forward differs by {diff:e}");
        let gf = (fused * &weights)?.sum_all()?.backward()?;
        let gp = (plain * &weights)?.sum_all()?.backward()?;
        let mut vars = vec![("q", &q), ("k", &k), ("v", &v)];
        if p > 0 {
            vars.extend([("kp", &kp), ("vp", &vp)]);
        }
        for (name, var) in vars {
            let a = gf.get(var.as_tensor()).expect("fused gradient");
            let b = gp.get(var.as_tensor()).expect("plain gradient");
            let diff = (a - b)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            assert!(diff < tol * 10.0, "gradient of {name} differs by {diff:e}");
        }
        Ok(())
    }

    #[test]
    fn matches_the_plain_formulation_causal_with_cache_and_padding() -> candle_core::Result<()> {
        // 3 sequences, 70 new tokens (two blocks) after 5 cached slots, padded 0, 2 and 7 (the
        // last one's first new query is itself padding).
        check(Visibility::causal(&[0, 2, 7], 5, 70), 4, DType::F64, false)?;
        check(Visibility::causal(&[0, 2, 7], 5, 70), 4, DType::F32, false)?;
        // No prefix at all, one sequence.
        check(Visibility::causal(&[0], 0, 9), 0, DType::F64, false)
    }

    #[test]
    fn a_prefix_bias_weighs_its_slots_as_the_plain_formulation_does() -> candle_core::Result<()> {
        check(Visibility::causal(&[0, 2, 7], 5, 70), 4, DType::F64, true)?;
        check(Visibility::causal(&[0, 3], 0, 9), 6, DType::F32, true)?;
        check(
            Visibility::packed(&[vec![3, 4], vec![7]], 7),
            5,
            DType::F64,
            true,
        )
    }

    #[test]
    fn visibility_that_does_not_fit_is_an_error_not_a_panic() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 1, 8, 4), DType::F32, &dev)?;
        let k = Tensor::zeros((1, 1, 8, 4), DType::F32, &dev)?;
        // Segments of 5 + 6 tokens claimed in a row of 8.
        let vis = Arc::new(Visibility::packed(&[vec![5, 6]], 8));
        assert!(attention(&q, None, &k, &k, &vis).is_err());
        // Causal over more slots than the keys have.
        let vis = Arc::new(Visibility::causal(&[0], 3, 8));
        assert!(attention(&q, None, &k, &k, &vis).is_err());
        Ok(())
    }

    #[test]
    fn matches_the_plain_formulation_packed() -> candle_core::Result<()> {
        // Row 0: segments of 30, 50 and 40 (crossing block edges), 10 padding; row 1: one segment.
        check(
            Visibility::packed(&[vec![30, 50, 40], vec![130]], 130),
            6,
            DType::F64,
            false,
        )?;
        check(
            Visibility::packed(&[vec![30, 50, 40], vec![130]], 130),
            6,
            DType::F32,
            false,
        )
    }
}
