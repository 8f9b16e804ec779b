//! `y = x W^T` in f32 with a frozen weight on CPUs with AVX-512 or AVX2 (inference, and the
//! training path's forward and backward).
//!
//! Why: decoding a small batch is one pass over the weights, but candle's gemm packs the whole
//! weight into tiles on every call and runs a micro-kernel shaped for many columns; at 8 rows it
//! reached about a fifth of this machine's matmul rate (a batch-8 decode profile: 58% of the time
//! in gemm's `x1x6` kernel, plus its packing). Here the weight is packed once, the first time a
//! layer runs ([`PackedWeight`]: panels of two vector registers of output features, input-major),
//! and each panel is streamed past a block of rows of `x` at a time: per input feature, two panel
//! vectors and one broadcast of each row's value feed two accumulators per row, so no horizontal
//! sums are needed and every load feeds two or more multiply-adds. With AVX-512 a panel is 32
//! features and a block 12 rows (24 accumulators of 32 registers); with AVX2 16 features and 6
//! rows (12 of 16), the shape of the classic AVX2 GEMM micro-kernel. The two cores take disjoint
//! panels.
//!
//! An earlier version dotted four unpacked weight rows with six rows of `x` and summed the lanes
//! at the end; on SmolLM2's shapes the packed kernel runs a model's worth of projections 1.5-2x
//! faster at 8-32 rows (BENCHMARKS.md, "Runtime").
//!
//! The kernels use AVX-512 or AVX2 intrinsics in functions that run only where the CPU has them
//! (checked at run time); elsewhere [`PackedWeight::new`] returns `None` and the caller keeps
//! candle's product. Where candle's gemm packs a weight, this kernel does not: on the AVX2 machine
//! its training step spent 5% of its time in gemm's packing (BENCHMARKS.md, "Training").

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::cpu_kernel::{simd, Simd};
use crate::error::Result;

/// Which of the two kernels a weight is packed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// AVX-512F + FMA: 16 lanes.
    Avx512,
    /// AVX2 + FMA: 8 lanes.
    Avx2,
}

impl Kernel {
    /// The kernel for this vector level, if there is one.
    fn at(level: Simd) -> Option<Self> {
        match level {
            Simd::Avx512 => Some(Self::Avx512),
            Simd::Avx2 => Some(Self::Avx2),
            Simd::Baseline => None,
        }
    }

    /// Output features per packed panel: two vector registers.
    fn panel(self) -> usize {
        match self {
            Self::Avx512 => 32,
            Self::Avx2 => 16,
        }
    }

    /// Rows of `x` per block: 2 x rows accumulators, two panel vectors and one broadcast fill 27
    /// of AVX-512's 32 vector registers, 15 of AVX2's 16.
    fn rows(self) -> usize {
        match self {
            Self::Avx512 => 12,
            Self::Avx2 => 6,
        }
    }
}

/// Values of `x` per pass over the weight (256 KiB): rows are taken in groups this size so that
/// the group stays in the core's L2 cache while every panel streams past it.
const X_PER_PASS: usize = 65_536;

/// Input features above which all rows go in one pass: a panel is then itself bigger than half
/// of L2 (32 x 4,096 f32), so a group of rows cannot stay there beside it and more passes would
/// only stream the weight again (the LM head's backward, `g W` with 49,152 inputs: 158 GFLOP/s
/// in one pass against 113 in passes of 12 rows, 128 rows).
const ONE_PASS_INPUTS: usize = 4_096;

/// A frozen weight `[out, inp]` repacked for [`linear`]: with panels of `n` features (the
/// kernel's), panel `p` holds, for every input feature `k`, the weights of output features
/// `np..np + n` (the last panel padded with zeros).
#[derive(Debug)]
pub(crate) struct PackedWeight {
    data: Vec<f32>,
    out: usize,
    inp: usize,
    kernel: Kernel,
}

impl PackedWeight {
    /// Pack `w: [out, inp]` (f32, on the CPU) for the widest kernel this CPU runs, or `None`
    /// where none applies (another dtype or device, neither AVX-512 nor AVX2 with FMA).
    pub(crate) fn new(w: &Tensor) -> Result<Option<Self>> {
        Self::new_at(w, simd())
    }

    /// The same for the kernel of at most this vector level (tests run every one the CPU has).
    fn new_at(w: &Tensor, level: Simd) -> Result<Option<Self>> {
        let Some(kernel) = Kernel::at(level.min(simd())) else {
            return Ok(None);
        };
        if w.dtype() != DType::F32 || !w.device().is_cpu() {
            return Ok(None);
        }
        let (out, inp) = w.dims2()?;
        let w = w.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let (Storage::Cpu(ws), Some((w0, w1))) = (&*ws, wl.contiguous_offsets()) else {
            return Ok(None);
        };
        let w = &ws.as_slice::<f32>()?[w0..w1];
        let n = kernel.panel();
        let mut data = vec![0f32; out.div_ceil(n) * inp * n];
        data.par_chunks_mut(inp * n)
            .enumerate()
            .for_each(|(p, panel)| {
                for (j, o) in (p * n..out.min((p + 1) * n)).enumerate() {
                    for (k, &v) in w[o * inp..(o + 1) * inp].iter().enumerate() {
                        panel[k * n + j] = v;
                    }
                }
            });
        Ok(Some(Self {
            data,
            out,
            inp,
            kernel,
        }))
    }
}

/// `x W^T` for `x: [rows, inp]` (f32, on the CPU) and a packed weight.
pub(crate) fn linear(x: &Tensor, w: &PackedWeight) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(w)?)
}

/// The packed weight as an op of `x` alone (`x W^T`, no backward: see [`PackedLinear`]).
impl CustomOp1 for PackedWeight {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inp) = l.shape().dims2()?;
        let (CpuStorage::F32(x), Some((x0, x1))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("packed-matmul: x must be contiguous f32");
        };
        if inp != self.inp {
            candle_core::bail!(
                "packed-matmul: x has {inp} features, the weight {}",
                self.inp
            );
        }
        Ok((
            CpuStorage::F32(xwt(&x[x0..x1], rows, self)),
            (rows, self.out).into(),
        ))
    }
}

/// `x W^T` as a differentiable op of `x` for the training path, the frozen weight held packed:
/// its backward, `grad W = grad (W^T)^T`, is the same kernel on `W^T` packed.
#[derive(Debug, Clone)]
pub(crate) struct PackedLinear {
    w: Arc<PackedWeight>,
    wt: Arc<PackedWeight>,
}

impl PackedLinear {
    /// The op for `w: [out, inp]` and its transpose `wt: [inp, out]`, both packed.
    pub(crate) fn new(w: Arc<PackedWeight>, wt: Arc<PackedWeight>) -> Self {
        debug_assert_eq!((w.out, w.inp), (wt.inp, wt.out), "wt is w's transpose");
        Self { w, wt }
    }
}

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.w.cpu_fwd(s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d(x W^T)/dx = grad W; no gradient for the frozen weight.
        let back = Self::new(self.wt.clone(), self.w.clone());
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

/// The two products of a frozen weight `W: [out, inp]` that a hand-written backward needs, `x W^T`
/// and `g W`, on the packed kernel where it applies (f32 on a CPU with AVX-512 or AVX2) and with candle's
/// matmul elsewhere. Neither records a graph.
#[derive(Debug, Clone)]
pub struct LinearProducts {
    w: Tensor,
    packed: Option<PackedLinear>,
}

impl LinearProducts {
    /// Products computed with candle's matmul alone.
    pub fn plain(w: Tensor) -> Self {
        Self { w, packed: None }
    }

    pub(crate) fn packed(w: Tensor, packed: Option<PackedLinear>) -> Self {
        Self { w, packed }
    }

    /// The weight `[out, inp]`.
    pub fn weight(&self) -> &Tensor {
        &self.w
    }

    /// `x W^T` for `x: [rows, inp]`.
    pub fn xwt(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.packed {
            Some(op) if Self::fits(x) => x.contiguous()?.apply_op1_no_bwd(&*op.w),
            _ => x.matmul(&self.w.t()?),
        }
    }

    /// `g W` for `g: [rows, out]`.
    pub fn gw(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        match &self.packed {
            Some(op) if Self::fits(g) => g.contiguous()?.apply_op1_no_bwd(&*op.wt),
            _ => g.matmul(&self.w),
        }
    }

    fn fits(x: &Tensor) -> bool {
        x.dtype() == DType::F32 && x.device().is_cpu()
    }
}

/// Output pointer shared by the tasks, each of which writes its own panels' columns.
struct Columns(*mut f32);
// SAFETY: the tasks write disjoint column ranges of one live buffer (see `xwt`).
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

/// `x: [rows, inp]` row-major; returns `y: [rows, out]`. Only called on packed weights, which
/// exist only where the CPU has their kernel's instructions.
fn xwt(x: &[f32], rows: usize, w: &PackedWeight) -> Vec<f32> {
    let (out, inp, n) = (w.out, w.inp, w.kernel.panel());
    assert_eq!(x.len(), rows * inp, "x is [rows, inp]");
    let mut y = vec![0f32; rows * out];
    let panels = out.div_ceil(n);
    let pass = if inp > ONE_PASS_INPUTS {
        rows.max(1)
    } else {
        (X_PER_PASS / inp).max(w.kernel.rows())
    };
    // One parallel task per (group of rows, panel), group-major: each core takes a run of
    // consecutive tasks, so it keeps one group in its L2 while the panels stream past. (A
    // parallel loop over panels per group left a core idle for a third of every 192-wide
    // projection: 6 panels in 2-panel tasks split 2 : 1.)
    let groups = rows.div_ceil(pass);
    let y_ptr = Columns(y.as_mut_ptr());
    (0..groups * panels).into_par_iter().for_each(|task| {
        // The whole wrapper, not its field (a closure would capture just the raw pointer).
        let y_ptr = &y_ptr;
        let (group, p) = (task / panels, task % panels);
        let r0 = group * pass;
        let panel = &w.data[p * inp * n..(p + 1) * inp * n];
        let m = pass.min(rows - r0);
        let xs = &x[r0 * inp..(r0 + m) * inp];
        // SAFETY: the CPU has the kernel's instructions (a PackedWeight exists only then); this
        // task alone writes columns p * n.. of rows r0..r0 + m of y, which outlives the loop.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let y = y_ptr.0.add(r0 * out);
            match w.kernel {
                Kernel::Avx512 => panel_rows_avx512(xs, m, inp, panel, y, out, p * n),
                Kernel::Avx2 => panel_rows_avx2(xs, m, inp, panel, y, out, p * n),
            }
        };
    });
    y
}

/// Whether this CPU runs a packed kernel (AVX-512F or AVX2, with FMA); elsewhere weights are not
/// packed.
pub(crate) fn has_packed_kernel() -> bool {
    Kernel::at(simd()).is_some()
}

/// Columns `o0..o0 + 32` (fewer in the last panel) of every row of `y`, 12 rows at a time and
/// the remainder in blocks of 8, 4, 2, 1 (constant sizes keep the accumulators in registers).
///
/// # Safety
/// The CPU must have AVX-512F and FMA; `y` points to `[rows, out]` f32 that nothing else writes
/// in these columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn panel_rows_avx512(
    x: &[f32],
    rows: usize,
    inp: usize,
    panel: &[f32],
    y: *mut f32,
    out: usize,
    o0: usize,
) {
    let mut r = 0;
    while r < rows {
        let step = match rows - r {
            n if n >= 12 => 12,
            n if n >= 8 => 8,
            n if n >= 4 => 4,
            n if n >= 2 => 2,
            _ => 1,
        };
        let xs = &x[r * inp..(r + step) * inp];
        let y = y.add(r * out);
        match step {
            12 => block_avx512::<12>(xs, inp, panel, y, out, o0),
            8 => block_avx512::<8>(xs, inp, panel, y, out, o0),
            4 => block_avx512::<4>(xs, inp, panel, y, out, o0),
            2 => block_avx512::<2>(xs, inp, panel, y, out, o0),
            _ => block_avx512::<1>(xs, inp, panel, y, out, o0),
        }
        r += step;
    }
}

/// `R` rows of `x` (`xs: [R, inp]`) times one 32-feature panel, into columns `o0..` of the `R`
/// rows of `y` that start at `y`.
///
/// # Safety
/// The CPU must have AVX-512F and FMA; `panel` holds `inp * 32` values; `y` as in
/// [`panel_rows_avx512`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_avx512<const R: usize>(
    xs: &[f32],
    inp: usize,
    panel: &[f32],
    y: *mut f32,
    out: usize,
    o0: usize,
) {
    use std::arch::x86_64::{
        _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };
    const LANES: usize = 16;
    const PANEL: usize = 2 * LANES;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let (xp, pp) = (xs.as_ptr(), panel.as_ptr());
    for k in 0..inp {
        // SAFETY: k < inp, so the panel's row k and x[r][k] (r < R) are in bounds.
        let w0 = _mm512_loadu_ps(pp.add(k * PANEL));
        let w1 = _mm512_loadu_ps(pp.add(k * PANEL + LANES));
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = _mm512_set1_ps(*xp.add(r * inp + k));
            a[0] = _mm512_fmadd_ps(w0, xb, a[0]);
            a[1] = _mm512_fmadd_ps(w1, xb, a[1]);
        }
    }
    let n = PANEL.min(out - o0);
    for (r, a) in acc.iter().enumerate() {
        let mut lanes = [0f32; PANEL];
        _mm512_storeu_ps(lanes.as_mut_ptr(), a[0]);
        _mm512_storeu_ps(lanes.as_mut_ptr().add(LANES), a[1]);
        std::ptr::copy_nonoverlapping(lanes.as_ptr(), y.add(r * out + o0), n);
    }
}

/// Columns `o0..o0 + 16` (fewer in the last panel) of every row of `y`, 6 rows at a time and the
/// remainder in blocks of 4, 2, 1.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `y` points to `[rows, out]` f32 that nothing else writes in
/// these columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_rows_avx2(
    x: &[f32],
    rows: usize,
    inp: usize,
    panel: &[f32],
    y: *mut f32,
    out: usize,
    o0: usize,
) {
    let mut r = 0;
    while r < rows {
        let step = match rows - r {
            n if n >= 6 => 6,
            n if n >= 4 => 4,
            n if n >= 2 => 2,
            _ => 1,
        };
        let xs = &x[r * inp..(r + step) * inp];
        let y = y.add(r * out);
        match step {
            6 => block_avx2::<6>(xs, inp, panel, y, out, o0),
            4 => block_avx2::<4>(xs, inp, panel, y, out, o0),
            2 => block_avx2::<2>(xs, inp, panel, y, out, o0),
            _ => block_avx2::<1>(xs, inp, panel, y, out, o0),
        }
        r += step;
    }
}

/// `R` rows of `x` (`xs: [R, inp]`) times one 16-feature panel, into columns `o0..` of the `R`
/// rows of `y` that start at `y`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `panel` holds `inp * 16` values; `y` as in
/// [`panel_rows_avx2`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_avx2<const R: usize>(
    xs: &[f32],
    inp: usize,
    panel: &[f32],
    y: *mut f32,
    out: usize,
    o0: usize,
) {
    use std::arch::x86_64::{
        _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };
    const LANES: usize = 8;
    const PANEL: usize = 2 * LANES;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let (xp, pp) = (xs.as_ptr(), panel.as_ptr());
    for k in 0..inp {
        // SAFETY: k < inp, so the panel's row k and x[r][k] (r < R) are in bounds.
        let w0 = _mm256_loadu_ps(pp.add(k * PANEL));
        let w1 = _mm256_loadu_ps(pp.add(k * PANEL + LANES));
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = _mm256_set1_ps(*xp.add(r * inp + k));
            a[0] = _mm256_fmadd_ps(w0, xb, a[0]);
            a[1] = _mm256_fmadd_ps(w1, xb, a[1]);
        }
    }
    let n = PANEL.min(out - o0);
    for (r, a) in acc.iter().enumerate() {
        let mut lanes = [0f32; PANEL];
        _mm256_storeu_ps(lanes.as_mut_ptr(), a[0]);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(LANES), a[1]);
        std::ptr::copy_nonoverlapping(lanes.as_ptr(), y.add(r * out + o0), n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_product_on_every_row_count() {
        let cpu = candle_core::Device::Cpu;
        if !has_packed_kernel() {
            let w = Tensor::zeros((3, 2), DType::F32, &cpu).unwrap();
            assert!(PackedWeight::new(&w).unwrap().is_none());
            return;
        }
        // Every kernel this CPU runs (AVX-512 machines test the AVX2 one too).
        for level in crate::cpu_kernel::simd_levels() {
            if Kernel::at(level).is_none() {
                continue;
            }
            // 133 features (odd, several tasks, a partial last panel), 37 inputs, 1-32 rows and
            // enough rows for two passes.
            let (out, inp) = (133, 37);
            let w: Vec<f32> = (0..out * inp)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let wt = Tensor::from_vec(w.clone(), (out, inp), &cpu).unwrap();
            let packed = PackedWeight::new_at(&wt, level).unwrap().expect("a kernel");
            assert_eq!(Kernel::at(level), Some(packed.kernel));
            assert_eq!((packed.out, packed.inp), (out, inp));
            for rows in (1..=32).chain([1800]) {
                let x: Vec<f32> = (0..rows * inp)
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                    .collect();
                let xt = Tensor::from_vec(x.clone(), (rows, inp), &cpu).unwrap();
                let y = linear(&xt, &packed).unwrap();
                assert_eq!(y.dims(), &[rows, out]);
                assert_plain_product(&y, &x, &w, 1e-4, &format!("{level:?}, rows {rows}"));
            }
            let wrong = Tensor::zeros((2, inp + 1), DType::F32, &cpu).unwrap();
            assert!(linear(&wrong, &packed).is_err(), "x of the wrong width");
            // More inputs than ONE_PASS_INPUTS: all rows in one pass.
            let (out, inp, rows) = (40, ONE_PASS_INPUTS + 5, 20);
            let w: Vec<f32> = (0..out * inp)
                .map(|i| ((i % 7) as f32 - 3.0) / 8.0)
                .collect();
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i % 5) as f32 - 2.0) / 4.0)
                .collect();
            let wt = Tensor::from_vec(w.clone(), (out, inp), &cpu).unwrap();
            let long = PackedWeight::new_at(&wt, level).unwrap().expect("a kernel");
            let y = linear(
                &Tensor::from_vec(x.clone(), (rows, inp), &cpu).unwrap(),
                &long,
            )
            .unwrap();
            assert_plain_product(&y, &x, &w, 1e-3, &format!("{level:?}, long rows"));
        }
    }

    /// `y: [rows, out]` equals `x W^T` computed in f64, for `x: [rows, inp]` and `w: [out, inp]`.
    fn assert_plain_product(y: &Tensor, x: &[f32], w: &[f32], tol: f64, what: &str) {
        let (rows, out) = y.dims2().unwrap();
        let inp = w.len() / out;
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for r in 0..rows {
            for o in 0..out {
                let want: f64 = (0..inp)
                    .map(|j| x[r * inp + j] as f64 * w[o * inp + j] as f64)
                    .sum();
                let got = y[r * out + o] as f64;
                assert!(
                    (got - want).abs() < tol,
                    "{what}: y[{r}][{o}] {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn packed_linear_backward_is_grad_times_w() {
        let cpu = candle_core::Device::Cpu;
        let (rows, out, inp) = (7, 45, 37);
        let w = Tensor::randn(0f32, 1.0, (out, inp), &cpu).unwrap();
        let (Some(pw), Some(pwt)) = (
            PackedWeight::new(&w).unwrap(),
            PackedWeight::new(&w.t().unwrap()).unwrap(),
        ) else {
            return; // no packed kernel on this CPU: the op is never built
        };
        let x = candle_core::Var::randn(0f32, 1.0, (rows, inp), &cpu).unwrap();
        let g = Tensor::randn(0f32, 1.0, (rows, out), &cpu).unwrap();
        let y = x
            .as_tensor()
            .apply_op1(PackedLinear::new(Arc::new(pw), Arc::new(pwt)))
            .unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(diff(&y, &plain) < 1e-4, "forward");
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(x.as_tensor()).expect("x has a gradient");
        assert!(diff(dx, &g.matmul(&w).unwrap()) < 1e-4, "backward");
    }
}
