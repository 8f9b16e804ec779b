//! Adam (Kingma & Ba 2015) with weight decay 0, the reference trainer's optimiser (DESIGN.md §5).
//!
//! The update is candle-nn 0.11's `AdamW` (PyTorch's formulation) op for op, so losses match a run
//! driven by `candle_nn::AdamW` bit for bit; we keep our own copy because `AdamW` does not expose
//! its moments, which a checkpoint must save for an exact resume. With weight decay 0 the decoupled
//! decay factor is exactly 1 and is left out.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Adam hyper-parameters (the learning rate comes per step from the schedule).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// Adam state over a fixed list of variables.
#[derive(Debug)]
pub struct Adam {
    params: AdamParams,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
}

impl Adam {
    /// Fresh state (zero moments, step 0) for `vars`.
    pub fn new(vars: Vec<Var>, params: AdamParams) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| Ok(v.as_tensor().zeros_like()?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            v: m.clone(),
            m,
            vars,
            step: 0,
        })
    }

    /// Number of updates applied so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// First and second moments, in variable order.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restore moments and step count (checkpoint resume).
    pub fn restore(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, step: usize) -> Result<()> {
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            return Err(Error::Data(format!(
                "optimiser state for {} variables, {} expected",
                m.len(),
                self.vars.len()
            )));
        }
        for ((var, m), v) in self.vars.iter().zip(&m).zip(&v) {
            if m.dims() != var.dims() || v.dims() != var.dims() {
                return Err(Error::Data(format!(
                    "optimiser moment {:?} for a variable {:?}",
                    m.dims(),
                    var.dims()
                )));
            }
        }
        self.m = m;
        self.v = v;
        self.step = step;
        Ok(())
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to variable `i` (`None`: untouched,
    /// as candle's `AdamW` leaves a variable without gradient alone).
    pub fn update(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::Data(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        self.step += 1;
        let AdamParams { beta1, beta2, eps } = self.params;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let scale_m = 1f64 / (1f64 - beta1.powi(t));
        let scale_v = 1f64 / (1f64 - beta2.powi(t));
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let theta = self.vars[i].as_tensor();
            let next_m = ((&self.m[i] * beta1)? + (g * (1.0 - beta1))?)?;
            let next_v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let adjusted = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let next_theta = (theta - (adjusted * lr)?)?;
            self.vars[i].set(&next_theta)?;
            self.m[i] = next_m;
            self.v[i] = next_v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    /// Same bytes as candle-nn's AdamW with weight decay 0 over a few steps.
    #[test]
    fn matches_candle_adamw_bit_for_bit() {
        let dev = Device::Cpu;
        let init = Tensor::new(&[[0.3f32, -1.2, 2.0], [0.01, 5.0, -0.7]], &dev).unwrap();
        let a = Var::from_tensor(&init).unwrap();
        let b = Var::from_tensor(&init).unwrap();
        let mut ours = Adam::new(vec![a.clone()], AdamParams::default()).unwrap();
        let mut theirs = AdamW::new(
            vec![b.clone()],
            ParamsAdamW {
                lr: 2e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
        )
        .unwrap();
        for _ in 0..5 {
            let la = (a.as_tensor().sqr().unwrap() * a.as_tensor().sin().unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let ga = la.backward().unwrap();
            ours.update(&[ga.get(a.as_tensor()).cloned()], 2e-2)
                .unwrap();
            let lb = (b.as_tensor().sqr().unwrap() * b.as_tensor().sin().unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            theirs.step(&lb.backward().unwrap()).unwrap();
        }
        let x = a
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = b
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_ne!(x, init.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}
