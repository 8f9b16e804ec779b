//! Values for a cartridge's selected corpus keys, fitted so that attending to the few keys reads
//! what attending to the whole corpus read ([`crate::InitKind::SelectedFitted`]).
//!
//! Why: a selected key keeps the value it had in the corpus, but a query that saw thousands of
//! keys now sees a tenth of them, so the softmax spreads its weight over fewer values and reads
//! something else. With the keys fixed, each KV head's read is linear in the values: for observer
//! queries `Q`, the selected keys give attention weights `A = softmax(Q K_s^T)` and the whole
//! corpus gave outputs `O = softmax(Q K^T) V`, so the values that best reproduce `O` solve the
//! ridge least-squares problem `min |A V_s - O|^2 + lambda |V_s - V_0|^2` (`V_0`: the keys' own
//! values), `(A^T A + lambda I) V_s = A^T O + lambda V_0`.
//!
//! The observers are the corpus's own queries, evenly spaced over it (at most [`FIT_ROWS`] rows
//! per segment, head and kind), of two kinds ([`Observers`]):
//! each query where it was, seeing the keys before it, as when the corpus was read; and each query
//! moved to the end of its segment, seeing all of it, as a question after the corpus would. Measured on the example corpora's
//! questions (BENCHMARKS.md, "Training"), untrained, share of the bare -> ICL gap in answer
//! log-likelihood, at most 4,096 rows: quenmar (p = 512) 43% with the keys' own values, 55%
//! fitted to the first kind, 61% to both; tidewright (p = 224) 21%, 45%, 50%. The second kind
//! alone did worse than the first. With up to [`FIT_ROWS`] rows, both kinds: 65% and 52%.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// Observer rows (queries) per corpus segment, KV head and kind of observer. On quenmar (5,030
/// tokens, 15,090 rows per head and kind) 4,096 / 8,192 / all of them gave -4.400 / -4.349 /
/// -4.331 in answer log-likelihood, and the fit took 68 s / - / 159 s on 2 cores.
pub const FIT_ROWS: usize = 16_384;

/// Observer rows scored at once.
const ROW_BLOCK: usize = 2048;

/// The ridge `lambda` as a share of the mean diagonal of `A^T A`: small enough to fit, large
/// enough that keys few queries attend to stay near their own values (with observers from the
/// corpus's later seven eighths, 1e-2 and 1e-4 both did worse on quenmar's questions than 1e-3).
pub const RIDGE: f64 = 1e-3;

/// Where an observer row reads the corpus from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observers {
    /// Each row at its own position, over the keys up to it: the causal read of the text.
    InPlace,
    /// Each row's query moved after the text (the caller rotates it there), over every key: the
    /// read of a question asked after the text, which is how a cartridge is read.
    AtEnd,
}

/// The normal equations of one KV head's fit, summed over corpus segments.
pub struct NormalEquations {
    /// `A^T A`, `[p, p]`.
    gram: Tensor,
    /// `A^T O`, `[p, d]`.
    rhs: Tensor,
}

impl NormalEquations {
    /// Adds one segment's observers. `q: [groups * n, d]` (rows (group, token), scaled as the
    /// model scales them, post-RoPE at the positions `observers` says), `k, v: [n, d]` the
    /// segment's keys and values; `chosen[j]` is the segment position of slot `j`'s key, or
    /// `None` when slot `j` comes from another segment (this segment's queries never saw it).
    /// Rows that see no chosen key add nothing.
    pub fn add(
        acc: Option<Self>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        chosen: &[Option<usize>],
        groups: usize,
        observers: Observers,
    ) -> Result<Option<Self>> {
        let (n, _) = k.dims2()?;
        let p = chosen.len();
        let step = (n * groups).div_ceil(FIT_ROWS).max(1);
        // Observer rows that see at least one chosen key: in place, from the earliest chosen
        // position on; at the end, all of them.
        let first = match observers {
            Observers::InPlace => chosen.iter().flatten().min().copied(),
            Observers::AtEnd => chosen.iter().flatten().next().map(|_| 0),
        };
        let rows: Vec<u32> = match first {
            None => Vec::new(),
            Some(first) => (0..groups)
                .flat_map(|g| (first..n).step_by(step).map(move |i| (g * n + i) as u32))
                .collect(),
        };
        let dev = q.device();
        // Slots from other segments get a placeholder key (position 0); their weight is masked.
        let idx: Vec<u32> = chosen.iter().map(|c| c.unwrap_or(0) as u32).collect();
        let keys = k.index_select(&Tensor::from_vec(idx, p, dev)?, 0)?;
        let mut acc = acc;
        // In blocks of rows, so the score buffers stay `ROW_BLOCK x n` for long segments.
        for block in rows.chunks(ROW_BLOCK) {
            let nr = block.len();
            let mut mask_all = vec![0f32; nr * n];
            let mut mask_chosen = vec![0f32; nr * p];
            for (r, &row) in block.iter().enumerate() {
                // The last key this row sees.
                let i = match observers {
                    Observers::InPlace => row as usize % n,
                    Observers::AtEnd => n - 1,
                };
                mask_all[r * n + i + 1..(r + 1) * n].fill(f32::NEG_INFINITY);
                for (j, c) in chosen.iter().enumerate() {
                    if !matches!(c, Some(c) if *c <= i) {
                        mask_chosen[r * p + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let q = q.index_select(&Tensor::from_vec(block.to_vec(), nr, dev)?, 0)?;
            let weights = |keys: &Tensor, mask: Vec<f32>, width: usize| -> Result<Tensor> {
                let mask = Tensor::from_vec(mask, (nr, width), dev)?;
                Ok(candle_nn::ops::softmax_last_dim(
                    &(q.matmul(&keys.t()?)? + mask)?,
                )?)
            };
            let o = weights(k, mask_all, n)?.matmul(v)?;
            let a = weights(&keys, mask_chosen, p)?;
            let at = a.t()?;
            let (gram, rhs) = (at.matmul(&a)?, at.matmul(&o)?);
            acc = Some(match acc {
                None => Self { gram, rhs },
                Some(acc) => Self {
                    gram: (acc.gram + gram)?,
                    rhs: (acc.rhs + rhs)?,
                },
            });
        }
        Ok(acc)
    }

    /// The fitted values `[p, d]`, pulled towards `v0` (the keys' own values) by the ridge.
    pub fn solve(&self, v0: &Tensor, ridge: f64) -> Result<Tensor> {
        let (p, d) = v0.dims2()?;
        let gram = self
            .gram
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let rhs = self
            .rhs
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let v0s = v0.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let trace: f64 = (0..p).map(|i| gram[i * p + i]).sum();
        // A slot no observer weighs (all-zero rows) keeps its own value through the ridge; the
        // floor keeps the system positive definite even if nothing was observed.
        let lambda = (ridge * trace / p as f64).max(1e-12);
        let mut m = gram;
        for i in 0..p {
            m[i * p + i] += lambda;
        }
        let mut b: Vec<f64> = rhs
            .iter()
            .zip(&v0s)
            .map(|(&r, &v)| r + lambda * v)
            .collect();
        cholesky_solve(&mut m, &mut b, p, d)?;
        let out: Vec<f32> = b.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(out, (p, d), v0.device())?.to_dtype(v0.dtype())?)
    }
}

/// Solves `M X = B` in place: `m` is `[p, p]` symmetric positive definite (overwritten by its
/// Cholesky factor), `b` is `[p, d]` (overwritten by `X`).
fn cholesky_solve(m: &mut [f64], b: &mut [f64], p: usize, d: usize) -> Result<()> {
    for j in 0..p {
        let diag = m[j * p + j] - (0..j).map(|k| m[j * p + k] * m[j * p + k]).sum::<f64>();
        // Also refuses NaN.
        if diag.is_nan() || diag <= 0.0 {
            return Err(Error::Config(
                "value fit: the normal equations are not positive definite".into(),
            ));
        }
        let diag = diag.sqrt();
        m[j * p + j] = diag;
        for i in j + 1..p {
            let dot: f64 = (0..j).map(|k| m[i * p + k] * m[j * p + k]).sum();
            m[i * p + j] = (m[i * p + j] - dot) / diag;
        }
    }
    for c in 0..d {
        // L y = b, then L^T x = y.
        for i in 0..p {
            let dot: f64 = (0..i).map(|k| m[i * p + k] * b[k * d + c]).sum();
            b[i * d + c] = (b[i * d + c] - dot) / m[i * p + i];
        }
        for i in (0..p).rev() {
            let dot: f64 = (i + 1..p).map(|k| m[k * p + i] * b[k * d + c]).sum();
            b[i * d + c] = (b[i * d + c] - dot) / m[i * p + i];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cholesky_solves_a_symmetric_positive_definite_system() -> Result<()> {
        // M = L L^T with a known L; X known; B = M X.
        let p = 5;
        let l: Vec<f64> = (0..p * p)
            .map(|i| match (i / p, i % p) {
                (r, c) if r == c => 2.0 + r as f64,
                (r, c) if c < r => 0.3 * (r + 2 * c) as f64 - 1.0,
                _ => 0.0,
            })
            .collect();
        let mut m = vec![0f64; p * p];
        for r in 0..p {
            for c in 0..p {
                m[r * p + c] = (0..p).map(|k| l[r * p + k] * l[c * p + k]).sum();
            }
        }
        let x: Vec<f64> = (0..p * 2).map(|i| i as f64 * 0.5 - 2.0).collect();
        let mut b = vec![0f64; p * 2];
        for r in 0..p {
            for c in 0..2 {
                b[r * 2 + c] = (0..p).map(|k| m[r * p + k] * x[k * 2 + c]).sum();
            }
        }
        cholesky_solve(&mut m, &mut b, p, 2)?;
        for (got, want) in b.iter().zip(&x) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        let mut singular = vec![1.0, 1.0, 1.0, 1.0];
        assert!(cholesky_solve(&mut singular, &mut [1.0, 1.0], 2, 1).is_err());
        Ok(())
    }

    /// What the fit is for: with a tenth of the keys, the fitted values reproduce the whole
    /// corpus's attention outputs better than the keys' own values do.
    #[test]
    fn fitted_values_read_closer_to_the_whole_corpus() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d, groups) = (200, 8, 2);
        let q = (Tensor::randn(0f32, 1.0, (groups * n, d), &dev)? * 0.5)?;
        let k = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
        let picked: Vec<usize> = (0..n).step_by(10).collect();
        let chosen: Vec<Option<usize>> = picked.iter().map(|&c| Some(c)).collect();
        let idx = Tensor::from_vec(
            picked.iter().map(|&c| c as u32).collect::<Vec<_>>(),
            picked.len(),
            &dev,
        )?;
        let v0 = v.index_select(&idx, 0)?;
        for observers in [Observers::InPlace, Observers::AtEnd] {
            let eq = NormalEquations::add(None, &q, &k, &v, &chosen, groups, observers)?
                .expect("observers");
            let fitted = eq.solve(&v0, RIDGE)?;
            // The residual |A V - O|^2 = tr(V^T G V) - 2 tr(V^T R) + const, without const.
            let cost = |vals: &Tensor| -> Result<f64> {
                let quad = vals.t()?.matmul(&eq.gram.matmul(vals)?)?;
                let lin = vals.t()?.matmul(&eq.rhs)?;
                let tr = |t: &Tensor| -> Result<f64> {
                    let m = t.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                    Ok((0..m.len()).map(|i| m[i][i]).sum())
                };
                Ok(tr(&quad)? - 2.0 * tr(&lin)?)
            };
            let (before, after) = (cost(&v0)?, cost(&fitted)?);
            assert!(
                after < before - 1e-3,
                "{observers:?}: fit did not help: {before} -> {after}"
            );
        }
        // A slot from another segment (never observed here) keeps its own value.
        let mut partial = chosen.clone();
        partial[3] = None;
        let eq = NormalEquations::add(None, &q, &k, &v, &partial, groups, Observers::InPlace)?
            .expect("observers");
        let fitted = eq.solve(&v0, RIDGE)?;
        let diff = (fitted.get(3)? - v0.get(3)?)?
            .abs()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "an unobserved slot moved by {diff}");
        Ok(())
    }

    /// Observers at the end see every key: their normal equations are those of the unmasked
    /// softmax, written out here (over more rows than one block, so the blocks add up too).
    #[test]
    fn observers_at_the_end_see_the_whole_segment() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d, groups) = (ROW_BLOCK / 2 + 60, 8, 2);
        let q = Tensor::randn(0f32, 1.0, (groups * n, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
        let picked: Vec<u32> = vec![0, 7, 19, n as u32 - 1];
        let chosen: Vec<Option<usize>> = picked.iter().map(|&c| Some(c as usize)).collect();
        let eq = NormalEquations::add(None, &q, &k, &v, &chosen, groups, Observers::AtEnd)?
            .expect("observers");
        let keys = k.index_select(&Tensor::from_vec(picked, 4, &dev)?, 0)?;
        let a = candle_nn::ops::softmax_last_dim(&q.matmul(&keys.t()?)?)?;
        let o = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?.matmul(&v)?;
        let gram = a.t()?.matmul(&a)?;
        let rhs = a.t()?.matmul(&o)?;
        for (got, want) in [(&eq.gram, &gram), (&eq.rhs, &rhs)] {
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-4, "normal equations differ by {diff}");
        }
        Ok(())
    }
}
