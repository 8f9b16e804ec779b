//! The prefix stack: KV cartridges, then soft prompts, in front of the user's tokens
//! (Eyuboglu et al. 2025, "Cartridges", §3 and DESIGN.md §3/§6; soft prompts after Lester et al. 2021,
//! "The Power of Scale for Parameter-Efficient Prompt Tuning").
//!
//! # Positions
//! A cartridge stores, per layer, keys **after** RoPE and values, `[num_kv_heads, p, head_dim]`.
//! By default ([`Composition::Overlap`]) the runtime never re-rotates stored keys: a key keeps the
//! position it was computed (or trained) at. A cartridge trained on its own carries positions
//! `0..p-1`. Composing cartridges concatenates them along the sequence axis in the order given, so a
//! composed second cartridge still carries *its own* positions (`0..p2-1` if trained alone) — that
//! is the paper's composition, and what `cartridge compose` writes. [`Composition::Follow`] is the
//! alternative: see there. A cartridge
//! made from the KV of a corpus part computed *after* an earlier part (positions `p1..p1+p2-1`,
//! see [`crate::models::Transformer::prefix_kv`]) carries those positions instead, and then the
//! composition is exactly the KV of the concatenated text. Since every key carries its own
//! rotation and every query sees every prefix slot, the order of slots inside the prefix does not
//! change the user's logits (only the total length `P` does); the order still matters for
//! soft prompts, which attend causally to what precedes them.
//!
//! Soft prompts are input embeddings `[n, hidden]`; they are ordinary causal tokens placed after
//! all cartridges, at positions `P_c..P_c+n-1` (`P_c` = total cartridge length). Because they see only
//! the cartridges and themselves, the stack resolves them once into KV ([`PrefixStack::resolve`])
//! shared by every sequence of a batch; on the training path that resolution keeps the graph, so
//! gradients reach the soft-prompt embeddings through their K/V.
//!
//! The user's tokens start at position `P` = total prefix length (cartridge slots + soft-prompt
//! tokens). Every query sees every prefix slot.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::models::Transformer;
use crate::ops::Path;

/// Per-layer keys (post-RoPE) and values of `p` prefix slots, each `[num_kv_heads, p, head_dim]`,
/// and optionally a per-slot attention logit bias `[num_kv_heads, p]` (f32) per layer.
///
/// This is what a cartridge is at run time; the tensors may be candle `Var`s (training). The bias
/// (attention matching, Zweiger et al. 2026, "Fast KV Compaction via Attention Matching") is
/// added to every query's score for that slot: a slot with bias `b` weighs as `e^b` copies of its
/// key would, so a few keys can carry the attention mass of the many they stand for. It is a
/// constant, never trained.
#[derive(Debug, Clone)]
pub struct PrefixKv {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    bias: Option<Vec<Tensor>>,
}

/// One layer of a prefix as attention reads it.
#[derive(Debug, Clone, Copy)]
pub struct PrefixLayer<'a> {
    /// Keys `[num_kv_heads, p, head_dim]`, post-RoPE.
    pub k: &'a Tensor,
    /// Values, same shape.
    pub v: &'a Tensor,
    /// Logit bias per slot `[num_kv_heads, p]`, f32, if any.
    pub bias: Option<&'a Tensor>,
}

impl PrefixLayer<'_> {
    /// The bias as `[kv_heads * p]` f32 values for a CPU kernel (`what` names it in errors),
    /// empty when there is none or the prefix has no slots.
    pub(crate) fn bias_values(&self, kv_heads: usize, what: &str) -> Result<Vec<f32>> {
        let p = self.k.dim(1)?;
        match self.bias {
            Some(bias) if p > 0 => {
                if bias.dims() != [kv_heads, p] {
                    return Err(Error::Msg(format!(
                        "{what}: prefix bias {:?} does not fit {kv_heads} KV heads of {p} slots",
                        bias.dims()
                    )));
                }
                Ok(bias
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            }
            _ => Ok(Vec::new()),
        }
    }
}

impl PrefixKv {
    /// Build from per-layer `(k, v)`, each `[num_kv_heads, p, head_dim]` with the same `p`.
    pub fn new(layers: Vec<(Tensor, Tensor)>) -> Result<Self> {
        let Some((k0, _)) = layers.first() else {
            return Err(Error::Msg("a prefix needs at least one layer".into()));
        };
        let (_, len, _) = k0.dims3()?;
        for (i, (k, v)) in layers.iter().enumerate() {
            if k.dims() != v.dims() || k.rank() != 3 || k.dim(1)? != len {
                return Err(Error::Msg(format!(
                    "prefix layer {i}: k {:?} and v {:?} must both be [kv_heads, {len}, head_dim]",
                    k.dims(),
                    v.dims()
                )));
            }
        }
        Ok(Self {
            layers,
            len,
            bias: None,
        })
    }

    /// The same prefix with a logit bias per layer, each `[num_kv_heads, p]` (stored as f32, on
    /// the keys' device).
    pub fn with_bias(mut self, bias: Vec<Tensor>) -> Result<Self> {
        if bias.len() != self.layers.len() {
            return Err(Error::Msg(format!(
                "prefix bias for {} layers, the prefix has {}",
                bias.len(),
                self.layers.len()
            )));
        }
        let mut out = Vec::with_capacity(bias.len());
        for (i, (b, (k, _))) in bias.iter().zip(&self.layers).enumerate() {
            let (h, len, _) = k.dims3()?;
            if b.dims() != [h, len] {
                return Err(Error::Msg(format!(
                    "prefix layer {i}: bias {:?} must be [{h}, {len}]",
                    b.dims()
                )));
            }
            out.push(b.to_dtype(candle_core::DType::F32)?.to_device(k.device())?);
        }
        self.bias = Some(out);
        Ok(self)
    }

    /// The per-layer logit bias, if the prefix has one.
    pub fn bias(&self) -> Option<&[Tensor]> {
        self.bias.as_deref()
    }

    /// The bias of every layer, zeros where the prefix has none.
    fn bias_or_zeros(&self) -> Result<Vec<Tensor>> {
        match &self.bias {
            Some(b) => Ok(b.clone()),
            None => self
                .layers
                .iter()
                .map(|(k, _)| {
                    let (h, len, _) = k.dims3()?;
                    Ok(Tensor::zeros(
                        (h, len),
                        candle_core::DType::F32,
                        k.device(),
                    )?)
                })
                .collect(),
        }
    }

    /// Layer `i` as attention reads it: keys, values and bias.
    pub fn attention_layer(&self, i: usize) -> Option<PrefixLayer<'_>> {
        self.layers.get(i).map(|(k, v)| PrefixLayer {
            k,
            v,
            bias: self.bias.as_ref().map(|b| &b[i]),
        })
    }

    /// Applies `f` to every layer's `(k, v)`, keeping the bias (moved to the keys' device).
    fn map_layers(&self, f: impl Fn(&Tensor, &Tensor) -> Result<(Tensor, Tensor)>) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| f(k, v))
            .collect::<Result<Vec<_>>>()?;
        let out = PrefixKv::new(layers)?;
        match &self.bias {
            Some(b) => out.with_bias(b.clone()),
            None => Ok(out),
        }
    }

    /// Number of prefix slots `p`.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Keys and values of layer `i`.
    pub fn layer(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(i).map(|(k, v)| (k, v))
    }

    /// All layers.
    pub fn layers(&self) -> &[(Tensor, Tensor)] {
        &self.layers
    }

    /// Concatenate along the sequence axis, in order (composition). Keys are not re-rotated.
    pub fn concat(parts: &[&PrefixKv]) -> Result<PrefixKv> {
        let Some(first) = parts.first() else {
            return Err(Error::Msg("nothing to concatenate".into()));
        };
        if parts.len() == 1 {
            return Ok((*first).clone());
        }
        let n = first.num_layers();
        if parts.iter().any(|p| p.num_layers() != n) {
            return Err(Error::Msg(
                "cannot compose prefixes with different layer counts".into(),
            ));
        }
        let mut layers = Vec::with_capacity(n);
        for i in 0..n {
            let ks: Vec<&Tensor> = parts.iter().map(|p| &p.layers[i].0).collect();
            let vs: Vec<&Tensor> = parts.iter().map(|p| &p.layers[i].1).collect();
            // `.contiguous()`: cat on a non-zero dim can yield a layout batched matmul rejects
            // (DESIGN.md §3).
            layers.push((
                Tensor::cat(&ks, 1)?.contiguous()?,
                Tensor::cat(&vs, 1)?.contiguous()?,
            ));
        }
        let out = PrefixKv::new(layers)?;
        if parts.iter().all(|p| p.bias.is_none()) {
            return Ok(out);
        }
        // A part without a bias has bias 0: its slots weigh as they always did.
        let biases = parts
            .iter()
            .map(|p| p.bias_or_zeros())
            .collect::<Result<Vec<_>>>()?;
        let bias = (0..n)
            .map(|i| {
                let bs: Vec<&Tensor> = biases.iter().map(|b| &b[i]).collect();
                Ok(Tensor::cat(&bs, 1)?.contiguous()?)
            })
            .collect::<Result<Vec<_>>>()?;
        out.with_bias(bias)
    }

    /// The same prefix in another dtype (e.g. an f32 cartridge for a bf16 model).
    /// The bias stays f32.
    pub fn to_dtype(&self, dtype: candle_core::DType) -> Result<PrefixKv> {
        self.map_layers(|k, v| Ok((k.to_dtype(dtype)?, v.to_dtype(dtype)?)))
    }

    /// The same prefix on another device (a copy).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<PrefixKv> {
        self.map_layers(|k, v| Ok((k.to_device(device)?, v.to_device(device)?)))
    }

    /// Slots `start..start + len` of every layer.
    pub fn narrow(&self, start: usize, len: usize) -> Result<PrefixKv> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.narrow(1, start, len)?, v.narrow(1, start, len)?)))
            .collect::<Result<Vec<_>>>()?;
        let out = PrefixKv::new(layers)?;
        match &self.bias {
            Some(b) => out.with_bias(
                b.iter()
                    .map(|b| Ok(b.narrow(1, start, len)?))
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => Ok(out),
        }
    }

    /// Check this prefix fits a model with these shapes.
    pub(crate) fn check(
        &self,
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: candle_core::DType,
    ) -> Result<()> {
        if self.layers[0].0.dtype() != dtype {
            return Err(Error::Msg(format!(
                "prefix K/V are {:?}, the model runs in {dtype:?}: convert the cartridge first",
                self.layers[0].0.dtype()
            )));
        }
        if self.layers.len() != num_layers {
            return Err(Error::Msg(format!(
                "prefix has {} layers, the model {num_layers}",
                self.layers.len()
            )));
        }
        let (h, _, d) = self.layers[0].0.dims3()?;
        if h != kv_heads || d != head_dim {
            return Err(Error::Msg(format!(
                "prefix K/V are [{h}, p, {d}], the model wants [{kv_heads}, p, {head_dim}]"
            )));
        }
        Ok(())
    }
}

/// How several cartridges share positions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Composition {
    /// Every cartridge keeps the positions it was trained at (`0..p-1` each): the paper's
    /// composition, and what the offline `cartridge compose` writes.
    #[default]
    Overlap,
    /// The first cartridge keeps its positions; each later one drops its first slot (the attention
    /// sink: every cartridge made here starts with its corpus's first token, frozen) and its other
    /// keys are re-rotated to follow the slots before it, as if the corpora had been read one after
    /// the other behind one sink. The last cartridge then sits at the same distance from the user's
    /// tokens as when it was trained alone, and the model sees one sink instead of several.
    /// Each part must carry positions `0..p-1` (made or trained alone, not a file written by
    /// `cartridge compose`, whose later slots carry other positions).
    Follow,
}

impl Composition {
    /// Slots taken by cartridges of these lengths once composed (empty ones take none).
    pub fn slots(self, lens: impl IntoIterator<Item = usize>) -> usize {
        let (count, total) = lens
            .into_iter()
            .filter(|&n| n > 0)
            .fold((0, 0), |(c, t), n| (c + 1, t + n));
        match self {
            Composition::Overlap => total,
            Composition::Follow => total - usize::saturating_sub(count, 1),
        }
    }
}

/// Zero or more cartridges followed by zero or more soft prompts.
#[derive(Debug, Clone, Default)]
pub struct PrefixStack {
    /// KV cartridges, composed in this order.
    pub cartridges: Vec<PrefixKv>,
    /// Soft prompts `[n, hidden]`, placed after all cartridges, in this order.
    pub soft_prompts: Vec<Tensor>,
    /// How the cartridges share positions.
    pub composition: Composition,
}

impl PrefixStack {
    /// An empty stack.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a cartridge.
    pub fn with_cartridge(mut self, kv: PrefixKv) -> Self {
        self.cartridges.push(kv);
        self
    }

    /// Choose how the cartridges share positions.
    pub fn with_composition(mut self, composition: Composition) -> Self {
        self.composition = composition;
        self
    }

    /// Append a soft prompt `[n, hidden]`.
    pub fn with_soft_prompt(mut self, embeddings: Tensor) -> Self {
        self.soft_prompts.push(embeddings);
        self
    }

    /// Total prefix length `P` (cartridge slots + soft-prompt tokens): the user's first position.
    pub fn len(&self) -> usize {
        let c = self.cartridge_slots();
        let s: usize = self
            .soft_prompts
            .iter()
            .map(|t| t.dim(0).unwrap_or(0))
            .sum();
        c + s
    }

    /// Slots the composed cartridges take: their lengths, less the sinks [`Composition::Follow`]
    /// drops.
    pub fn cartridge_slots(&self) -> usize {
        self.composition
            .slots(self.cartridges.iter().map(PrefixKv::len))
    }

    /// Whether the stack is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Turn the stack into one [`PrefixKv`] of length [`Self::len`]: cartridges concatenated, then
    /// the soft prompts run (once, batch 1) after them and replaced by their per-layer K/V.
    ///
    /// With [`Path::Train`] the result stays connected to the cartridge tensors and soft-prompt
    /// embeddings, so a loss on the logits back-propagates into them. Returns `None` for an empty
    /// stack.
    pub fn resolve(&self, model: &Transformer, path: Path) -> Result<Option<PrefixKv>> {
        // Files hold f32 (or f16/bf16): the prefix takes the model's compute dtype here, once,
        // so a bf16 model can serve an f32 cartridge. A no-op when the dtypes already agree.
        let dtype = model.dtype();
        let carts: Vec<PrefixKv> = self
            .cartridges
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| match c.layers.first() {
                Some((k, _)) if k.dtype() != dtype => c.to_dtype(dtype),
                _ => Ok(c.clone()),
            })
            .collect::<Result<_>>()?;
        let cart = match (carts.len(), self.composition) {
            (0, _) => None,
            (_, Composition::Overlap) => Some(PrefixKv::concat(&carts.iter().collect::<Vec<_>>())?),
            (_, Composition::Follow) => Some(follow(model, &carts)?),
        };
        let softs: Vec<Tensor> = self
            .soft_prompts
            .iter()
            .map(|t| {
                if t.dtype() == dtype {
                    Ok(t.clone())
                } else {
                    t.to_dtype(dtype)
                }
            })
            .collect::<candle_core::Result<_>>()?;
        if softs.is_empty() {
            return Ok(cart);
        }
        let embeds = Tensor::cat(&softs, 0)?;
        if embeds.dim(0)? == 0 {
            return Ok(cart);
        }
        let soft_kv = model.embeds_kv(cart.as_ref(), &embeds, path)?;
        match cart {
            Some(c) => Ok(Some(PrefixKv::concat(&[&c, &soft_kv])?)),
            None => Ok(Some(soft_kv)),
        }
    }
}

/// [`Composition::Follow`]: the first part as it is, then each later part without its first slot,
/// its keys moved from positions `1..p` to right after the slots before it.
fn follow(model: &Transformer, parts: &[PrefixKv]) -> Result<PrefixKv> {
    let mut placed = vec![parts[0].clone()];
    let mut next = parts[0].len() as u32;
    for part in &parts[1..] {
        let n = part.len() - 1;
        if n == 0 {
            continue;
        }
        let body = part.narrow(1, n)?;
        let kv_heads = body.layers[0].0.dim(0)?;
        let from = vec![(1..=n as u32).collect::<Vec<_>>(); kv_heads];
        let to: Vec<u32> = (next..next + n as u32).collect();
        placed.push(body.map_layers(|k, v| Ok((model.move_keys(k, &from, &to)?, v.clone())))?);
        next += n as u32;
    }
    PrefixKv::concat(&placed.iter().collect::<Vec<_>>())
}
