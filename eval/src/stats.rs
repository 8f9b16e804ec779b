//! How sure an accuracy figure is. With tens of questions, one answer moves a share by a few
//! points, so shares carry a 95% interval and two modes answering the same questions are compared
//! pair by pair (which questions each gets right), not by their totals alone.

use serde::Serialize;

/// The two-sided 95% quantile of the standard normal distribution.
const Z95: f64 = 1.959_963_984_540_054;

/// The 95% Wilson score interval of a share of `hits` out of `n`; `(0, 1)` when `n` is 0.
///
/// Wilson rather than `p ± z·se`: it stays inside `[0, 1]` and does not collapse to a point at
/// 0 or `n` hits, which small question sets reach.
pub fn wilson_interval(hits: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (hits.min(n) as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Two modes' right and wrong answers on the same questions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct PairedComparison {
    /// Questions compared.
    pub questions: usize,
    /// Right in both.
    pub both: usize,
    /// Right in this mode only.
    pub only_this: usize,
    /// Right in the other mode only.
    pub only_other: usize,
    /// This mode's share minus the other's.
    pub difference: f64,
    /// 95% interval of the difference (Agresti-Min: a Wald interval on the paired table with half
    /// a count added to each cell, which keeps its coverage near 95% at small counts).
    pub difference_interval: (f64, f64),
    /// Exact two-sided McNemar test: the chance of a split of the discordant questions at least
    /// this uneven if both modes were equally good.
    pub p_value: f64,
}

/// Compare `this` with `other`, question by question (`None` unless both have the same, nonzero
/// number of answers).
pub fn paired(this: &[bool], other: &[bool]) -> Option<PairedComparison> {
    if this.len() != other.len() || this.is_empty() {
        return None;
    }
    let count =
        |f: fn(bool, bool) -> bool| this.iter().zip(other).filter(|&(&a, &b)| f(a, b)).count();
    let both = count(|a, b| a && b);
    let only_this = count(|a, b| a && !b);
    let only_other = count(|a, b| !a && b);
    let n = this.len() as f64;
    let difference = (only_this as f64 - only_other as f64) / n;

    let (b, c, m) = (only_this as f64 + 0.5, only_other as f64 + 0.5, n + 2.0);
    let adjusted = (b - c) / m;
    let se = ((b + c) - (b - c) * (b - c) / m).max(0.0).sqrt() / m;
    let difference_interval = (
        (adjusted - Z95 * se).max(-1.0),
        (adjusted + Z95 * se).min(1.0),
    );
    Some(PairedComparison {
        questions: this.len(),
        both,
        only_this,
        only_other,
        difference,
        difference_interval,
        p_value: mcnemar_exact(only_this, only_other),
    })
}

/// `2 · P(X <= min(b, c))` for `X ~ Binomial(b + c, 1/2)`, at most 1; 1 when there is no
/// discordant question. Summed in log space so that thousands of questions do not underflow.
fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let m = b + c;
    if m == 0 {
        return 1.0;
    }
    let mut ln_pmf = m as f64 * 0.5f64.ln();
    let mut tail = 0.0;
    for k in 0..=b.min(c) {
        if k > 0 {
            ln_pmf += ((m - k + 1) as f64).ln() - (k as f64).ln();
        }
        tail += ln_pmf.exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn wilson_interval_matches_published_values() {
        // Newcombe (1998), Table I: 81/263 -> 0.2553 to 0.3662; 15/148 -> 0.0624 to 0.1605.
        let (lo, hi) = wilson_interval(81, 263);
        assert!(
            close(lo, 0.2553, 5e-5) && close(hi, 0.3662, 5e-5),
            "{lo} {hi}"
        );
        let (lo, hi) = wilson_interval(15, 148);
        assert!(
            close(lo, 0.0624, 5e-5) && close(hi, 0.1605, 5e-5),
            "{lo} {hi}"
        );
        // At the edges it still has width, and stays in [0, 1].
        let (lo, hi) = wilson_interval(0, 40);
        assert_eq!(lo, 0.0);
        assert!(hi > 0.08 && hi < 0.09, "{hi}");
        let (lo, hi) = wilson_interval(40, 40);
        assert!(lo > 0.91 && lo < 0.92 && hi == 1.0, "{lo}");
        assert_eq!(wilson_interval(0, 0), (0.0, 1.0));
    }

    #[test]
    fn mcnemar_is_the_binomial_tail_of_the_discordant_split() {
        // 2 against 7 discordant: 2 * (1 + 9 + 36) / 512.
        assert!(close(mcnemar_exact(2, 7), 92.0 / 512.0, 1e-12));
        assert!(close(mcnemar_exact(7, 2), 92.0 / 512.0, 1e-12));
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(3, 3), 1.0);
        assert!(close(mcnemar_exact(0, 6), 2.0 / 64.0, 1e-12));
        // Large counts stay finite and tiny where the split is lopsided.
        let p = mcnemar_exact(100, 1100);
        assert!(p > 0.0 && p < 1e-100, "{p}");
        assert!(close(mcnemar_exact(600, 600), 1.0, 1e-12));
    }

    #[test]
    fn paired_comparison_counts_each_kind_of_question() {
        let this = [true, true, false, false, true, false];
        let other = [true, false, true, false, false, true];
        let c = paired(&this, &other).expect("same length");
        assert_eq!(
            (c.questions, c.both, c.only_this, c.only_other),
            (6, 1, 2, 2)
        );
        assert_eq!(c.difference, 0.0);
        let (lo, hi) = c.difference_interval;
        assert!(lo < 0.0 && hi > 0.0 && close(lo, -hi, 1e-12));
        assert_eq!(c.p_value, 1.0);
        assert!(paired(&this, &other[..5]).is_none());
        assert!(paired(&[], &[]).is_none());
    }

    #[test]
    fn a_clear_difference_excludes_zero() {
        // 30 questions right only in this mode, none only in the other, 70 wrong in both.
        let this: Vec<bool> = (0..100).map(|i| i < 30).collect();
        let other = vec![false; 100];
        let c = paired(&this, &other).expect("same length");
        assert!(close(c.difference, 0.3, 1e-12));
        assert!(
            c.difference_interval.0 > 0.15,
            "{:?}",
            c.difference_interval
        );
        assert!(c.p_value < 1e-8);
    }
}
