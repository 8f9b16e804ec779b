//! Training examples from self-study records, the held-out split, and the seeded data order.
//!
//! A record's target at token position `s` is the teacher's distribution of token `s` given
//! `tokens[..s]`, so it is predicted by the logits of row `s - 1`. Records carry no BOS and no
//! system prompt (the cartridge plays that role), and positions start after the prefix: exactly
//! what the runtime does when it serves a cartridge.
//!
//! The order is a pure function of `(seed, step)`: epoch `e` visits the training examples in a
//! permutation drawn from a `StdRng` seeded by `(seed, e)`, and step `s` takes the next
//! `batch_size` entries of that endless stream. A checkpoint therefore only needs the step to
//! continue with exactly the same data.

use cartridge_formats::dataset::Record;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};

/// One training sequence with its targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids (no BOS).
    pub tokens: Vec<u32>,
    /// For each target: the row whose logits predict it (`position - 1`).
    pub rows: Vec<u32>,
    /// For each target: the token that actually follows (the `tokens` objective).
    pub next: Vec<u32>,
    /// `[targets, k]` teacher top-k ids.
    pub topk_ids: Vec<u32>,
    /// `[targets, k]` teacher top-k natural-log probabilities.
    pub topk_logprobs: Vec<f32>,
    /// Width `k` of the top-k rows.
    pub k: usize,
}

impl Example {
    /// From a record, keeping at most `max_len` tokens (targets beyond are dropped). `None` when
    /// no target is left.
    pub fn from_record(r: &Record, max_len: usize, vocab: usize) -> Result<Option<Example>> {
        r.validate(Some(vocab as u32))
            .map_err(|e| Error::Data(format!("record {}: {e}", r.id)))?;
        let len = r.tokens.len().min(max_len);
        let k = r.top_k as usize;
        let mut ex = Example {
            tokens: r.tokens[..len].to_vec(),
            rows: Vec::new(),
            next: Vec::new(),
            topk_ids: Vec::new(),
            topk_logprobs: Vec::new(),
            k,
        };
        for (row, pos) in r.target_positions().enumerate() {
            // `validate` guarantees start >= 1 and spans inside the tokens.
            if pos >= len || pos == 0 {
                continue;
            }
            let Some((ids, lps)) = r.topk_row(row) else {
                return Err(Error::Data(format!(
                    "record {}: top-k row {row} missing",
                    r.id
                )));
            };
            ex.rows.push((pos - 1) as u32);
            ex.next.push(r.tokens[pos]);
            ex.topk_ids.extend_from_slice(ids);
            ex.topk_logprobs.extend_from_slice(lps);
        }
        Ok(if ex.rows.is_empty() { None } else { Some(ex) })
    }

    /// Number of targets.
    pub fn num_targets(&self) -> usize {
        self.rows.len()
    }

    /// The teacher's loss against itself on this example: `-sum_k exp(t_k) t_k` summed over
    /// targets (the floor the distillation loss is compared with); `with_tail` adds each row's
    /// `-r log r` for the mass `r` outside its top-k (`Objective::DistillTail`'s floor).
    pub fn teacher_self_loss(&self, with_tail: bool) -> f64 {
        let per_row = self.k.max(1);
        self.topk_logprobs
            .chunks(per_row)
            .map(|row| {
                let mut loss = 0.0;
                let mut mass = 0.0;
                for &t in row {
                    let t = f64::from(t);
                    if t.is_finite() {
                        loss -= t.exp() * t;
                        mass += t.exp();
                    }
                }
                let r = 1.0 - mass;
                if with_tail && r > 0.0 {
                    loss -= r * r.ln();
                }
                loss
            })
            .sum()
    }
}

/// Text that sits between a soft prompt and every conversation: a corpus summary the model wrote
/// itself (the SoftPromptComp recipe). The soft prompt is trained with it in place and serves with
/// it in place, as the system message.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptSummary {
    /// The summary text (stored in the `.cart`).
    pub text: String,
    /// Its token ids as the runtime places them: the chat template's system turn holding `text`.
    pub ids: Vec<u32>,
}

impl Example {
    /// This example with `ids` in front (not targets): row indices shift by their length.
    pub fn after(&self, ids: &[u32]) -> Example {
        let shift = ids.len() as u32;
        let mut tokens = ids.to_vec();
        tokens.extend_from_slice(&self.tokens);
        Example {
            tokens,
            rows: self.rows.iter().map(|r| r + shift).collect(),
            ..self.clone()
        }
    }
}

/// Examples of all records (in dataset order), dropping those without targets.
pub fn prepare(records: &[Record], max_len: usize, vocab: usize) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        if let Some(ex) = Example::from_record(r, max_len, vocab)? {
            out.push(ex);
        }
    }
    Ok(out)
}

fn mix(seed: u64, salt: u64) -> u64 {
    // SplitMix64 finaliser: nearby (seed, salt) pairs give unrelated streams.
    let mut z = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Split `n` examples into `(train, held_out)` index lists: `held_out` examples drawn by the
/// seed, at most `n - 1` so something is left to train on.
pub fn split(n: usize, held_out: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(mix(seed, u64::MAX)));
    let h = held_out.min(n.saturating_sub(1));
    let mut eval = idx[..h].to_vec();
    let mut train = idx[h..].to_vec();
    eval.sort_unstable();
    train.sort_unstable();
    (train, eval)
}

/// The order of epoch `epoch` over `n` training examples.
pub fn epoch_order(n: usize, epoch: u64, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(mix(seed, epoch)));
    idx
}

/// The training-example indices (into `0..n`) of optimiser step `step`.
pub fn step_indices(step: usize, batch_size: usize, n: usize, seed: u64) -> Vec<usize> {
    let start = step * batch_size;
    let mut out = Vec::with_capacity(batch_size);
    let mut cached: Option<(u64, Vec<usize>)> = None;
    for c in start..start + batch_size {
        let epoch = (c / n) as u64;
        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            cached = Some((epoch, epoch_order(n, epoch, seed)));
        }
        if let Some((_, order)) = &cached {
            out.push(order[c % n]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_stream_visits_each_example_once_per_epoch() {
        let n = 7;
        let mut seen: Vec<usize> = (0..7).flat_map(|s| step_indices(s, 2, n, 9)).collect();
        assert_eq!(seen.len(), 14);
        let first: Vec<usize> = seen.drain(..7).collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        assert_ne!(first, (0..7).collect::<Vec<_>>(), "not shuffled");
        assert_eq!(step_indices(3, 2, n, 9), step_indices(3, 2, n, 9));
        assert_ne!(epoch_order(50, 0, 1), epoch_order(50, 0, 2));
    }

    #[test]
    fn split_is_disjoint_and_keeps_training_data() {
        let (t, e) = split(10, 3, 5);
        assert_eq!((t.len(), e.len()), (7, 3));
        assert!(e.iter().all(|i| !t.contains(i)));
        let (t, e) = split(2, 5, 5);
        assert_eq!((t.len(), e.len()), (1, 1));
    }
}
