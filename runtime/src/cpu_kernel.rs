//! What the CPU kernels ([`crate::attention`], [`crate::decode_attention`], [`crate::fused`])
//! share: the element types they run in, a vectorisable `exp`, lane-wise reductions, a strided
//! single-threaded matrix product, and access to candle's storages.

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor, WithDType};

/// Whether our CPU kernels run for tensors of this device and dtype.
pub(crate) fn supported(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// The element types our kernels run in.
pub(crate) trait Elem:
    WithDType + num_traits::Float + std::ops::AddAssign + std::ops::MulAssign + Send + Sync
{
    /// `exp(x)` for `x <= 0` (scores minus their row maximum).
    fn exp_nonpositive(self) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn exp_nonpositive(self) -> Self {
        exp_f32(self)
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn exp_nonpositive(self) -> Self {
        self.exp()
    }
}

/// `exp(x)` for `x <= 0` in branch-free arithmetic the compiler vectorises (the libm call does
/// not): `x = n ln2 + r` with `|r| <= ln2 / 2`, `e^r` by its degree-7 Taylor polynomial
/// (truncation error below 1e-8), times `2^n` built in the exponent bits. Relative error below
/// 3e-7 (tested); inputs under -87 (and -inf) give ~1e-38 instead of 0, nothing beside a row
/// maximum's `e^0 = 1`.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23.
    const SHIFT: f32 = 12_582_912.0;
    // A plain comparison, not `f32::max`: its NaN handling costs a compare and a blend per
    // vector, and no score here is NaN.
    let x = if x < -87.0 { -87.0 } else { x };
    // Adding 1.5 * 2^23 rounds x log2(e) to the nearest integer n and leaves it in the low
    // mantissa bits of `t` (exact for |n| < 2^22): `t.to_bits() = 0x4B40_0000 + n`, from which
    // 2^n's exponent bits follow in integer arithmetic (a float-to-int cast would not vectorise).
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

/// A contiguous view of a CPU storage as a slice of `T`.
pub(crate) fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("custom op: non-contiguous input".into()))?;
    Ok(&s.as_slice::<T>()?[start..end])
}

/// Runs `f` on the row-major values of CPU tensors (a backward's inputs), borrowed from their
/// storages: only a non-contiguous tensor is copied (copying every input once per op was a few
/// percent of a training step).
pub(crate) fn with_values<T: WithDType, R, const N: usize>(
    tensors: [&Tensor; N],
    f: impl FnOnce([&[T]; N]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let owned = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut values = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(s) => values.push(slice::<T>(s, layout)?),
            _ => candle_core::bail!("custom op: CPU tensors only"),
        }
    }
    match <[&[T]; N]>::try_from(values) {
        Ok(values) => f(values),
        Err(_) => candle_core::bail!("custom op: {N} inputs expected"),
    }
}

/// `dst[m x n] (+)= a[m x k] b[k x n]`, each operand given by its row and column strides; the
/// product runs on the calling thread (the blocks are the parallel unit).
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(T::zero());
            }
        }
        return;
    }
    // The last element each operand touches must lie inside its slice (computed without
    // wrapping: `kernels::matmul` exposes this to other crates), and every stride must fit the
    // `isize` gemm takes.
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| {
        (rows - 1)
            .checked_mul(rs)
            .zip((cols - 1).checked_mul(cs))
            .and_then(|(r, c)| r.checked_add(c))
    };
    let fits = |last: Option<usize>, len: usize| last.is_some_and(|i| i < len);
    assert!(
        [dst_rs, a_rs, a_cs, b_rs, b_cs]
            .iter()
            .all(|&s| isize::try_from(s).is_ok()),
        "mm: stride too large"
    );
    assert!(m == 1 || dst_rs >= n, "mm: dst rows overlap");
    assert!(
        fits(last(m, dst_rs, n, 1), dst.len()),
        "mm: dst out of bounds"
    );
    assert!(fits(last(m, a_rs, k, a_cs), a.len()), "mm: a out of bounds");
    assert!(fits(last(k, b_rs, n, b_cs), b.len()), "mm: b out of bounds");
    // SAFETY: the asserts above bound every index the product reads or writes (row-major
    // `dst` with column stride 1); the three slices are distinct borrows.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Lanes of the reductions below: float sums and maxima only vectorise when written as
/// independent accumulators (the compiler may not reorder a single chain).
const LANES: usize = 16;

#[inline(always)]
pub(crate) fn lane_max<T: Elem>(xs: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &x| if x > m { x } else { m });
    acc.iter().fold(tail, |m, &x| if x > m { x } else { m })
}

/// `xs <- exp(xs - max)`, returning their sum (in `LANES` independent accumulators, so that it
/// vectorises).
#[inline(always)]
fn exp_shifted_sum<T: Elem>(xs: &mut [T], max: T) -> T {
    let mut acc = [T::zero(); LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = (*x - max).exp_nonpositive();
            *a += *x;
        }
    }
    let mut tail = T::zero();
    for x in chunks.into_remainder() {
        *x = (*x - max).exp_nonpositive();
        tail += *x;
    }
    acc.iter().fold(tail, |s, &x| s + x)
}

#[inline(always)]
fn softmax_body<T: Elem>(a: &mut [T], b: &mut [T]) {
    let max = num_traits::Float::max(lane_max(a), lane_max(b));
    let inv = (exp_shifted_sum(a, max) + exp_shifted_sum(b, max)).recip();
    // Two loops, not a chained iterator: a chain does not vectorise.
    for part in [a, b] {
        for x in part.iter_mut() {
            *x *= inv;
        }
    }
}

/// Vector instructions the kernels are compiled for, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Simd {
    /// What every x86-64 has (SSE2, 4 f32 lanes), and any other architecture's default.
    Baseline,
    /// AVX2 with FMA: 8 lanes, 16 vector registers.
    Avx2,
    /// AVX-512F (with FMA): 16 lanes, 32 vector registers.
    Avx512,
}

/// The widest [`Simd`] this CPU has (detected once; the macros cache it).
#[inline(always)]
pub(crate) fn simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        // The levels nest: code for a level may use the instructions of the levels below it.
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
            return Simd::Avx512;
        }
        if avx2 {
            return Simd::Avx2;
        }
    }
    Simd::Baseline
}

/// Every [`Simd`] this CPU runs, narrowest first (for tests that compare the builds).
#[cfg(test)]
pub(crate) fn simd_levels() -> Vec<Simd> {
    [Simd::Baseline, Simd::Avx2, Simd::Avx512]
        .into_iter()
        .filter(|&s| s <= simd())
        .collect()
}

/// Defines `fn NAME` that runs `BODY` (an `#[inline(always)]` function generic over an [`Elem`]
/// `T`, with the same arguments) compiled for the widest vector instructions the CPU has, and
/// `fn NAME_AT(level, ...)` that runs it compiled for `level` (or the widest below it that the
/// CPU has).
///
/// Why: the crate is built for any x86-64, so plain loops run 4 lanes wide; the same code
/// compiled under `target_feature` runs 8 (AVX2) or 16 (AVX-512) lanes wide. The arithmetic is
/// the same (no reassociation, and Rust never fuses a multiply and an add), so the results are
/// too, bit for bit (tested for every level the CPU has).
macro_rules! widest {
    (
        $(#[$doc:meta])*
        $vis:vis fn $name:ident / $name_at:ident <$t:ident>($($arg:ident: $ty:ty),* $(,)?)
            $(-> $ret:ty)? = $body:ident
    ) => {
        $(#[$doc])*
        #[inline]
        $vis fn $name<$t: $crate::cpu_kernel::Elem>($($arg: $ty),*) $(-> $ret)? {
            $name_at($crate::cpu_kernel::simd(), $($arg),*)
        }

        /// The same, compiled for at most `level` (see [`crate::cpu_kernel::simd`]).
        #[inline]
        $vis fn $name_at<$t: $crate::cpu_kernel::Elem>(
            level: $crate::cpu_kernel::Simd,
            $($arg: $ty),*
        ) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn avx512<$t: $crate::cpu_kernel::Elem>($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: $crate::cpu_kernel::Elem>($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                use $crate::cpu_kernel::Simd;
                match level.min($crate::cpu_kernel::simd()) {
                    // SAFETY: the CPU has these instructions (`simd()` detected them).
                    Simd::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Simd::Avx2 => return unsafe { avx2($($arg),*) },
                    Simd::Baseline => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = level;
            $body($($arg),*)
        }
    };
}
pub(crate) use widest;

widest! {
    /// Softmax over the concatenation of `a` and `b` (a prefix's scores and a sequence's own), in
    /// place.
    pub(crate) fn softmax / softmax_at <T>(a: &mut [T], b: &mut [T]) = softmax_body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_matches_f64_and_every_build_agrees_bit_for_bit() {
        // Lengths around the 16 lanes (tails), one part empty or not, scores of either sign.
        for (na, nb) in [(0, 1), (1, 0), (5, 0), (16, 17), (33, 2), (100, 61)] {
            let scores: Vec<f32> = (0..na + nb)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173)
                .collect();
            let mut got = scores.clone();
            let (a, b) = got.split_at_mut(na);
            softmax(a, b);
            let max = scores
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let den: f64 = scores.iter().map(|&x| (x as f64 - max).exp()).sum();
            for (&g, &x) in got.iter().zip(&scores) {
                let want = (x as f64 - max).exp() / den;
                assert!((g as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12);
            }
            for level in simd_levels() {
                let mut built = scores.clone();
                let (a, b) = built.split_at_mut(na);
                softmax_at(level, a, b);
                assert_eq!(got, built, "{na} + {nb}: the {level:?} build differs");
            }
        }
    }

    #[test]
    #[should_panic(expected = "mm: a out of bounds")]
    fn a_product_whose_strides_wrap_around_is_refused() {
        // (5 - 1) * a_rs wraps to 0 in unchecked arithmetic, which would pass a plain bound;
        // the stride itself fits an isize.
        let a = [1f32; 4];
        let b = [1f32; 4];
        let mut dst = [0f32; 10];
        let huge = 1usize << (usize::BITS - 2);
        mm((5, 2, 1), &mut dst, 2, false, &a, (huge, 1), &b, (2, 1));
    }

    #[test]
    fn fast_exp_is_accurate_on_the_softmax_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f64 / 200_000.0;
            let got = exp_f32(x as f32) as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
    }
}
