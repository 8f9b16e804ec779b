//! LM head + top-k cross-entropy fused over row blocks, with the gradient computed in the forward
//! (DESIGN.md §3: "a fused LM head + top-k loss over row blocks, never materialising
//! [tokens, vocab] logits for backward").
//!
//! Per target row `r` with hidden state `h_r`, logits `z = W h_r`, weights `w_k` on ids `i_k` and
//! `s = sum_k w_k`: `loss_r = s * lse(z) - sum_k w_k z[i_k]`, and
//! `d loss_r / d h_r = W^T (s * softmax(z) - sum_k w_k e_{i_k})`. With a tail mass `t` (the
//! teacher's probability outside its top-k, `Objective::DistillTail`), the rest of the vocabulary
//! is one more class: `loss_r += t * (lse(z) - log sum_{j not in top-k} exp(z_j))`, adding
//! `t * softmax(z) - t * exp(z_j) / sum_{j not in top-k} exp(z_j)` (on the rest) to the
//! logits' gradient. The loss is the last op of the
//! graph and only scales each row, so the forward computes both over blocks of rows (one
//! `[block, vocab]` buffer at a time) and keeps the `[m, hidden]` unit gradient; the backward only
//! multiplies it by the incoming per-row gradient. Autograd would instead keep several
//! `[m, vocab]` tensors alive until the backward.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use cartridge_runtime::LinearProducts;

/// Rows per block: a `[ROW_BLOCK, vocab]` buffer (~25 MB for a 49k vocabulary in f32).
const ROW_BLOCK: usize = 128;

/// The fused op; apply it to the target rows' hidden states `[m, hidden]` to get `[m]` losses.
#[derive(Debug, Clone)]
pub struct FusedTopkLoss {
    /// The LM head `[vocab, hidden]` and its products.
    pub lm_head: LinearProducts,
    /// `[m, k]` ids.
    pub ids: Tensor,
    /// `[m, k]` weights, in the hidden states' dtype.
    pub weights: Tensor,
    /// `[m]` weight sums, same dtype.
    pub weight_sums: Tensor,
    /// Whether the teacher's mass outside each row's top-k, `max(0, 1 - weight_sum)`, is one
    /// more class.
    pub tail_class: bool,
    /// Whether to compute the unit gradient (false for evaluation: half the work).
    pub with_grad: bool,
    grad: Arc<Mutex<Option<Tensor>>>,
}

impl FusedTopkLoss {
    /// The op for these targets.
    pub fn new(
        lm_head: LinearProducts,
        ids: Tensor,
        weights: Tensor,
        weight_sums: Tensor,
        tail_class: bool,
        with_grad: bool,
    ) -> Self {
        Self {
            lm_head,
            ids,
            weights,
            weight_sums,
            tail_class,
            with_grad,
            grad: Arc::new(Mutex::new(None)),
        }
    }

    /// Per-row losses and unit gradients of `x: [m, hidden]` (no graph).
    fn compute(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        blockwise(
            &self.lm_head,
            &self.ids,
            &self.weights,
            &self.weight_sums,
            self.tail_class,
            x,
            self.with_grad,
        )
    }
}

/// The block loop behind both forms: per-row losses `[m]` and, when `with_grad`, the unit
/// gradient `[m, hidden]` in `x`'s dtype. Logits of half-precision rows are widened to f32 after
/// the matmul, so the log-sum-exp and softmax run in f32 (`weights` and `weight_sums` must be in
/// that accumulation dtype: f32, or f64 for f64 rows). Plain tensor ops: any device.
fn blockwise(
    lm_head: &LinearProducts,
    ids: &Tensor,
    weights: &Tensor,
    weight_sums: &Tensor,
    tail_class: bool,
    x: &Tensor,
    with_grad: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let m = x.dim(0)?;
    let acc = accumulation_dtype(x.dtype());
    let mut losses = Vec::new();
    let mut grads = Vec::new();
    let mut start = 0;
    while start < m {
        let len = ROW_BLOCK.min(m - start);
        let xb = x.narrow(0, start, len)?;
        let ids = ids.narrow(0, start, len)?.contiguous()?;
        let w = weights.narrow(0, start, len)?.contiguous()?;
        let s = weight_sums.narrow(0, start, len)?;
        let z = lm_head.xwt(&xb)?.to_dtype(acc)?;
        let max = z.max_keepdim(D::Minus1)?;
        let e = z.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let lse = (sum.log()? + &max)?.squeeze(1)?;
        let picked = (z.gather(&ids, 1)? * &w)?.sum(1)?;
        let mut loss = ((&lse * &s)? - picked)?;
        // The rest of the vocabulary: `e` with the top-k columns zeroed (each exactly, `e - e`;
        // weight-0 columns pad narrower rows and are not the teacher's), and its sum.
        let rest = if tail_class {
            let t = (1.0 - &s)?.relu()?;
            let in_topk = w.gt(0.0)?.to_dtype(acc)?;
            let e_rest = e.scatter_add(&ids, &(e.gather(&ids, 1)? * in_topk)?.neg()?, 1)?;
            let rest_sum = e_rest.sum_keepdim(D::Minus1)?;
            let floor = if acc == DType::F64 {
                f64::MIN_POSITIVE
            } else {
                f64::from(f32::MIN_POSITIVE)
            };
            let rest_sum = rest_sum.clamp(floor, f64::INFINITY)?;
            let log_rest = (rest_sum.log()? + &max)?.squeeze(1)?;
            loss = (loss + ((&lse - log_rest)? * &t)?)?;
            Some((t, e_rest, rest_sum))
        } else {
            None
        };
        losses.push(loss);
        start += len;
        if !with_grad {
            continue;
        }
        // (s + t) * softmax(z) - scatter(w) - t * e_rest / rest_sum.
        let mass = match &rest {
            Some((t, _, _)) => (&s + t)?,
            None => s.clone(),
        };
        let mut p = e.broadcast_div(&sum)?.broadcast_mul(&mass.unsqueeze(1)?)?;
        if let Some((t, e_rest, rest_sum)) = &rest {
            let scale = t.unsqueeze(1)?.broadcast_div(rest_sum)?;
            p = (p - e_rest.broadcast_mul(&scale)?)?;
        }
        let dz = p.scatter_add(&ids, &w.neg()?, 1)?;
        grads.push(lm_head.gw(&dz.to_dtype(lm_head.weight().dtype())?)?);
    }
    let grad = if with_grad {
        Some(Tensor::cat(&grads, 0)?)
    } else {
        None
    };
    Ok((Tensor::cat(&losses, 0)?, grad))
}

/// f64 stays f64 (gradient checks); everything else accumulates in f32.
fn accumulation_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The summed loss of `rows: [m, hidden]` (a scalar in f32, or f64 for f64 rows), computed block
/// by block like [`FusedTopkLoss`] but from plain tensor ops, so it runs on every device and in
/// every dtype (the CUDA and bf16 paths). The value and the unit gradient `G` come from the block
/// loop without a graph; the result is then `loss + (sum(x * G) - sum(detach(x) * G))`: the two
/// sums are the same numbers, so the value is exactly `loss`, and its gradient with respect to
/// `x` is exactly `G`. No `[m, vocab]` tensor outlives its block.
pub fn blockwise_loss_sum(
    lm_head: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
    weight_sums: &Tensor,
    tail_class: bool,
    rows: &Tensor,
) -> candle_core::Result<Tensor> {
    let acc = accumulation_dtype(rows.dtype());
    let with_grad = rows.track_op();
    let detached = rows.detach();
    let (losses, grad) = blockwise(
        &LinearProducts::plain(lm_head.clone()),
        ids,
        &weights.to_dtype(acc)?,
        &weight_sums.to_dtype(acc)?,
        tail_class,
        &detached,
        with_grad,
    )?;
    let loss = losses.sum_all()?;
    match grad {
        Some(g) => {
            let g = g.to_dtype(acc)?.detach();
            let live = (rows.to_dtype(acc)? * &g)?.sum_all()?;
            let constant = (detached.to_dtype(acc)? * &g)?.sum_all()?;
            // `live - constant` is exactly zero in value (the same reduction twice); adding
            // it to the loss last keeps the loss exact.
            Ok((loss + (live - constant)?)?)
        }
        None => Ok(loss),
    }
}

impl CustomOp1 for FusedTopkLoss {
    fn name(&self) -> &'static str {
        "fused-topk-loss"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, h) = layout.shape().dims2()?;
        let x = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => {
                Tensor::from_slice(&v[a..b], (m, h), &candle_core::Device::Cpu)?
            }
            (CpuStorage::F64(v), Some((a, b))) => {
                Tensor::from_slice(&v[a..b], (m, h), &candle_core::Device::Cpu)?
            }
            _ => candle_core::bail!("fused-topk-loss wants contiguous f32 or f64 rows"),
        };
        let (loss, grad) = self.compute(&x)?;
        if let Ok(mut g) = self.grad.lock() {
            *g = grad;
        }
        let storage = match loss.dtype() {
            DType::F64 => CpuStorage::F64(loss.to_vec1::<f64>()?),
            _ => CpuStorage::F32(loss.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        };
        Ok((storage, Shape::from(m)))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = self
            .grad
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .ok_or_else(|| candle_core::Error::Msg("fused-topk-loss: no forward ran".into()))?;
        Ok(Some(g.broadcast_mul(&grad_res.unsqueeze(1)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The tail class by hand: `-(sum_k w_k log q_k + r log(1 - sum_k q_k))` over a 5-token
    /// vocabulary, and its gradient against central differences of that formula.
    #[test]
    fn tail_class_is_the_cross_entropy_over_k_plus_one_classes() {
        let dev = Device::Cpu;
        let w_head = [0.3, -1.2, 0.8, 0.1, -0.4, 1.5, 0.0, 0.7, -0.9, 0.2];
        let head = Tensor::from_slice(&w_head, (5, 2), &dev).unwrap();
        let ids = Tensor::from_slice(&[1u32, 3], (1, 2), &dev).unwrap();
        let (w, r) = ([0.5f64, 0.2], 0.3f64);
        let weights = Tensor::from_slice(&w, (1, 2), &dev).unwrap();
        let sums = Tensor::from_slice(&[0.7f64], 1, &dev).unwrap();
        let by_hand = |h: [f64; 2]| {
            let z: Vec<f64> = (0..5)
                .map(|v| w_head[2 * v] * h[0] + w_head[2 * v + 1] * h[1])
                .collect();
            let total: f64 = z.iter().map(|x| x.exp()).sum();
            let q = |v: usize| z[v].exp() / total;
            -(w[0] * q(1).ln() + w[1] * q(3).ln() + r * (1.0 - q(1) - q(3)).ln())
        };
        let h = [0.6, -0.35];
        let x = Tensor::from_slice(&h, (1, 2), &dev).unwrap();
        let (loss, grad) = blockwise(
            &LinearProducts::plain(head),
            &ids,
            &weights,
            &sums,
            true,
            &x,
            true,
        )
        .unwrap();
        let loss = loss.to_vec1::<f64>().unwrap()[0];
        assert!(
            (loss - by_hand(h)).abs() < 1e-12,
            "{loss} vs {}",
            by_hand(h)
        );
        let grad = grad
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (i, g) in grad.iter().enumerate() {
            let (mut up, mut down) = (h, h);
            up[i] += 1e-6;
            down[i] -= 1e-6;
            let fd = (by_hand(up) - by_hand(down)) / 2e-6;
            assert!((g - fd).abs() < 1e-8, "d/dh{i}: {g} vs {fd}");
        }
    }
}
