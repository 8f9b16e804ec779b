//! Qwen2 / Qwen2.5 (Qwen team 2024, "Qwen2 Technical Report"): the Llama decoder plus a bias on the
//! q, k and v projections (`model.layers.{i}.self_attn.{q,k,v}_proj.bias`). The shared decoder is in
//! [`super::transformer`].

use super::transformer::Quirks;

/// Bias on q/k/v, nothing else.
pub(crate) const QUIRKS: Quirks = Quirks {
    qkv_bias: true,
    qk_norm: false,
};
