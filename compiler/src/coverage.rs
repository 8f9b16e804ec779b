//! Which corpus keys a head keeps: the ones that cover its readers (greedy coverage).
//!
//! Ranking keys by the attention they receive on average favours keys that many queries glance
//! at over a fact's tokens, which few queries read but read hard. Coverage instead maximises
//! `sum_i ln(eps + c_i)`, where `c_i` is the share of observer `i`'s attention that falls on the
//! chosen keys: once an observer is covered its keys count for less, and the observers nothing
//! covers yet pull the next choices. The objective is monotone submodular, so the greedy choice is
//! within `1 - 1/e` of the best; each round takes the keys of largest gradient
//! `sum_i A_ij / (eps + c_i)`, [`KEYS_PER_ROUND`] at a time.
//!
//! Measured on the example question sets (BENCHMARKS.md, "Keys chosen for coverage"): against
//! the average-attention ranking, tidewright's fitted cartridge -4.770 against -4.924 in answer
//! log-likelihood; `eps` of 1e-3 / 1e-1 / 0.3 gave -4.776 / -4.794 / -4.817, and rounds of 4 / 64
//! keys -4.776 / -4.779.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// Keys chosen per greedy round: the gradient is recomputed after each batch.
pub const KEYS_PER_ROUND: usize = 16;

/// The floor added to each observer's coverage in the objective: below it an observer counts as
/// uncovered. Small enough that a poorly covered observer pulls hard.
pub const COVERAGE_EPS: f64 = 1e-2;

/// One segment's reads: `[rows, keys]` f32, the softmax weight observer row `i` pays key `j`
/// of the segment (each row sums to one).
pub struct SegmentReads(Tensor);

impl SegmentReads {
    /// The reads of scaled queries `q: [rows, d]` over keys `k: [keys, d]`, every key visible.
    pub fn new(q: &Tensor, k: &Tensor) -> Result<Self> {
        let (q, k) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?);
        let scores = q.matmul(&k.t()?)?;
        Ok(Self(candle_nn::ops::softmax_last_dim(&scores)?))
    }
}

/// `count` keys `(segment, position)` chosen greedily for coverage of `segments`' observers,
/// sorted. Each segment's position 0 (its attention sink, which the cartridge's slot 0 stands
/// for) is never chosen and counts as covered from the start. Ties go to the earlier key.
pub fn coverage_pick(segments: &[SegmentReads], count: usize) -> Result<Vec<(usize, usize)>> {
    let mut covered = Vec::with_capacity(segments.len());
    let mut taken = Vec::with_capacity(segments.len());
    for SegmentReads(reads) in segments {
        let (_, keys) = reads.dims2()?;
        covered.push(reads.narrow(1, 0, 1)?.squeeze(1)?);
        let mut t = vec![false; keys];
        t[0] = true;
        taken.push(t);
    }
    let available: usize = taken.iter().map(|t| t.len() - 1).sum();
    if count > available {
        return Err(Error::Config(format!(
            "{count} keys to choose, but the segments hold only {available} besides their sinks"
        )));
    }
    let mut chosen = Vec::with_capacity(count);
    while chosen.len() < count {
        let mut gains: Vec<(f32, usize, usize)> = Vec::new();
        for (si, SegmentReads(reads)) in segments.iter().enumerate() {
            let weight = (&covered[si] + COVERAGE_EPS)?.recip()?;
            let gain = weight.unsqueeze(0)?.matmul(reads)?.squeeze(0)?;
            gains.extend(
                gain.to_vec1::<f32>()?
                    .into_iter()
                    .enumerate()
                    .filter(|&(j, _)| !taken[si][j])
                    .map(|(j, g)| (g, si, j)),
            );
        }
        let round = KEYS_PER_ROUND.min(count - chosen.len());
        // Largest gain first; ties (and NaN, which a softmax never yields) in corpus order.
        gains.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        let mut per_segment = vec![Vec::new(); segments.len()];
        for &(_, si, j) in &gains[..round] {
            taken[si][j] = true;
            per_segment[si].push(j as u32);
            chosen.push((si, j));
        }
        for (si, cols) in per_segment.into_iter().enumerate() {
            if cols.is_empty() {
                continue;
            }
            let reads = &segments[si].0;
            let cols = Tensor::new(cols.as_slice(), reads.device())?;
            let gained = reads.index_select(&cols, 1)?.sum(D::Minus1)?;
            covered[si] = (&covered[si] + gained)?;
        }
    }
    chosen.sort_unstable();
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn reads(rows: &[&[f32]]) -> SegmentReads {
        let keys = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        SegmentReads(Tensor::from_vec(flat, (rows.len(), keys), &Device::Cpu).unwrap())
    }

    #[test]
    fn an_uncovered_reader_beats_a_popular_key() {
        // Key 2 gets the most attention on average (0.375), but the fourth reader reads only
        // key 3, which nothing covers yet.
        let seg = reads(&[
            &[0.1, 0.4, 0.5, 0.0],
            &[0.1, 0.4, 0.5, 0.0],
            &[0.1, 0.4, 0.5, 0.0],
            &[0.0, 0.0, 0.0, 1.0],
        ]);
        let picked = coverage_pick(std::slice::from_ref(&seg), 1).unwrap();
        assert_eq!(picked, vec![(0, 3)]);
    }

    #[test]
    fn keys_come_from_the_segment_whose_readers_need_them_and_never_a_sink() {
        // Segment 0's readers are covered by its sink; segment 1's are not.
        let a = || reads(&[&[0.9, 0.05, 0.05], &[0.9, 0.05, 0.05]]);
        let b = || reads(&[&[0.1, 0.8, 0.1], &[0.1, 0.1, 0.8]]);
        assert_eq!(coverage_pick(&[a(), b()], 2).unwrap(), vec![(1, 1), (1, 2)]);
        assert_eq!(
            coverage_pick(&[a(), b()], 4).unwrap(),
            vec![(0, 1), (0, 2), (1, 1), (1, 2)]
        );
        // More keys than there are besides the sinks is refused.
        assert!(coverage_pick(&[a(), b()], 5).is_err());
    }
}
