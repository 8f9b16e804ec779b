//! Comparing a generated answer with the reference: exact match and contains-match after
//! SQuAD-style normalisation (Rajpurkar et al. 2016: lower case, punctuation and the articles
//! "a", "an", "the" removed, whitespace collapsed), and chrF (Popović 2015, "chrF: character n-gram
//! F-score for automatic MT evaluation").

use std::collections::HashMap;

/// Largest character n-gram order of chrF.
pub const CHRF_ORDER: usize = 6;
/// chrF's `beta`: recall weighs `beta` times as much as precision (chrF2).
pub const CHRF_BETA: f64 = 2.0;

/// The answer's words after normalisation.
pub fn normalized_words(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    // Punctuation is dropped, not turned into a space, so that "1,900" equals "1900".
    let kept: String = lower
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace())
        .collect();
    kept.split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(str::to_string)
        .collect()
}

/// Whether the normalised texts are equal.
pub fn exact_match(generated: &str, reference: &str) -> bool {
    normalized_words(generated) == normalized_words(reference)
}

/// Whether the normalised reference appears in the normalised generation as whole words (so that
/// "9" is not found in "1903").
pub fn contains_match(generated: &str, reference: &str) -> bool {
    let (g, r) = (normalized_words(generated), normalized_words(reference));
    if r.is_empty() {
        return g.is_empty();
    }
    g.windows(r.len()).any(|w| w == r.as_slice())
}

/// Counts of the character n-grams of order `n` (whitespace removed, as sacreBLEU does).
fn ngrams(chars: &[char], n: usize) -> HashMap<&[char], usize> {
    let mut m = HashMap::new();
    for g in chars.windows(n) {
        *m.entry(g).or_insert(0) += 1;
    }
    m
}

/// chrF2 of `generated` against `reference`, from 0 to 100.
///
/// For each order `n = 1..=6` with n-grams on both sides: precision `P_n` and recall `R_n` of the
/// clipped n-gram matches, and `F_n = (1 + b^2) P_n R_n / (b^2 P_n + R_n)` with `b = 2`; the score
/// is the mean of `F_n` over those orders (sacreBLEU 2's treatment of orders a short text lacks),
/// times 100. Case matters; whitespace does not.
pub fn chrf(generated: &str, reference: &str) -> f64 {
    let hyp: Vec<char> = generated.chars().filter(|c| !c.is_whitespace()).collect();
    let refr: Vec<char> = reference.chars().filter(|c| !c.is_whitespace()).collect();
    let b2 = CHRF_BETA * CHRF_BETA;
    let (mut sum, mut orders) = (0.0, 0usize);
    for n in 1..=CHRF_ORDER {
        let (h, r) = (ngrams(&hyp, n), ngrams(&refr, n));
        let (nh, nr): (usize, usize) = (h.values().sum(), r.values().sum());
        if nh == 0 || nr == 0 {
            continue;
        }
        let matches: usize = h
            .iter()
            .map(|(g, &c)| c.min(r.get(g).copied().unwrap_or(0)))
            .sum();
        let (p, rc) = (matches as f64 / nh as f64, matches as f64 / nr as f64);
        let denom = b2 * p + rc;
        sum += if denom > 0.0 {
            (1.0 + b2) * p * rc / denom
        } else {
            0.0
        };
        orders += 1;
    }
    if orders == 0 {
        return if hyp == refr { 100.0 } else { 0.0 };
    }
    100.0 * sum / orders as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chrf_matches_hand_computed_values() {
        // "ab" vs "abcd": n=1: P 2/2, R 2/4 -> F = 5 * 0.5 / (4 + 0.5) = 5/9;
        // n=2: P 1/1, R 1/3 -> F = 5 * (1/3) / (4 + 1/3) = 5/13; n >= 3: no hypothesis n-grams.
        let want = 100.0 * (5.0 / 9.0 + 5.0 / 13.0) / 2.0;
        assert!(
            (chrf("ab", "abcd") - want).abs() < 1e-9,
            "{}",
            chrf("ab", "abcd")
        );
        // "abc" vs "abd": F1 = 2/3, F2 = 1/2, F3 = 0 (no match): mean 7/18.
        assert!((chrf("abc", "abd") - 100.0 * 7.0 / 18.0).abs() < 1e-9);
        // Clipping: "aaa" vs "a": n=1 matches min(3, 1) = 1: P 1/3, R 1 -> F = 5/3 / (4/3 + 1) = 5/7.
        assert!((chrf("aaa", "a") - 100.0 * 5.0 / 7.0).abs() < 1e-9);
        assert_eq!(chrf("the Gulf of Lusk", "theGulfofLusk"), 100.0);
        assert_eq!(chrf("xyz", "abc"), 0.0);
        assert_eq!(chrf("", "abc"), 0.0);
        // Recall weighs more than precision: a longer answer that contains the reference scores
        // higher than a shorter one that misses part of it.
        assert!(chrf("in 1874 it was", "1874") > chrf("18", "1874"));
    }

    #[test]
    fn matches_normalise_case_punctuation_and_articles() {
        assert!(exact_match("The Gulf of Lusk.", "the gulf of lusk"));
        assert!(exact_match("1900", "1,900"));
        assert!(!exact_match("In 1874.", "1874"));
        assert!(contains_match("It was adopted in 1874.", "1874"));
        assert!(contains_match(
            "Quenmar lies in the Gulf of Lusk!",
            "the Gulf of Lusk"
        ));
        assert!(!contains_match("It opened in 1903.", "9"));
        assert!(!contains_match("", "9"));
    }
}
