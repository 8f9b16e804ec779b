//! What the CPU kernels ([`crate::attention`], [`crate::decode_attention`], [`crate::fused`])
//! share: the element types they run in, a vectorisable `exp`, lane-wise reductions, a strided
//! single-threaded matrix product, and access to candle's storages.

use candle_core::{CpuStorage, DType, Device, Layout, Tensor, WithDType};

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
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.max(-87.0);
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
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
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

/// A tensor's values, row-major (a backward's inputs).
pub(crate) fn to_vec<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.contiguous()?.flatten_all()?.to_vec1::<T>()
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
    // The last element each operand touches must lie inside its slice.
    assert!((m - 1) * dst_rs + n <= dst.len(), "mm: dst out of bounds");
    assert!(
        (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
        "mm: a out of bounds"
    );
    assert!(
        (k - 1) * b_rs + (n - 1) * b_cs < b.len(),
        "mm: b out of bounds"
    );
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

pub(crate) fn lane_sum<T: Elem>(xs: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let tail = chunks.remainder().iter().fold(T::zero(), |s, &x| s + x);
    acc.iter().fold(tail, |s, &x| s + x)
}

#[cfg(test)]
mod tests {
    use super::*;

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
