//! Numerical building blocks of the decoder, each in two flavours: a differentiable one made of
//! elementary candle ops (the training path) and candle's fused kernel (the inference path).
//!
//! Why two: in candle 0.11 the fused `candle_nn::ops::rms_norm`, `softmax_last_dim` and
//! `rotary_emb::rope` are custom ops without a backward, so a graph through them silently loses its
//! gradient (DESIGN.md §3). The formulas follow the references: RMSNorm (Zhang & Sennrich 2019,
//! `x / sqrt(mean(x^2) + eps) * w`), rotary embeddings in the Hugging Face "rotate half" layout (Su et
//! al. 2021, RoFormer; `x * cos + rotate_half(x) * sin`), and the Llama 3 frequency scaling.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};

/// Which implementation of the fused-able ops a forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Differentiable formulations only: gradients reach every input (prefix K/V, soft prompts).
    Train,
    /// candle's fused kernels where they exist: faster, but they drop gradients.
    Infer,
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, path: Path) -> Result<Tensor> {
    // candle's fused kernel has no f64 version: f64 (gradient checks) always takes the
    // elementary formulation.
    let path = if x.dtype() == DType::F64 {
        Path::Train
    } else {
        path
    };
    match path {
        Path::Infer => {
            // The fused kernel wants a contiguous input; on the inference path a copy is cheap
            // compared to the matmuls around it.
            let x = x.contiguous()?;
            Ok(candle_nn::ops::rms_norm(&x, weight, eps as f32)?)
        }
        Path::Train if crate::cpu_kernel::supported(x.device(), x.dtype()) => {
            crate::fused::rms_norm(x, weight, eps)
        }
        Path::Train => {
            let dtype = x.dtype();
            // Accumulate in f32 for half types, as the fused kernel does, so both paths agree.
            let internal = match dtype {
                DType::F16 | DType::BF16 => DType::F32,
                d => d,
            };
            let xf = x.to_dtype(internal)?;
            let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
            let inv = (ms + eps)?.sqrt()?.recip()?;
            let normed = xf.broadcast_mul(&inv)?.to_dtype(dtype)?;
            Ok(normed.broadcast_mul(weight)?)
        }
    }
}

/// Rotary embedding in the rotate-half layout on `x: [b, heads, t, head_dim]`.
///
/// `cos` and `sin` are `[t, head_dim / 2]` (same positions for every sequence) or
/// `[b, t, head_dim / 2]` (per-sequence positions).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, path: Path) -> Result<Tensor> {
    match path {
        Path::Infer => {
            let x = x.contiguous()?;
            Ok(candle_nn::rotary_emb::rope(&x, cos, sin)?)
        }
        Path::Train => {
            let (b, _h, t, d) = x.dims4()?;
            let half = d / 2;
            // Bring cos/sin to [b or 1, 1, t, d/2] so they broadcast over heads.
            let (cos, sin) = match cos.rank() {
                2 => (cos.reshape((1, 1, t, half))?, sin.reshape((1, 1, t, half))?),
                _ => (cos.reshape((b, 1, t, half))?, sin.reshape((b, 1, t, half))?),
            };
            let x1 = x.narrow(D::Minus1, 0, half)?;
            let x2 = x.narrow(D::Minus1, half, half)?;
            // [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
            let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Ok(Tensor::cat(&[&r1, &r2], D::Minus1)?)
        }
    }
}

/// RoPE of projection rows `x: [b, t, heads, d]`, times `scale`, as a contiguous heads-first
/// `[b, heads, t, d]`. One fused pass on the CPU in f32/f64, on both paths (it has its own
/// backward); elsewhere a transpose, [`rope`] and a product.
pub fn rope_heads_first(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    scale: f64,
    path: Path,
) -> Result<Tensor> {
    if crate::cpu_kernel::supported(x.device(), x.dtype()) {
        return crate::fused::rope_heads_first(x, cos, sin, scale);
    }
    let r = rope(&x.transpose(1, 2)?, cos, sin, path)?;
    let r = if scale == 1.0 { r } else { (r * scale)? };
    Ok(r.contiguous()?)
}

/// The SwiGLU gate `silu(gate) * up` (differentiable on both paths): one fused pass on the CPU
/// in f32/f64, else `gate * sigmoid(gate) * up` from candle ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::cpu_kernel::supported(gate.device(), gate.dtype()) {
        return crate::fused::swiglu(gate, up);
    }
    Ok(((gate * candle_nn::ops::sigmoid(gate)?)? * up)?)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor, path: Path) -> Result<Tensor> {
    match path {
        Path::Infer => Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?),
        Path::Train => {
            // Shift-invariance makes the max a constant for the gradient: detaching it saves the
            // backward of the max reduction without changing any gradient.
            let m = x.max_keepdim(D::Minus1)?.detach();
            let e = x.broadcast_sub(&m)?.exp()?;
            let s = e.sum_keepdim(D::Minus1)?;
            Ok(e.broadcast_div(&s)?)
        }
    }
}

/// Log-softmax over the last dimension (differentiable).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `x W^T` for a frozen weight `w: [out, in]` and `x: [rows, in]`.
///
/// On the training path, candle's matmul backward computes the weight's gradient too, even for a
/// constant weight (candle-core `backprop.rs`, `Op::Matmul`): a third of the linear layers'
/// backward FLOPs wasted, and for the LM head a `[vocab, hidden]` product per step (DESIGN.md §3).
/// On the training path the product is a custom op whose backward returns only the input's
/// gradient: [`FrozenLinear`] (our own gemm) on the CPU in f32/f64, [`FrozenWeightLinear`] (the
/// backend's own matmul: cuBLAS on CUDA) everywhere else.
pub fn frozen_linear(x: &Tensor, w: &Tensor, path: Path) -> Result<Tensor> {
    if path == Path::Infer {
        return Ok(x.matmul(&w.t()?)?);
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == w.dtype()
    {
        Ok(x.apply_op2(w, FrozenLinear)?)
    } else {
        Ok(x.apply_op1(FrozenWeightLinear { w: w.clone() })?)
    }
}

/// `x W^T` as an op of `x` alone, the frozen weight `[out, in]` held inside, so that autograd
/// sees no path to the weight and its backward is one product, `grad W`. The forward is the
/// backend's own matmul (`BackendStorage::matmul`, the call `Tensor::matmul` makes), so it runs
/// wherever candle's matmul does, in any dtype, with the same layouts accepted.
#[derive(Debug, Clone)]
pub struct FrozenWeightLinear {
    /// The frozen weight `[out, in]`.
    pub w: Tensor,
}

impl FrozenWeightLinear {
    fn xwt<S: candle_core::backend::BackendStorage>(
        x: &S,
        lx: &candle_core::Layout,
        w: &S,
        lw: &candle_core::Layout,
    ) -> candle_core::Result<(S, candle_core::Shape)> {
        let (rows, inp) = lx.shape().dims2()?;
        let (out, inp2) = lw.shape().dims2()?;
        if inp != inp2 {
            candle_core::bail!("frozen-linear: x is [{rows}, {inp}], w is [{out}, {inp2}]");
        }
        let y = x.matmul(w, (1, rows, out, inp), lx, &lw.transpose(0, 1)?)?;
        Ok((y, (rows, out).into()))
    }
}

impl candle_core::CustomOp1 for FrozenWeightLinear {
    fn name(&self) -> &'static str {
        "frozen-weight-linear"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (w, lw) = self.w.storage_and_layout();
        match &*w {
            candle_core::Storage::Cpu(w) => Self::xwt(s, l, w, lw),
            _ => candle_core::bail!("frozen-linear: the weight is not on the input's device"),
        }
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (w, lw) = self.w.storage_and_layout();
        match &*w {
            candle_core::Storage::Cuda(w) => Self::xwt(s, l, w, lw),
            _ => candle_core::bail!("frozen-linear: the weight is not on the input's device"),
        }
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d(x W^T)/dx = grad W, and nothing for the weight.
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// The custom op behind [`frozen_linear`].
#[derive(Debug, Clone, Copy)]
pub struct FrozenLinear;

impl candle_core::CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let (rows, inp) = l1.shape().dims2()?;
        let (out, inp2) = l2.shape().dims2()?;
        if inp != inp2 {
            candle_core::bail!("frozen-linear: x is [{rows}, {inp}], w is [{out}, {inp2}]");
        }
        match (s1, s2) {
            (S::F32(x), S::F32(w)) => Ok((
                S::F32(gemm_xwt(x, l1, w, l2, rows, inp, out)),
                (rows, out).into(),
            )),
            (S::F64(x), S::F64(w)) => Ok((
                S::F64(gemm_xwt(x, l1, w, l2, rows, inp, out)),
                (rows, out).into(),
            )),
            _ => candle_core::bail!("frozen-linear: f32 or f64 only"),
        }
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d(x W^T)/dx = grad W; no gradient for the frozen weight.
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x W^T` with the `gemm` crate, honouring arbitrary 2-D strides of both operands.
fn gemm_xwt<T: candle_core::WithDType>(
    x: &[T],
    lx: &candle_core::Layout,
    w: &[T],
    lw: &candle_core::Layout,
    rows: usize,
    inp: usize,
    out: usize,
) -> Vec<T> {
    let (zero, one) = (T::from_f64(0.0), T::from_f64(1.0));
    let mut dst = vec![zero; rows * out];
    let (xs, ws) = (lx.stride(), lw.stride());
    let x = &x[lx.start_offset()..];
    let w = &w[lw.start_offset()..];
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the layouts come from candle and describe `rows x inp` and `out x inp` views that
    // lie inside `x` and `w` (offsets already applied); `dst` is a fresh `rows x out` row-major
    // buffer. W^T's element (i, j) is w[j * ws[0] + i * ws[1]], hence rhs strides (ws[0], ws[1])
    // as (column, row) strides.
    unsafe {
        gemm::gemm(
            rows,
            out,
            inp,
            dst.as_mut_ptr(),
            1,
            out as isize,
            false,
            x.as_ptr(),
            xs[1] as isize,
            xs[0] as isize,
            w.as_ptr(),
            ws[0] as isize,
            ws[1] as isize,
            zero,
            one,
            false,
            false,
            false,
            par,
        );
    }
    dst
}

/// Fix candle's CPU thread count for the process; call once at the start of `main`, before any
/// other thread exists (it sets an environment variable). Returns the thread count.
///
/// Why: candle 0.11's `get_num_threads`, asked by every matmul and parallel op, falls back to
/// `num_cpus::get_physical()` — which parses `/proc/cpuinfo` — on every call unless
/// `RAYON_NUM_THREADS` is set. Measured with strace on SmolLM2-135M: 54,200 reads of
/// `/proc/cpuinfo` while decoding 200 tokens (~270 per token), none with the variable set.
/// An explicit `RAYON_NUM_THREADS` is respected.
pub fn pin_thread_count() -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    let n = candle_core::utils::get_num_threads();
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// RoPE frequency scaling we implement.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// No scaling.
    None,
    /// Llama 3.1 "llama3" scaling: long wavelengths divided by `factor`, short ones kept, a smooth
    /// blend in between.
    Llama3 {
        /// Overall factor.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// Parse the `rope_scaling` JSON of a `config.json` (as kept in `ModelConfig::rope_scaling`).
    pub fn from_json(json: Option<&str>) -> Result<Self> {
        let Some(json) = json else {
            return Ok(RopeScaling::None);
        };
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::Msg(format!("rope_scaling is not valid JSON: {e}")))?;
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("");
        let num = |key: &str| -> Result<f64> {
            v.get(key)
                .and_then(|x| x.as_f64())
                .ok_or_else(|| Error::Msg(format!("rope_scaling of type {kind:?} lacks {key}")))
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }),
            other => Err(Error::Msg(format!(
                "unsupported rope_scaling type {other:?} (supported: llama3)"
            ))),
        }
    }

    fn apply(&self, freq: f64) -> f64 {
        match *self {
            RopeScaling::None => freq,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * freq / factor + smooth * freq
                }
            }
        }
    }
}

/// Precomputed `cos`/`sin` tables `[max_positions, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// Cosines.
    pub cos: Tensor,
    /// Sines.
    pub sin: Tensor,
    /// Number of positions covered.
    pub max_positions: usize,
}

impl RopeTables {
    /// Compute the tables once; angles in f64, stored in `dtype`.
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let freqs: Vec<f64> = (0..half)
            .map(|i| scaling.apply(1.0 / theta.powf((2 * i) as f64 / head_dim as f64)))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &freqs {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Self {
            cos,
            sin,
            max_positions,
        })
    }

    fn check(&self, end: usize) -> Result<()> {
        if end > self.max_positions {
            return Err(Error::Msg(format!(
                "position {} is beyond the model's RoPE table ({} positions)",
                end - 1,
                self.max_positions
            )));
        }
        Ok(())
    }

    /// `cos`/`sin` for the consecutive positions `start..start + len`: `[len, head_dim / 2]`.
    pub fn range(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        self.check(start + len)?;
        Ok((
            self.cos.narrow(0, start, len)?,
            self.sin.narrow(0, start, len)?,
        ))
    }

    /// `cos`/`sin` for per-sequence positions `positions[b][t]`: `[b, t, head_dim / 2]`.
    pub fn gather(&self, positions: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
        let b = positions.len();
        let t = positions.first().map_or(0, |p| p.len());
        let flat: Vec<u32> = positions.iter().flatten().copied().collect();
        if let Some(&m) = flat.iter().max() {
            self.check(m as usize + 1)?;
        }
        let idx = Tensor::from_vec(flat, b * t, self.cos.device())?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(&idx, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&idx, 0)?.reshape((b, t, half))?;
        Ok((cos, sin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_and_infer_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
        let w = Tensor::randn(0f32, 1.0, 8, &dev)?;
        let a = rms_norm(&x, &w, 1e-5, Path::Train)?;
        let b = rms_norm(&x, &w, 1e-5, Path::Infer)?;
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);

        let tables = RopeTables::new(8, 10_000.0, &RopeScaling::None, 16, DType::F32, &dev)?;
        let (c, s) = tables.range(3, 5)?;
        let a = rope(&x, &c, &s, Path::Train)?;
        let b = rope(&x, &c, &s, Path::Infer)?;
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let pos = vec![(3..8).collect::<Vec<u32>>(), (1..6).collect()];
        let (c2, s2) = tables.gather(&pos)?;
        let a = rope(&x, &c2, &s2, Path::Train)?;
        let b = rope(&x, &c2, &s2, Path::Infer)?;
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);

        let a = softmax_last_dim(&x, Path::Train)?;
        let b = softmax_last_dim(&x, Path::Infer)?;
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        Ok(())
    }

    #[test]
    fn frozen_linear_matches_matmul_and_only_the_input_gets_a_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // A transposed (strided) input and weight exercise the stride handling.
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (7, 5), &dev)?)?;
        let wt = Tensor::randn(0f64, 1.0, (5, 3), &dev)?;
        let w = wt.t()?;
        let xs = x.as_tensor().t()?.contiguous()?.t()?;
        let a = frozen_linear(&xs, &w, Path::Train)?;
        let b = xs.matmul(&w.t()?)?;
        assert!((&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        let ga = a.sum_all()?.backward()?;
        let gb = b.sum_all()?.backward()?;
        let (ga, gb) = (ga.get(x.as_tensor()), gb.get(x.as_tensor()));
        let (Some(ga), Some(gb)) = (ga, gb) else {
            panic!("no input gradient");
        };
        assert!((ga - gb)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        Ok(())
    }

    /// The backend-generic op (the CUDA and half-precision training path), run on the CPU: the
    /// same values as a matmul, and the same input gradient, for strided operands, in f32 and bf16.
    #[test]
    fn frozen_weight_linear_matches_matmul_in_value_and_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 5e-2)] {
            let x0 = Tensor::randn(0f32, 1.0, (7, 5), &dev)?.to_dtype(dtype)?;
            let x = candle_core::Var::from_tensor(&x0)?;
            let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)?
                .to_dtype(dtype)?
                .t()?;
            let xs = x.as_tensor().t()?.contiguous()?.t()?;
            let a = xs.apply_op1(FrozenWeightLinear { w: w.clone() })?;
            let b = xs.matmul(&w.t()?)?;
            let diff = |p: &Tensor, q: &Tensor| -> Result<f32> {
                Ok((p.to_dtype(DType::F32)? - q.to_dtype(DType::F32)?)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?)
            };
            assert!(diff(&a, &b)? < tol, "{dtype:?} forward");
            let ga = a.sum_all()?.backward()?;
            let gb = b.sum_all()?.backward()?;
            let (Some(ga), Some(gb)) = (ga.get(x.as_tensor()), gb.get(x.as_tensor())) else {
                panic!("no input gradient");
            };
            assert!(diff(ga, gb)? < tol, "{dtype:?} gradient");
        }
        Ok(())
    }

    #[test]
    fn llama3_scaling_parses_and_rejects_others() {
        let s = RopeScaling::from_json(Some(
            r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        ));
        assert!(matches!(s, Ok(RopeScaling::Llama3 { .. })));
        assert!(RopeScaling::from_json(Some(r#"{"type":"yarn","factor":4.0}"#)).is_err());
        assert!(matches!(
            RopeScaling::from_json(None),
            Ok(RopeScaling::None)
        ));
    }
}
