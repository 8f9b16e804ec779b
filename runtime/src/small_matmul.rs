//! `y = x W^T` in f32 for a few rows of `x` (decoding 2-32 sequences) on CPUs with AVX-512.
//!
//! Why: decoding a small batch is one pass over the weights, but candle's gemm packs the whole
//! weight into tiles on every call and runs a micro-kernel shaped for many columns; at 8 rows it
//! reached about a fifth of this machine's matmul rate (a batch-8 decode profile: 58% of the time
//! in gemm's `x1x6` kernel, plus its packing). Here each group of weight rows is read once, from
//! memory, and dotted with every row of `x`, which stays in cache; the two cores take disjoint
//! ranges of output features.
//!
//! The kernel uses AVX-512 intrinsics in functions that run only where the CPU has it (checked at
//! run time); elsewhere [`xwt`] returns `None` and the caller keeps candle's product.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Lanes of one vector register (AVX-512, f32).
const LANES: usize = 16;

/// Weight rows and rows of `x` dotted in one pass: 4 x 6 accumulators of 16 lanes, plus the four
/// weight vectors and one of `x`, fill 29 of the 32 vector registers; each step loads 10
/// vectors for 24 multiply-adds.
const WEIGHT_ROWS: usize = 4;
const ROW_BLOCK: usize = 6;

/// Rows up to which this kernel beats candle's `(W x^T)^T` on SmolLM2's shapes (measured: 12
/// rows 1.4x, 24 rows about 1.1x, 32 rows 0.9x of its decode speed).
pub(crate) const MAX_ROWS: usize = 24;

/// Output features per parallel task: small enough to balance two cores on 576-wide layers,
/// large enough that a task's overhead is noise.
const FEATURES_PER_TASK: usize = 64;

/// `x W^T` for `x: [rows, inp]` and a weight `w: [out, inp]` in f32 on the CPU, or `None` where
/// this kernel does not apply (another dtype or device, a strided operand, no AVX-512).
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (rows, inp) = x.dims2()?;
    let (out, w_inp) = w.dims2()?;
    if rows > MAX_ROWS
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || w_inp != inp
        || !has_avx512()
    {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else {
        return Ok(None);
    };
    let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
    else {
        return Ok(None);
    };
    let y = xwt(
        &xs.as_slice::<f32>()?[x0..x1],
        rows,
        &ws.as_slice::<f32>()?[w0..w1],
        out,
        inp,
    );
    Ok(match y {
        Some(y) => Some(Tensor::from_vec(y, (rows, out), x.device())?),
        None => None,
    })
}

/// `x: [rows, inp]`, `w: [out, inp]`, both row-major; returns `y: [rows, out]`, or `None` when this
/// CPU has no AVX-512 (then nothing was computed).
pub(crate) fn xwt(x: &[f32], rows: usize, w: &[f32], out: usize, inp: usize) -> Option<Vec<f32>> {
    if !has_avx512() || x.len() != rows * inp || w.len() != out * inp {
        return None;
    }
    // y^T in blocks of features (each task's rows contiguous), transposed at the end.
    let mut yt = vec![0f32; out * rows];
    yt.par_chunks_mut(FEATURES_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, block)| {
            let o0 = task * FEATURES_PER_TASK;
            let n = block.len() / rows;
            // SAFETY: AVX-512F and FMA are present: checked above (never false elsewhere).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                features_avx512(x, rows, &w[o0 * inp..(o0 + n) * inp], inp, block)
            };
        });
    let mut y = vec![0f32; rows * out];
    for (o, col) in yt.chunks_exact(rows).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * out + o] = v;
        }
    }
    Some(y)
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `yt[o * rows + r] = w[o] . x[r]` for the weight rows `w: [n, inp]`.
///
/// # Safety
/// The CPU must have AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn features_avx512(x: &[f32], rows: usize, w: &[f32], inp: usize, yt: &mut [f32]) {
    let n = w.len() / inp;
    let row = |o: usize| &w[o * inp..(o + 1) * inp];
    let mut o = 0;
    while o + WEIGHT_ROWS <= n {
        let ws: [&[f32]; WEIGHT_ROWS] = std::array::from_fn(|i| row(o + i));
        let out = &mut yt[o * rows..(o + WEIGHT_ROWS) * rows];
        row_blocks::<WEIGHT_ROWS>(x, rows, inp, ws, out);
        o += WEIGHT_ROWS;
    }
    while o < n {
        row_blocks::<1>(x, rows, inp, [row(o)], &mut yt[o * rows..(o + 1) * rows]);
        o += 1;
    }
}

/// Dot `W` weight rows with every row of `x`, `ROW_BLOCK` rows at a time and the remainder in
/// blocks of 4, 2, 1 (constant sizes keep the accumulators in registers). `out[i * rows + r]`.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_blocks<const W: usize>(
    x: &[f32],
    rows: usize,
    inp: usize,
    w: [&[f32]; W],
    out: &mut [f32],
) {
    let mut r = 0;
    while r + ROW_BLOCK <= rows {
        block::<W, ROW_BLOCK>(x, r, rows, inp, w, out);
        r += ROW_BLOCK;
    }
    for size in [4, 2, 1] {
        if r + size <= rows {
            match size {
                4 => block::<W, 4>(x, r, rows, inp, w, out),
                2 => block::<W, 2>(x, r, rows, inp, w, out),
                _ => block::<W, 1>(x, r, rows, inp, w, out),
            }
            r += size;
        }
    }
}

/// # Safety
/// The CPU must have AVX-512F; `x` holds rows `r0..r0 + R` of `inp`, each `w[i]` holds `inp`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block<const W: usize, const R: usize>(
    x: &[f32],
    r0: usize,
    rows: usize,
    inp: usize,
    w: [&[f32]; W],
    out: &mut [f32],
) {
    use std::arch::x86_64::{
        _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_reduce_add_ps, _mm512_setzero_ps,
    };
    let mut acc = [[_mm512_setzero_ps(); R]; W];
    let full = inp / LANES * LANES;
    let xs: [&[f32]; R] = std::array::from_fn(|r| &x[(r0 + r) * inp..(r0 + r + 1) * inp]);
    let mut c = 0;
    while c < full {
        // SAFETY: c + LANES <= full <= inp, the length of every row read here.
        let wv: [_; W] = std::array::from_fn(|i| _mm512_loadu_ps(w[i].as_ptr().add(c)));
        for r in 0..R {
            let xv = _mm512_loadu_ps(xs[r].as_ptr().add(c));
            for i in 0..W {
                acc[i][r] = _mm512_fmadd_ps(wv[i], xv, acc[i][r]);
            }
        }
        c += LANES;
    }
    for i in 0..W {
        for r in 0..R {
            let tail: f32 = (full..inp).map(|j| w[i][j] * xs[r][j]).sum();
            out[i * rows + r0 + r] = _mm512_reduce_add_ps(acc[i][r]) + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_product_on_every_row_count() {
        if !has_avx512() {
            assert!(xwt(&[0.0; 4], 2, &[0.0; 6], 3, 2).is_none());
            return;
        }
        // 133 features (odd, several tasks), 37 inputs (a lane tail), 1-32 rows.
        let (out, inp) = (133, 37);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        for rows in 1..=32 {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            let y = xwt(&x, rows, &w, out, inp).expect("avx-512 present");
            for r in 0..rows {
                for o in 0..out {
                    let want: f64 = (0..inp)
                        .map(|j| x[r * inp + j] as f64 * w[o * inp + j] as f64)
                        .sum();
                    let got = y[r * out + o] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "rows {rows}: y[{r}][{o}] {got} vs {want}"
                    );
                }
            }
        }
        assert!(xwt(&[0.0; 3], 2, &[0.0; 6], 3, 2).is_none(), "bad x length");
    }
}
