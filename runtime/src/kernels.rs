//! f32 CPU building blocks for fused ops built outside this crate (the compiler's key
//! refinement): the single-threaded strided matrix product and the row softmax that this crate's
//! own kernels use. Callers parallelise over blocks of rows.

/// `dst[m x n] (+)= a[m x k] b[k x n]`, each operand given by its row and column strides (so a
/// transposed operand is a stride swap, not a copy), on the calling thread; `dst` is row-major
/// with row stride `dst_rs`. Panics if a stride or size reaches outside its slice (a caller's
/// bug, never input), or if a stride exceeds `isize::MAX`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
) {
    crate::cpu_kernel::mm(
        (m, n, k),
        dst,
        dst_rs,
        accumulate,
        a,
        a_strides,
        b,
        b_strides,
    )
}

/// Softmax of `row` in place at the CPU's vector width. An entry of `-inf` gets about 1e-38,
/// not 0 (the vectorised `exp` clamps its input at -87); a row of nothing but `-inf` becomes
/// NaN, so a caller masking entries must keep at least one.
pub fn softmax(row: &mut [f32]) {
    crate::cpu_kernel::softmax(row, &mut [])
}
