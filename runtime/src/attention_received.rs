//! How much attention each key of a text receives from chosen query rows of the same text: the
//! statistic that KV-cache compression ranks keys by (Zhang et al. 2023, "H2O"; Li et al. 2024,
//! "SnapKV", which observes from the rows of the question at the end). A cartridge can start from
//! the keys a corpus's readers look at most instead of its first `p` tokens.

use std::ops::Range;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::cpu_kernel::{lane_max, mm, Elem};
use crate::error::{Error, Result};

/// Observer rows per task: one score buffer of `rows x keys` per query head of the group.
const ROWS_PER_TASK: usize = 64;

/// Which keys an observer row reads, and from where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observers {
    /// Each row at its own position, over the keys up to it: the causal read of the text.
    InPlace,
    /// Each row's query moved after the text (the caller rotates it there), over every key: the
    /// read of a question asked after the text, which is how a cartridge is read.
    AtEnd,
}

/// Attention each key receives from the query rows `rows`, read as `observers` says.
///
/// `q: [kv_heads, groups * n, head_dim]` are one layer's scaled post-RoPE queries with rows
/// ordered (group, position); `k: [kv_heads, n, head_dim]` its keys. Returns `[kv_heads, n]` f32:
/// for key `j`, the softmax weight `q_i . k_j` gets, averaged over the group's query heads and the
/// observer rows that see it (in place: `i >= j`; at the end: all); 0 for a key no observer sees.
/// Averaging over the rows that see a key keeps early keys from winning only because more rows
/// follow them.
///
/// Computed on the CPU in f32 whatever the tensors' device (an initialisation-time statistic):
/// tasks of (KV head, block of rows) score only the keys their rows may see, so in place the work
/// is the causal half of `rows x keys`, and the softmax never leaves the task's buffer.
pub fn attention_received(
    q: &Tensor,
    k: &Tensor,
    groups: usize,
    rows: Range<usize>,
    observers: Observers,
) -> Result<Tensor> {
    let (kvh, n, d) = k.dims3()?;
    let (qh, q_rows, qd) = q.dims3()?;
    if qh != kvh || qd != d || groups == 0 || q_rows != groups * n {
        return Err(Error::Msg(format!(
            "attention statistics: queries {:?} do not match keys {:?} with {groups} groups",
            q.dims(),
            k.dims()
        )));
    }
    if rows.is_empty() || rows.end > n {
        return Err(Error::Msg(format!(
            "attention statistics: observer rows {rows:?} outside 0..{n}"
        )));
    }
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let device = k.device().clone();
    let (q, k) = (host(q)?, host(k)?);
    let blocks: Vec<usize> = rows.clone().step_by(ROWS_PER_TASK).collect();
    let tasks: Vec<(usize, usize)> = (0..kvh)
        .flat_map(|h| blocks.iter().map(move |&s| (h, s)))
        .collect();
    let partial: Vec<(usize, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(h, start)| {
            let len = ROWS_PER_TASK.min(rows.end - start);
            // Keys 0..end are visible to some row of the block.
            let end = match observers {
                Observers::InPlace => start + len,
                Observers::AtEnd => n,
            };
            let kh = &k[h * n * d..(h + 1) * n * d];
            let mut acc = vec![0f32; end];
            let mut scores = vec![0f32; len * end];
            for g in 0..groups {
                let qrows = &q[((h * groups + g) * n + start) * d..];
                mm(
                    (len, end, d),
                    &mut scores,
                    end,
                    false,
                    qrows,
                    (d, 1),
                    kh,
                    (1, d),
                );
                for (i, row) in scores.chunks_exact_mut(end).enumerate() {
                    let row = match observers {
                        Observers::InPlace => &mut row[..=start + i],
                        Observers::AtEnd => row,
                    };
                    let m = lane_max(row);
                    let mut sum = 0f32;
                    for x in row.iter_mut() {
                        *x = (*x - m).exp_nonpositive();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    for (a, x) in acc.iter_mut().zip(row.iter()) {
                        *a += x * inv;
                    }
                }
            }
            (h, acc)
        })
        .collect();
    let mut total = vec![0f64; kvh * n];
    for (h, acc) in partial {
        for (t, a) in total[h * n..].iter_mut().zip(acc) {
            *t += a as f64;
        }
    }
    // Rows that see key j (in place: rows.start.max(j)..rows.end), times the group's heads.
    let out: Vec<f32> = total
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let j = i % n;
            let seen = match observers {
                Observers::InPlace => rows.end.saturating_sub(rows.start.max(j)),
                Observers::AtEnd => rows.len(),
            };
            if seen == 0 {
                0.0
            } else {
                (t / (seen * groups) as f64) as f32
            }
        })
        .collect();
    Ok(Tensor::from_vec(out, (kvh, n), &device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The statistic computed by hand: explicit softmax per (head, row), then the average.
    fn reference(
        q: &[f32],
        k: &[f32],
        (kvh, g, n, d): (usize, usize, usize, usize),
        obs: Range<usize>,
        observers: Observers,
    ) -> Vec<f64> {
        let mut out = vec![0f64; kvh * n];
        for h in 0..kvh {
            for gi in 0..g {
                for i in obs.clone() {
                    let qrow = &q[((h * g + gi) * n + i) * d..][..d];
                    let last = match observers {
                        Observers::InPlace => i,
                        Observers::AtEnd => n - 1,
                    };
                    let s: Vec<f64> = (0..=last)
                        .map(|j| {
                            let krow = &k[(h * n + j) * d..][..d];
                            qrow.iter().zip(krow).map(|(a, b)| (a * b) as f64).sum()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for (j, x) in s.iter().enumerate() {
                        out[h * n + j] += (x - m).exp() / z;
                    }
                }
            }
            for j in 0..n {
                let seen = match observers {
                    Observers::InPlace => obs.end.saturating_sub(obs.start.max(j)),
                    Observers::AtEnd => obs.len(),
                };
                if seen > 0 {
                    out[h * n + j] /= (seen * g) as f64;
                }
            }
        }
        out
    }

    #[test]
    fn matches_an_explicit_softmax() -> Result<()> {
        let dev = Device::Cpu;
        let (kvh, g, n, d) = (2, 3, 300, 8);
        let q = Tensor::randn(0f32, 1.0, (kvh, g * n, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (kvh, n, d), &dev)?;
        let qv = q.flatten_all()?.to_vec1::<f32>()?;
        let kv = k.flatten_all()?.to_vec1::<f32>()?;
        // More observer rows than one block, starting inside the text.
        for observers in [Observers::InPlace, Observers::AtEnd] {
            for obs in [40..300, 0..300, 299..300] {
                let got = attention_received(&q, &k, g, obs.clone(), observers)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let want = reference(&qv, &kv, (kvh, g, n, d), obs.clone(), observers);
                for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*a as f64 - b).abs() < 1e-5,
                        "{observers:?} {obs:?} key {j}: {a} vs {b}"
                    );
                }
                // Each row's weights sum to one: the averages, weighted back, sum to the rows.
                let seen = |j: usize| match observers {
                    Observers::InPlace => obs.end.saturating_sub(obs.start.max(j)),
                    Observers::AtEnd => obs.len(),
                };
                let mass: f64 = (0..n).map(|j| got[j] as f64 * seen(j) as f64).sum();
                assert!(
                    (mass - obs.len() as f64).abs() < 1e-3,
                    "{observers:?} {mass}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_and_rows_are_refused() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 12, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((2, 4, 4), DType::F32, &dev).unwrap();
        let read = |groups, rows| attention_received(&q, &k, groups, rows, Observers::InPlace);
        assert!(read(3, 0..4).is_ok());
        assert!(read(2, 0..4).is_err());
        assert!(read(3, 2..5).is_err());
        assert!(read(3, 2..2).is_err());
    }
}
