//! Trainable parameters: a KV cartridge (per layer K and V, `[kv_heads, p, head_dim]`, the first
//! `frozen_tokens` slots held constant) or a soft prompt (`[n, hidden]` input embeddings).
//!
//! Frozen slots are plain tensors concatenated in front of the trainable `Var`s on every forward:
//! they carry no gradient and the optimiser never sees them, so they cannot drift (the reference
//! trainer's attention-sink token, DESIGN.md §5).

use candle_core::{DType, Tensor, Var};
use cartridge_runtime::{PrefixKv, PrefixStack};

use crate::error::{Error, Result};

/// A KV cartridge under training.
#[derive(Debug, Clone)]
pub struct KvParams {
    /// Per layer `(k, v)` of the frozen slots `0..frozen_tokens`; empty when nothing is frozen.
    frozen: Vec<(Tensor, Tensor)>,
    /// Per layer `(k, v)` of the trainable slots `frozen_tokens..p`.
    vars: Vec<(Var, Var)>,
    frozen_tokens: usize,
    tokens: usize,
    /// The initial cartridge's per-slot logit bias, if it has one: a constant, carried into
    /// every forward and into the written cartridge, never trained.
    bias: Option<Vec<Tensor>>,
}

impl KvParams {
    /// Split an initial cartridge into frozen slots and trainable `Var`s (copies; f32 stays f32).
    pub fn new(init: &PrefixKv, frozen_tokens: usize) -> Result<Self> {
        let p = init.len();
        if frozen_tokens >= p {
            return Err(Error::Config(format!(
                "{frozen_tokens} frozen tokens leave nothing to train in a {p}-token cartridge"
            )));
        }
        let mut frozen = Vec::new();
        let mut vars = Vec::with_capacity(init.num_layers());
        for (k, v) in init.layers() {
            if frozen_tokens > 0 {
                frozen.push((
                    k.narrow(1, 0, frozen_tokens)?.contiguous()?,
                    v.narrow(1, 0, frozen_tokens)?.contiguous()?,
                ));
            }
            let n = p - frozen_tokens;
            vars.push((
                Var::from_tensor(&k.narrow(1, frozen_tokens, n)?.contiguous()?)?,
                Var::from_tensor(&v.narrow(1, frozen_tokens, n)?.contiguous()?)?,
            ));
        }
        Ok(Self {
            frozen,
            vars,
            frozen_tokens,
            tokens: p,
            bias: init.bias().map(<[Tensor]>::to_vec),
        })
    }

    /// The whole cartridge (frozen ++ trainable), connected to the `Var`s for backward.
    pub fn prefix(&self) -> Result<PrefixKv> {
        let layers = self
            .vars
            .iter()
            .enumerate()
            .map(|(l, (k, v))| match self.frozen.get(l) {
                // `.contiguous()`: a cat on dim 1 can give a layout batched matmul rejects
                // (DESIGN.md §3).
                Some((fk, fv)) => Ok((
                    Tensor::cat(&[fk, k.as_tensor()], 1)?.contiguous()?,
                    Tensor::cat(&[fv, v.as_tensor()], 1)?.contiguous()?,
                )),
                None => Ok((k.as_tensor().clone(), v.as_tensor().clone())),
            })
            .collect::<Result<Vec<_>>>()?;
        let prefix = PrefixKv::new(layers)?;
        Ok(match &self.bias {
            Some(bias) => prefix.with_bias(bias.clone())?,
            None => prefix,
        })
    }

    /// Number of slots `p` (frozen included).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Number of frozen leading slots.
    pub fn frozen_tokens(&self) -> usize {
        self.frozen_tokens
    }

    /// The frozen tensors, layer by layer, K then V.
    pub fn frozen_tensors(&self) -> Vec<Tensor> {
        self.frozen
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.clone()])
            .collect()
    }

    /// Replace the frozen tensors (checkpoint restore), same order as [`Self::frozen_tensors`].
    pub fn set_frozen(&mut self, tensors: &[Tensor]) -> Result<()> {
        if tensors.len() != 2 * self.frozen.len() {
            return Err(Error::Data(format!(
                "{} frozen tensors for {} layers",
                tensors.len(),
                self.frozen.len()
            )));
        }
        for (l, (k, v)) in self.frozen.iter_mut().enumerate() {
            let (nk, nv) = (&tensors[2 * l], &tensors[2 * l + 1]);
            if nk.dims() != k.dims() || nv.dims() != v.dims() {
                return Err(Error::Data(format!(
                    "frozen layer {l}: {:?} does not match {:?}",
                    nk.dims(),
                    k.dims()
                )));
            }
            *k = nk.clone();
            *v = nv.clone();
        }
        Ok(())
    }
}

/// A soft prompt under training.
#[derive(Debug, Clone)]
pub struct SoftParams {
    var: Var,
}

impl SoftParams {
    /// Train `init: [n, hidden]`.
    pub fn new(init: &Tensor) -> Result<Self> {
        init.dims2()?;
        Ok(Self {
            var: Var::from_tensor(&init.contiguous()?)?,
        })
    }

    /// The embeddings `[n, hidden]`.
    pub fn embeddings(&self) -> &Tensor {
        self.var.as_tensor()
    }
}

/// What a run trains.
#[derive(Debug, Clone)]
pub enum Params {
    /// A KV cartridge.
    Kv(KvParams),
    /// A soft prompt.
    Soft(SoftParams),
}

impl Params {
    /// The prefix stack a forward puts in front of the training tokens.
    pub fn stack(&self) -> Result<PrefixStack> {
        Ok(match self {
            Params::Kv(kv) => PrefixStack::new().with_cartridge(kv.prefix()?),
            Params::Soft(s) => PrefixStack::new().with_soft_prompt(s.embeddings().clone()),
        })
    }

    /// [`Self::stack`] cast to `dtype`, the model's compute precision: the parameters stay f32
    /// (the master copy the optimiser updates) and the cast is part of the graph, so gradients
    /// come back to them in f32.
    pub fn stack_in(&self, dtype: DType) -> Result<PrefixStack> {
        let cast = |t: &Tensor| -> Result<Tensor> {
            Ok(if t.dtype() == dtype {
                t.clone()
            } else {
                t.to_dtype(dtype)?
            })
        };
        Ok(match self {
            Params::Kv(kv) => {
                let layers = kv
                    .prefix()?
                    .layers()
                    .iter()
                    .map(|(k, v)| Ok((cast(k)?, cast(v)?)))
                    .collect::<Result<Vec<_>>>()?;
                PrefixStack::new().with_cartridge(PrefixKv::new(layers)?)
            }
            Params::Soft(s) => PrefixStack::new().with_soft_prompt(cast(s.embeddings())?),
        })
    }

    /// The trainable variables in a fixed order (per layer K then V; or the one embedding).
    pub fn vars(&self) -> Vec<Var> {
        match self {
            Params::Kv(kv) => kv
                .vars
                .iter()
                .flat_map(|(k, v)| [k.clone(), v.clone()])
                .collect(),
            Params::Soft(s) => vec![s.var.clone()],
        }
    }

    /// Total prefix length the training tokens follow (their first position).
    pub fn prefix_len(&self) -> usize {
        match self {
            Params::Kv(kv) => kv.tokens,
            Params::Soft(s) => s.var.dim(0).unwrap_or(0),
        }
    }

    /// Number of trainable scalars.
    pub fn trainable_scalars(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn kv(p: usize) -> PrefixKv {
        let layers = (0..2)
            .map(|l| {
                let k = Tensor::arange(0f32, (2 * p * 3) as f32, &Device::Cpu)
                    .unwrap()
                    .reshape((2, p, 3))
                    .unwrap();
                let v = (k.clone() + l as f64).unwrap();
                (k, v)
            })
            .collect();
        PrefixKv::new(layers).unwrap()
    }

    #[test]
    fn frozen_and_trainable_reassemble_the_initial_cartridge() {
        let init = kv(4);
        for frozen in [0, 1, 3] {
            let p = KvParams::new(&init, frozen).unwrap();
            let back = p.prefix().unwrap();
            for (a, b) in back.layers().iter().zip(init.layers()) {
                let d = (&a.0 - &b.0).unwrap().abs().unwrap().sum_all().unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            }
            let n: usize = Params::Kv(p).vars().iter().map(|v| v.elem_count()).sum();
            assert_eq!(n, 2 * 2 * 2 * (4 - frozen) * 3);
        }
        assert!(KvParams::new(&init, 4).is_err());
    }
}
