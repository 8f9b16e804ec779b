//! Llama (Llama 2 / 3, SmolLM2, TinyLlama): the plain decoder of Touvron et al. 2023, "LLaMA: Open
//! and Efficient Foundation Language Models" — pre-norm RMSNorm, rotary embeddings, SwiGLU MLP,
//! grouped-query attention, no bias anywhere. The shared decoder is in [`super::transformer`]; this
//! file only states what is specific to the family.

use super::transformer::Quirks;

/// Llama has none of the optional parts.
pub(crate) const QUIRKS: Quirks = Quirks {
    qkv_bias: false,
    qk_norm: false,
};
