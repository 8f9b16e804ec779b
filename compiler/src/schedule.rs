//! Learning-rate schedules: constant, or linear warmup then cosine decay to a floor.

use serde::{Deserialize, Serialize};

/// How the learning rate moves over the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Schedule {
    /// The base rate at every step (the reference trainer's default).
    #[default]
    Constant,
    /// Linear warmup from 0 over `warmup_steps`, then a half cosine down to `min_ratio * base`.
    WarmupCosine {
        /// Steps of linear warmup.
        warmup_steps: usize,
        /// Final rate as a fraction of the base rate.
        min_ratio: f64,
    },
}

impl Schedule {
    /// The rate of optimiser step `step` (0-based) out of `total`.
    pub fn lr(&self, base: f64, step: usize, total: usize) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::WarmupCosine {
                warmup_steps,
                min_ratio,
            } => {
                if step < warmup_steps {
                    return base * (step + 1) as f64 / warmup_steps as f64;
                }
                let span = total.saturating_sub(warmup_steps).max(1);
                let frac = ((step - warmup_steps) as f64 / span as f64).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * frac).cos());
                base * (min_ratio + (1.0 - min_ratio) * cos)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::WarmupCosine {
            warmup_steps: 4,
            min_ratio: 0.1,
        };
        assert!((s.lr(1.0, 0, 20) - 0.25).abs() < 1e-12);
        assert!((s.lr(1.0, 3, 20) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 4, 20) - 1.0).abs() < 1e-12);
        assert!(s.lr(1.0, 12, 20) < 0.6 && s.lr(1.0, 12, 20) > 0.5);
        assert!((s.lr(1.0, 20, 20) - 0.1).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(2e-2, 7, 9), 2e-2);
    }
}
