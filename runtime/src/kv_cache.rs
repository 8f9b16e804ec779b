//! The KV cache of the tokens after the prefix, owned by the caller and passed into each forward
//! (the engine-owned cache of mistral.rs `kv_cache/`; attention caching as in Vaswani et al. 2017's
//! autoregressive decoder).
//!
//! # Layout
//! Per layer, keys (post-RoPE) and values live in a buffer `[batch, num_kv_heads, capacity,
//! head_dim]`; slots `0..len` are filled. The shared prefix stack is **not** copied in here: it is
//! passed to every forward separately and broadcast over the batch, so a 256-slot cartridge costs
//! the same for 1 or 32 sequences.
//!
//! # Per-sequence lengths: left padding
//! Sequences of different lengths are **left-padded**: sequence `b` has `pads[b]` leading slots that
//! no query attends to (except each pad slot to itself, which keeps every softmax row finite; pad
//! outputs are never read). Real token `j` of sequence `b` sits in slot `pads[b] + j` and has RoPE
//! position `P + j` (`P` = prefix length), so padding changes no result. Left padding keeps every
//! sequence's newest token in the last column, which makes batched decoding one append per step.
//! [`KvCache::retain`] drops finished sequences and trims padding columns no remaining sequence
//! needs.
//!
//! The cache is for inference: appends write in place (`slice_set`), which is invisible to
//! autograd. Training forwards pass no cache.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Keys and values of the non-prefix tokens of a batch of sequences.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    capacity: usize,
    len: usize,
    pads: Vec<usize>,
}

impl KvCache {
    /// An empty cache for `batch` sequences of a model with `num_layers` layers.
    pub fn new(num_layers: usize, batch: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            capacity: 0,
            len: 0,
            pads: vec![0; batch],
        }
    }

    /// An empty cache whose sequences will be left-padded by `pads[b]` slots (one entry per
    /// sequence). The first forward must then feed `max(len_b) ` columns where sequence `b`'s first
    /// `pads[b]` tokens are padding (any id).
    pub fn with_left_padding(num_layers: usize, pads: Vec<usize>) -> Self {
        Self {
            layers: vec![None; num_layers],
            capacity: 0,
            len: 0,
            pads,
        }
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.pads.len()
    }

    /// Filled slots per sequence, padding included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no slot is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Leading padding slots of each sequence.
    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    /// Real tokens of sequence `b` (padding excluded).
    pub fn seq_len(&self, b: usize) -> usize {
        self.len
            .saturating_sub(self.pads.get(b).copied().unwrap_or(0))
    }

    /// Keys and values of layer `i`, `[batch, kv_heads, len, head_dim]` (views, padding included).
    pub fn layer(&self, i: usize) -> Result<Option<(Tensor, Tensor)>> {
        match self.layers.get(i) {
            Some(Some((k, v))) => Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?))),
            _ => Ok(None),
        }
    }

    /// Write the keys/values `[batch, kv_heads, t, head_dim]` of the current forward into layer
    /// `i` at slot `len` and return the layer's filled view `0..len + t`. The length advances
    /// only in [`Self::advance`], once all layers are written.
    pub(crate) fn append(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        if b != self.batch() {
            return Err(Error::Msg(format!(
                "forward batch {b} does not match the KV cache batch {}",
                self.batch()
            )));
        }
        let need = self.len + t;
        let slot = self
            .layers
            .get_mut(i)
            .ok_or_else(|| Error::Msg(format!("KV cache has no layer {i}")))?;
        let fits = matches!(slot, Some((kb, _)) if kb.dim(2)? >= need);
        if !fits {
            // Grow geometrically so that decoding n tokens copies O(n) slots in total, not O(n^2).
            let cap = need.max(self.capacity * 2).max(16);
            let kb = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
            if let Some((ok, ov)) = slot.take() {
                if self.len > 0 {
                    kb.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    vb.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            *slot = Some((kb, vb));
        }
        let (kb, vb) = slot
            .as_ref()
            .ok_or_else(|| Error::Msg("KV cache slot missing".into()))?;
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }

    /// The real tokens of sequence `b` as a [`PrefixKv`] (`[kv_heads, n, head_dim]` per layer,
    /// padding dropped). Their keys keep the positions they were computed at (after the prefix
    /// used in that forward): e.g. prefill a chunk once, turn it into a prefix, decode many
    /// conversations after it.
    pub fn to_prefix(&self, b: usize) -> Result<crate::prefix::PrefixKv> {
        let pad = *self
            .pads
            .get(b)
            .ok_or_else(|| Error::Msg(format!("no sequence {b} in the KV cache")))?;
        let n = self.len - pad;
        let mut layers = Vec::with_capacity(self.layers.len());
        for slot in &self.layers {
            let (k, v) = slot
                .as_ref()
                .ok_or_else(|| Error::Msg("the KV cache is empty".into()))?;
            layers.push((
                k.get(b)?.narrow(1, pad, n)?.contiguous()?,
                v.get(b)?.narrow(1, pad, n)?.contiguous()?,
            ));
        }
        crate::prefix::PrefixKv::new(layers)
    }

    /// Mark `t` more slots filled (called by the forward after every layer appended).
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
        let cap = self
            .layers
            .iter()
            .flatten()
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .min()
            .unwrap_or(0);
        self.capacity = cap;
    }

    /// Append the sequences of `other` (same model, same prefix) after this cache's, e.g. to let
    /// requests prefilled on their own join a running decode batch. Both sides are re-aligned on
    /// the longer one by adding left padding, which changes no result (see the module docs).
    pub fn join(&mut self, other: &KvCache) -> Result<()> {
        if other.batch() == 0 {
            return Ok(());
        }
        if self.batch() == 0 {
            *self = other.clone();
            return Ok(());
        }
        if other.layers.len() != self.layers.len() {
            return Err(Error::Msg(format!(
                "join: caches have {} and {} layers",
                self.layers.len(),
                other.layers.len()
            )));
        }
        let new_len = self.len.max(other.len);
        // Each side's filled slots, shifted right to end at `new_len` (zeros in front are padding).
        let aligned = |t: &Tensor, len: usize| -> Result<Tensor> {
            let filled = t.narrow(2, 0, len)?;
            if len == new_len {
                return Ok(filled.contiguous()?);
            }
            let (b, h, _, d) = t.dims4()?;
            let zeros = Tensor::zeros((b, h, new_len - len, d), t.dtype(), t.device())?;
            Ok(Tensor::cat(&[&zeros, &filled.contiguous()?], 2)?)
        };
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            let (Some((k1, v1)), Some((k2, v2))) = (mine.as_ref(), theirs.as_ref()) else {
                return Err(Error::Msg("join: a cache has an empty layer".into()));
            };
            let k = Tensor::cat(&[&aligned(k1, self.len)?, &aligned(k2, other.len)?], 0)?;
            let v = Tensor::cat(&[&aligned(v1, self.len)?, &aligned(v2, other.len)?], 0)?;
            *mine = Some((k, v));
        }
        let (shift_mine, shift_theirs) = (new_len - self.len, new_len - other.len);
        let mut pads: Vec<usize> = self.pads.iter().map(|p| p + shift_mine).collect();
        pads.extend(other.pads.iter().map(|p| p + shift_theirs));
        self.pads = pads;
        self.len = new_len;
        self.capacity = new_len;
        Ok(())
    }

    /// Keep only the sequences `keep` (indices into the current batch, in the new order), e.g. to
    /// drop finished sequences from a batched decode. An index may repeat: that sequence is copied
    /// (prompts prefilled once for several requests). Padding columns that no kept sequence needs
    /// are trimmed.
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        if let Some(&bad) = keep.iter().find(|&&b| b >= self.batch()) {
            return Err(Error::Msg(format!(
                "retain: sequence {bad} out of {}",
                self.batch()
            )));
        }
        let pads: Vec<usize> = keep.iter().map(|&b| self.pads[b]).collect();
        let trim = pads.iter().copied().min().unwrap_or(0).min(self.len);
        let new_len = self.len - trim;
        if keep.is_empty() {
            self.layers.iter_mut().for_each(|l| *l = None);
            self.pads.clear();
            self.len = 0;
            self.capacity = 0;
            return Ok(());
        }
        for slot in self.layers.iter_mut() {
            if let Some((k, v)) = slot.take() {
                let idx = Tensor::from_vec(
                    keep.iter().map(|&b| b as u32).collect::<Vec<_>>(),
                    keep.len(),
                    k.device(),
                )?;
                // index_select wants a contiguous source: select whole buffers (which keeps
                // their headroom), then shift left when padding columns are trimmed.
                let ks = k.index_select(&idx, 0)?;
                let vs = v.index_select(&idx, 0)?;
                let (kb, vb) = if trim == 0 {
                    (ks, vs)
                } else {
                    let (b, h, cap, d) = ks.dims4()?;
                    let kb = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
                    let vb = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
                    if new_len > 0 {
                        kb.slice_set(&ks.narrow(2, trim, new_len)?.contiguous()?, 2, 0)?;
                        vb.slice_set(&vs.narrow(2, trim, new_len)?.contiguous()?, 2, 0)?;
                    }
                    (kb, vb)
                };
                *slot = Some((kb, vb));
            }
        }
        self.pads = pads.iter().map(|p| p - trim).collect();
        self.len = new_len;
        Ok(())
    }
}
