//! Qwen3 (Qwen team 2025, "Qwen3 Technical Report"): the Llama decoder plus an RMSNorm over each
//! head's query and key vectors, applied before RoPE (`model.layers.{i}.self_attn.{q,k}_norm.weight`,
//! shape `[head_dim]`), and no q/k/v bias. `head_dim` is explicit in its config and need not equal
//! `hidden / heads`. The shared decoder is in [`super::transformer`].

use super::transformer::Quirks;

/// Per-head q/k RMSNorm, no bias.
pub(crate) const QUIRKS: Quirks = Quirks {
    qkv_bias: false,
    qk_norm: true,
};
