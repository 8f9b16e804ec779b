//! How much attention each key of a text receives from chosen query rows of the same text: the
//! statistic that KV-cache compression ranks keys by (Zhang et al. 2023, "H2O"; Li et al. 2024,
//! "SnapKV", which observes from the rows of the question at the end). A cartridge can start from
//! the keys a corpus's readers look at most instead of its first `p` tokens.

use std::ops::Range;

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// Observer rows scored per matmul: bounds the score buffer to `heads x rows x keys`.
const ROWS_PER_BLOCK: usize = 128;

/// Attention each key receives from the query rows `observers`, causally.
///
/// `q: [kv_heads, groups * n, head_dim]` are one layer's scaled post-RoPE queries with rows
/// ordered (group, position); `k: [kv_heads, n, head_dim]` its keys. Returns `[kv_heads, n]` f32:
/// for key `j`, the softmax weight `q_i . k_j` gets, averaged over the group's query heads and the
/// observer rows `i >= j`; 0 for a key no observer sees. Averaging over the rows that see a key
/// keeps early keys from winning only because more rows follow them.
pub fn attention_received(
    q: &Tensor,
    k: &Tensor,
    groups: usize,
    observers: Range<usize>,
) -> Result<Tensor> {
    let (kvh, n, d) = k.dims3()?;
    let (qh, rows, qd) = q.dims3()?;
    if qh != kvh || qd != d || groups == 0 || rows != groups * n {
        return Err(Error::Msg(format!(
            "attention statistics: queries {:?} do not match keys {:?} with {groups} groups",
            q.dims(),
            k.dims()
        )));
    }
    if observers.is_empty() || observers.end > n {
        return Err(Error::Msg(format!(
            "attention statistics: observer rows {observers:?} outside 0..{n}"
        )));
    }
    let dev = k.device();
    let q = q.to_dtype(DType::F32)?.reshape((kvh, groups, n, d))?;
    let kt = k.to_dtype(DType::F32)?.t()?.contiguous()?;
    let mut total = Tensor::zeros((kvh, n), DType::F32, dev)?;
    let mut start = observers.start;
    while start < observers.end {
        let len = ROWS_PER_BLOCK.min(observers.end - start);
        let qb = q
            .narrow(2, start, len)?
            .contiguous()?
            .reshape((kvh, groups * len, d))?;
        // Causal: row `start + i` sees keys `0..=start + i`.
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| {
                (0..n).map(move |j| {
                    if j <= start + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (len, n), dev)?;
        let scores = qb
            .matmul(&kt)?
            .reshape((kvh, groups, len, n))?
            .broadcast_add(&mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        total = (total + weights.sum(D::Minus2)?.sum(1)?)?;
        start += len;
    }
    // Rows that see key j: observers.start.max(j)..observers.end, times the group's heads.
    let counts: Vec<f32> = (0..n)
        .map(|j| {
            let seen = observers.end.saturating_sub(observers.start.max(j));
            if seen == 0 {
                0.0
            } else {
                1.0 / (seen * groups) as f32
            }
        })
        .collect();
    let inv = Tensor::from_vec(counts, (1, n), dev)?;
    Ok(total.broadcast_mul(&inv)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The statistic computed by hand: explicit softmax per (head, row), then the average.
    fn reference(
        q: &[f32],
        k: &[f32],
        kvh: usize,
        g: usize,
        n: usize,
        d: usize,
        obs: Range<usize>,
    ) -> Vec<f64> {
        let mut out = vec![0f64; kvh * n];
        for h in 0..kvh {
            for gi in 0..g {
                for i in obs.clone() {
                    let qrow = &q[((h * g + gi) * n + i) * d..][..d];
                    let s: Vec<f64> = (0..=i)
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
                let seen = obs.end.saturating_sub(obs.start.max(j));
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
        for obs in [40..300, 0..300, 299..300] {
            let got = attention_received(&q, &k, g, obs.clone())?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let want = reference(&qv, &kv, kvh, g, n, d, obs.clone());
            for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-5, "{obs:?} key {j}: {a} vs {b}");
            }
            // Each row's weights sum to one: the averages, weighted back, sum to the rows seen.
            let mass: f64 = (0..n)
                .map(|j| got[j] as f64 * obs.end.saturating_sub(obs.start.max(j)) as f64)
                .sum();
            assert!((mass - obs.len() as f64).abs() < 1e-3, "{mass}");
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_and_rows_are_refused() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 12, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((2, 4, 4), DType::F32, &dev).unwrap();
        assert!(attention_received(&q, &k, 3, 0..4).is_ok());
        assert!(attention_received(&q, &k, 2, 0..4).is_err());
        assert!(attention_received(&q, &k, 3, 2..5).is_err());
        assert!(attention_received(&q, &k, 3, 2..2).is_err());
    }
}
