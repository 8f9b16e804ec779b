//! Row-wise ops fused into one CPU pass each way, with their own backward: RMSNorm with a frozen
//! weight, the SwiGLU gate `silu(gate) * up`, and RoPE with the move to heads-first layout and
//! the query scaling.
//!
//! Why: composed from candle ops on the training path, RMSNorm is seven ops (square, mean, add,
//! sqrt, reciprocal, two products) and SwiGLU three, each writing a fresh activation-sized tensor
//! forward and more backward; in a profile of SmolLM2's training step those passes and their page
//! faults took about a fifth of the time. Here each op reads its inputs once and writes one output,
//! and its backward is one more pass. The norm's weight is frozen (only prefixes and soft prompts
//! train), so no gradient is computed for it.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_kernel::{slice, with_values, Elem};
use crate::error::Result;

/// Rows per parallel task (rows are a few hundred values: batch several).
const ROWS_PER_TASK: usize = 16;

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension, differentiable in `x` only.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(x.apply_op2(&weight.contiguous()?, RmsNorm { eps })?)
}

/// `silu(gate) * up` (`silu(g) = g * sigmoid(g)`), differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

struct RmsNorm {
    eps: f64,
}

impl RmsNorm {
    fn inv_rms<T: Elem>(&self, row: &[T]) -> T {
        let ss = row.iter().fold(T::zero(), |a, &v| a + v * v);
        let n = T::from_f64(row.len() as f64);
        (ss / n + T::from_f64(self.eps)).sqrt().recip()
    }

    fn forward<T: Elem>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let d = w.len();
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                    let inv = self.inv_rms(x);
                    for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                        *o = x * inv * w;
                    }
                }
            });
        out
    }

    /// `dx = inv * (gw - x * inv^2 * mean(gw * x))` with `gw = grad * w`.
    fn backward<T: Elem>(&self, x: &[T], w: &[T], grad: &[T]) -> Vec<T> {
        let d = w.len();
        let n = T::from_f64(d as f64);
        let mut dx = vec![T::zero(); x.len()];
        dx.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .zip(grad.par_chunks(d * ROWS_PER_TASK))
            .for_each(|((dx, x), g)| {
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    let inv = self.inv_rms(x);
                    let dot = x
                        .iter()
                        .zip(g)
                        .zip(w)
                        .fold(T::zero(), |a, ((&x, &g), &w)| a + g * w * x);
                    let c = inv * inv * dot / n;
                    for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                        *dx = inv * (g * w - x * c);
                    }
                }
            });
        dx
    }
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = lx.shape().dims().last().copied().unwrap_or(0);
        if lw.shape().dims() != [d] || d == 0 {
            candle_core::bail!(
                "fused rms-norm: x {:?}, weight {:?}",
                lx.shape(),
                lw.shape()
            );
        }
        let out = match sx {
            CpuStorage::F32(_) => CpuStorage::F32(self.forward(slice(sx, lx)?, slice(sw, lw)?)),
            CpuStorage::F64(_) => CpuStorage::F64(self.forward(slice(sx, lx)?, slice(sw, lw)?)),
            _ => candle_core::bail!("fused rms-norm: f32 or f64 only"),
        };
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = match x.dtype() {
            DType::F32 => Tensor::from_vec(
                with_values::<f32, _, 3>([x, w, grad], |[x, w, g]| Ok(self.backward(x, w, g)))?,
                x.shape(),
                x.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                with_values::<f64, _, 3>([x, w, grad], |[x, w, g]| Ok(self.backward(x, w, g)))?,
                x.shape(),
                x.device(),
            )?,
            d => candle_core::bail!("fused rms-norm: no backward in {d:?}"),
        };
        // The weight is frozen.
        Ok((Some(dx), None))
    }
}

struct SwiGlu;

/// Elements per parallel task.
const ELEMS_PER_TASK: usize = 16 * 1024;

/// `1 / (1 + e^-g)` from `e^-|g|`, which is in the fast exponential's range and never overflows;
/// branch-free, so the loops below vectorise (the libm call did not).
#[inline(always)]
fn sigmoid<T: Elem>(g: T) -> T {
    let e = (-g.abs()).exp_nonpositive();
    let r = (T::one() + e).recip();
    if g >= T::zero() {
        r
    } else {
        e * r
    }
}

#[inline(always)]
fn swiglu_chunk<T: Elem>(o: &mut [T], gate: &[T], up: &[T]) {
    for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid(g) * u;
    }
}

/// `d gate = grad * up * s * (1 + g * (1 - s))`, `d up = grad * g * s`, `s = sigmoid(g)`.
#[inline(always)]
fn swiglu_grad_chunk<T: Elem>(dg: &mut [T], du: &mut [T], gate: &[T], up: &[T], grad: &[T]) {
    for ((((dg, du), &g), &u), &gr) in dg.iter_mut().zip(du.iter_mut()).zip(gate).zip(up).zip(grad)
    {
        let s = sigmoid(g);
        *dg = gr * u * s * (T::one() + g * (T::one() - s));
        *du = gr * g * s;
    }
}

crate::cpu_kernel::widest! {
    /// [`swiglu_chunk`] at the CPU's vector width.
    fn swiglu_chunk_wide / swiglu_chunk_at <T>(o: &mut [T], gate: &[T], up: &[T]) = swiglu_chunk
}

crate::cpu_kernel::widest! {
    /// [`swiglu_grad_chunk`] at the CPU's vector width.
    fn swiglu_grad_chunk_wide / swiglu_grad_chunk_at <T>(
        dg: &mut [T],
        du: &mut [T],
        gate: &[T],
        up: &[T],
        grad: &[T],
    ) = swiglu_grad_chunk
}

impl SwiGlu {
    fn forward<T: Elem>(gate: &[T], up: &[T]) -> Vec<T> {
        let mut out = vec![T::zero(); gate.len()];
        out.par_chunks_mut(ELEMS_PER_TASK)
            .zip(gate.par_chunks(ELEMS_PER_TASK))
            .zip(up.par_chunks(ELEMS_PER_TASK))
            .for_each(|((o, g), u)| swiglu_chunk_wide(o, g, u));
        out
    }

    fn backward<T: Elem>(gate: &[T], up: &[T], grad: &[T]) -> (Vec<T>, Vec<T>) {
        let mut dg = vec![T::zero(); gate.len()];
        let mut du = vec![T::zero(); gate.len()];
        dg.par_chunks_mut(ELEMS_PER_TASK)
            .zip(du.par_chunks_mut(ELEMS_PER_TASK))
            .zip(gate.par_chunks(ELEMS_PER_TASK))
            .zip(
                up.par_chunks(ELEMS_PER_TASK)
                    .zip(grad.par_chunks(ELEMS_PER_TASK)),
            )
            .for_each(|(((dg, du), g), (u, gr))| swiglu_grad_chunk_wide(dg, du, g, u, gr));
        (dg, du)
    }
}

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if lg.shape() != lu.shape() {
            candle_core::bail!("fused swiglu: gate {:?}, up {:?}", lg.shape(), lu.shape());
        }
        let out = match sg {
            CpuStorage::F32(_) => CpuStorage::F32(Self::forward(slice(sg, lg)?, slice(su, lu)?)),
            CpuStorage::F64(_) => CpuStorage::F64(Self::forward(slice(sg, lg)?, slice(su, lu)?)),
            _ => candle_core::bail!("fused swiglu: f32 or f64 only"),
        };
        Ok((out, lg.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = match gate.dtype() {
            DType::F32 => {
                let (dg, du) = with_values::<f32, _, 3>([gate, up, grad], |[g, u, d]| {
                    Ok(Self::backward(g, u, d))
                })?;
                (
                    Tensor::from_vec(dg, gate.shape(), gate.device())?,
                    Tensor::from_vec(du, up.shape(), up.device())?,
                )
            }
            DType::F64 => {
                let (dg, du) = with_values::<f64, _, 3>([gate, up, grad], |[g, u, d]| {
                    Ok(Self::backward(g, u, d))
                })?;
                (
                    Tensor::from_vec(dg, gate.shape(), gate.device())?,
                    Tensor::from_vec(du, up.shape(), up.device())?,
                )
            }
            d => candle_core::bail!("fused swiglu: no backward in {d:?}"),
        };
        Ok((Some(dg), Some(du)))
    }
}

/// RoPE (rotate-half layout) of `x: [b, t, heads, d]`, the rows a projection gives, times
/// `scale`, returned heads-first `[b, heads, t, d]`; `cos`, `sin`: `[t, d / 2]` (every sequence
/// at the same positions) or `[b, t, d / 2]`. Differentiable in `x`.
///
/// Why: composed, this was a transposing copy, two narrows, four products, a sum, a difference,
/// a concatenation and a scaling, each writing a fresh tensor (and its backward as many more);
/// here it is one pass each way.
pub fn rope_heads_first(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { scale })?)
}

struct Rope {
    scale: f64,
}

/// Sizes of a [`Rope`] call.
#[derive(Clone, Copy)]
struct RopeDims {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    /// Whether `cos`/`sin` have a row per sequence.
    per_sequence: bool,
}

impl RopeDims {
    fn of(lx: &Layout, lc: &Layout, ls: &Layout) -> candle_core::Result<Self> {
        let (b, t, h, d) = lx.shape().dims4()?;
        let per_sequence = match lc.shape().dims() {
            [tc, half] if *tc == t && 2 * half == d => false,
            [bc, tc, half] if *bc == b && *tc == t && 2 * half == d => true,
            _ => candle_core::bail!(
                "fused rope: x {:?} (b, t, heads, d), cos {:?}",
                lx.shape(),
                lc.shape()
            ),
        };
        if ls.shape() != lc.shape() || d % 2 != 0 {
            candle_core::bail!("fused rope: cos {:?}, sin {:?}", lc.shape(), ls.shape());
        }
        Ok(Self {
            b,
            t,
            h,
            d,
            per_sequence,
        })
    }

    /// Offset of the `cos`/`sin` row of token `ti` of sequence `bi`.
    fn angle_row(&self, bi: usize, ti: usize) -> usize {
        let row = if self.per_sequence {
            bi * self.t + ti
        } else {
            ti
        };
        row * self.d / 2
    }
}

impl Rope {
    /// `[x1, x2] -> scale [x1 cos - x2 sin, x2 cos + x1 sin]`, one output slab `[t, d]` per
    /// (sequence, head).
    fn forward<T: Elem>(&self, dims: RopeDims, x: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let RopeDims { t, h, d, .. } = dims;
        let half = d / 2;
        let scale = T::from_f64(self.scale);
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(t * d).enumerate().for_each(|(slab, o)| {
            let (bi, hi) = (slab / h, slab % h);
            for (ti, o) in o.chunks_mut(d).enumerate() {
                let src = &x[((bi * t + ti) * h + hi) * d..][..d];
                let a = dims.angle_row(bi, ti);
                let (c, s) = (&cos[a..a + half], &sin[a..a + half]);
                let (x1, x2) = src.split_at(half);
                let (o1, o2) = o.split_at_mut(half);
                for j in 0..half {
                    o1[j] = (x1[j] * c[j] - x2[j] * s[j]) * scale;
                    o2[j] = (x2[j] * c[j] + x1[j] * s[j]) * scale;
                }
            }
        });
        out
    }

    /// The transpose of the rotation: `dx = scale [g1 cos + g2 sin, g2 cos - g1 sin]`, back in
    /// `x`'s `[b, t, heads, d]` layout, one task per run of (sequence, token) rows.
    fn backward<T: Elem>(&self, dims: RopeDims, grad: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let RopeDims { t, h, d, .. } = dims;
        let half = d / 2;
        let scale = T::from_f64(self.scale);
        let mut dx = vec![T::zero(); grad.len()];
        dx.par_chunks_mut(h * d * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, rows)| {
                for (r, row) in rows.chunks_mut(h * d).enumerate() {
                    let (bi, ti) = (
                        (task * ROWS_PER_TASK + r) / t,
                        (task * ROWS_PER_TASK + r) % t,
                    );
                    let a = dims.angle_row(bi, ti);
                    let (c, s) = (&cos[a..a + half], &sin[a..a + half]);
                    for (hi, dxh) in row.chunks_mut(d).enumerate() {
                        let g = &grad[((bi * h + hi) * t + ti) * d..][..d];
                        let (g1, g2) = g.split_at(half);
                        let (d1, d2) = dxh.split_at_mut(half);
                        for j in 0..half {
                            d1[j] = (g1[j] * c[j] + g2[j] * s[j]) * scale;
                            d2[j] = (g2[j] * c[j] - g1[j] * s[j]) * scale;
                        }
                    }
                }
            });
        dx
    }
}

impl candle_core::CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = RopeDims::of(lx, lc, ls)?;
        let out = match sx {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.forward(dims, slice(sx, lx)?, slice(sc, lc)?, slice(ss, ls)?))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.forward(dims, slice(sx, lx)?, slice(sc, lc)?, slice(ss, ls)?))
            }
            _ => candle_core::bail!("fused rope: f32 or f64 only"),
        };
        Ok((out, Shape::from((dims.b, dims.h, dims.t, dims.d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = RopeDims::of(x.layout(), cos.layout(), sin.layout())?;
        let dx = match x.dtype() {
            DType::F32 => Tensor::from_vec(
                with_values::<f32, _, 3>([grad, cos, sin], |[g, c, s]| {
                    Ok(self.backward(dims, g, c, s))
                })?,
                x.shape(),
                x.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                with_values::<f64, _, 3>([grad, cos, sin], |[g, c, s]| {
                    Ok(self.backward(dims, g, c, s))
                })?,
                x.shape(),
                x.device(),
            )?,
            d => candle_core::bail!("fused rope: no backward in {d:?}"),
        };
        // The angles are constants.
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>())
            .expect("difference")
    }

    /// `fused` equals `plain`, and so do the gradients of `sum(out * gy)` w.r.t. each of `vars`.
    fn assert_same(
        fused: Tensor,
        plain: Tensor,
        vars: &[&Var],
        gy: &Tensor,
    ) -> candle_core::Result<()> {
        assert_eq!(fused.dims(), plain.dims());
        assert!(max_diff(&fused, &plain) < 1e-12);
        let gf = (fused * gy)?.sum_all()?.backward()?;
        let gp = (plain * gy)?.sum_all()?.backward()?;
        for v in vars {
            let d = max_diff(gf.get(v).expect("grad"), gp.get(v).expect("grad"));
            assert!(d < 1e-12, "gradient differs by {d:e}");
        }
        Ok(())
    }

    #[test]
    fn rms_norm_matches_the_composed_formulation() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 5, 24), &dev)?)?;
        let w = Tensor::randn(0f64, 1.0, 24, &dev)?;
        let gy = Tensor::randn(0f64, 1.0, (3, 5, 24), &dev)?;
        let fused = rms_norm(&x, &w, 1e-5).map_err(candle_core::Error::wrap)?;
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
            .sqrt()?
            .recip()?;
        let plain = x.broadcast_mul(&inv)?.broadcast_mul(&w)?;
        assert_same(fused, plain, &[&x], &gy)
    }

    #[test]
    fn rope_matches_the_composed_formulation_for_shared_and_per_sequence_angles(
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, t, h, d), &dev)?)?;
        let gy = Tensor::randn(0f64, 1.0, (b, h, t, d), &dev)?;
        let shared = Tensor::randn(0f64, 1.0, (t, d / 2), &dev)?;
        let per_seq = Tensor::randn(0f64, 1.0, (b, t, d / 2), &dev)?;
        for angles in [shared, per_seq] {
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            let fused = rope_heads_first(&x, &cos, &sin, 0.5).map_err(candle_core::Error::wrap)?;
            // The composed training-path RoPE of the heads-first view, times 0.5.
            let xt = x.as_tensor().transpose(1, 2)?;
            let plain = (crate::ops::rope(&xt, &cos, &sin, crate::Path::Train)
                .map_err(candle_core::Error::wrap)?
                * 0.5)?;
            assert_eq!(fused.dims(), [b, h, t, d]);
            assert_same(fused, plain, &[&x], &gy)?;
        }
        Ok(())
    }

    #[test]
    fn f32_swiglu_is_accurate_at_any_gate_and_every_build_agrees() {
        // Gates far outside the fast exponential's clamp (-87) on both sides, and around zero.
        let gate: Vec<f32> = (0..1000)
            .map(|i| (i as f32 - 500.0) * 0.37)
            .chain([0.0, -0.0, 1e-30, -1e-30, 1000.0, -1000.0])
            .collect();
        let up: Vec<f32> = (0..gate.len())
            .map(|i| 1.0 + (i % 7) as f32 * 0.25)
            .collect();
        let grad: Vec<f32> = (0..gate.len())
            .map(|i| 0.5 - (i % 5) as f32 * 0.2)
            .collect();
        let out = SwiGlu::forward(&gate, &up);
        let (dg, du) = SwiGlu::backward(&gate, &up, &grad);
        for i in 0..gate.len() {
            let (g, u, gr) = (gate[i] as f64, up[i] as f64, grad[i] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            let close =
                |got: f32, want: f64| (got as f64 - want).abs() <= 2e-6 * want.abs() + 1e-30;
            assert!(close(out[i], g * s * u), "forward at gate {g}");
            assert!(close(du[i], gr * g * s), "d up at gate {g}");
            assert!(
                close(dg[i], gr * u * s * (1.0 + g * (1.0 - s))),
                "d gate at gate {g}"
            );
        }
        for level in crate::cpu_kernel::simd_levels() {
            let mut built = vec![0f32; gate.len()];
            swiglu_chunk_at(level, &mut built, &gate, &up);
            assert_eq!(out, built, "the {level:?} build differs");
            let (mut bg, mut bu) = (vec![0f32; gate.len()], vec![0f32; gate.len()]);
            swiglu_grad_chunk_at(level, &mut bg, &mut bu, &gate, &up, &grad);
            assert_eq!(
                (&dg, &du),
                (&bg, &bu),
                "the {level:?} build's gradient differs"
            );
        }
    }

    #[test]
    fn swiglu_matches_the_composed_formulation() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&(Tensor::randn(0f64, 3.0, (4, 7000), &dev)?))?;
        let u = Var::from_tensor(&Tensor::randn(0f64, 1.0, (4, 7000), &dev)?)?;
        let gy = Tensor::randn(0f64, 1.0, (4, 7000), &dev)?;
        let fused = swiglu(&g, &u).map_err(candle_core::Error::wrap)?;
        let plain = ((g.as_tensor() * candle_nn::ops::sigmoid(&g)?)? * u.as_tensor())?;
        assert_same(fused, plain, &[&g, &u], &gy)
    }
}
