//! Offline composition (SPEC.md §6): several `.cart` files for the same model concatenated along the
//! token axis into one, byte for byte what the runtime builds when it composes them at request time.
//!
//! This is pure data movement: keys are never re-rotated (each part keeps the positions it was
//! trained at), so no model is needed and a hosting plugin can compose with this crate alone.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::error::{CartError, Result};
use super::file::CartFile;
use super::header::{DType, Dims, Header, KvDims, Provenance, SoftPromptDims};
use super::parse::{tensor_bytes, TensorView};
use super::write::CartContents;
use crate::fingerprint::ModelFingerprint;

/// One input of a composition: a verified file's header and raw (decompressed) payload.
#[derive(Debug, Clone, Copy)]
pub struct ComposePart<'a> {
    /// How the part is named in errors and in the provenance (usually its file name).
    pub label: &'a str,
    /// The part's validated header.
    pub header: &'a Header,
    /// The part's raw payload (call `verify` before composing: this module trusts the bytes).
    pub raw: &'a [u8],
}

/// A composition, ready to encode with [`Composed::contents`].
#[derive(Debug, Clone)]
pub struct Composed {
    /// Kind and dimensions of the result (tokens = the sum of the parts').
    pub dims: Dims,
    /// Element type: the parts' common dtype, or f32 when they differ (widening is exact).
    pub dtype: DType,
    /// The model every part was made for.
    pub model: ModelFingerprint,
    /// The soft-prompt summary (at most one part may carry one).
    pub summary: Option<String>,
    /// Provenance: `training.composition` records each part and the slots it occupies.
    pub provenance: Provenance,
    /// Tensor bytes in file order.
    pub tensors: Vec<Vec<u8>>,
}

impl Composed {
    /// The contents to hand to [`super::encode`] or [`super::write_file`].
    pub fn contents(&self) -> CartContents<'_> {
        CartContents {
            dims: self.dims,
            dtype: self.dtype,
            model: self.model.clone(),
            provenance: self.provenance.clone(),
            summary: self.summary.clone(),
            tensors: self.tensors.iter().map(Vec::as_slice).collect(),
        }
    }
}

fn mismatch(first: &ComposePart<'_>, other: &ComposePart<'_>, reason: String) -> CartError {
    CartError::CompositionMismatch {
        first: first.label.to_string(),
        other: other.label.to_string(),
        reason,
    }
}

/// Concatenate `parts` along the token axis, in the order given (SPEC.md §6).
///
/// All parts must be of one kind and made for the same model (fingerprints equal in every member).
/// A KV result keeps the first part's `frozen_tokens` (the leading attention sink); every later
/// part's sink stays in place inside the result, and the provenance records where each part sits.
/// `created` goes into the provenance as given (so tests can produce identical bytes).
pub fn compose(parts: &[ComposePart<'_>], created: &str) -> Result<Composed> {
    let Some(first) = parts.first() else {
        return Err(CartError::InvalidInput("nothing to compose".into()));
    };
    let mut summary: Option<(&str, String)> = None;
    for part in parts {
        let diff = first.header.model.differences(&part.header.model);
        if !diff.is_empty() {
            return Err(mismatch(
                first,
                part,
                format!(
                    "made for different models (fingerprints differ in {}): [{}] vs [{}]",
                    diff.join(", "),
                    first.header.model.short(),
                    part.header.model.short()
                ),
            ));
        }
        if part.header.kind() != first.header.kind() {
            return Err(mismatch(
                first,
                part,
                format!(
                    "a {} and a {} cannot be concatenated: a soft prompt runs through the model \
                     after the cartridges, so compose it at request time (--cartridge ... \
                     --soft-prompt ...)",
                    first.header.kind().name(),
                    part.header.kind().name()
                ),
            ));
        }
        if let Some(text) = &part.header.summary {
            if let Some((owner, _)) = &summary {
                return Err(CartError::CompositionMismatch {
                    first: owner.to_string(),
                    other: part.label.to_string(),
                    reason: "both soft prompts carry a summary; the result can hold only one"
                        .into(),
                });
            }
            summary = Some((part.label, text.clone()));
        }
    }
    let tokens: u64 = parts.iter().map(|p| p.header.dims.tokens() as u64).sum();
    let tokens = u32::try_from(tokens).map_err(|_| {
        CartError::InvalidDims(format!("composed length {tokens} does not fit in 32 bits"))
    })?;
    // A part without a logit bias has bias 0 on its slots: if any part has one, the result does.
    let biased = parts
        .iter()
        .any(|p| matches!(p.header.dims, Dims::Kv(d) if d.biased));
    let dims = match first.header.dims {
        Dims::Kv(d) => Dims::Kv(KvDims {
            tokens,
            frozen_tokens: d.frozen_tokens,
            biased,
            ..d
        }),
        Dims::SoftPrompt(d) => Dims::SoftPrompt(SoftPromptDims { tokens, ..d }),
    };
    dims.validate()?;
    let dtype = if parts.iter().all(|p| p.header.dtype == first.header.dtype) {
        first.header.dtype
    } else {
        DType::F32
    };
    let tensors = dims
        .expected_tensors()
        .iter()
        .map(|(name, _)| concat_tensor(parts, name, dtype))
        .collect::<Result<Vec<_>>>()?;
    Ok(Composed {
        dims,
        dtype,
        model: first.header.model.clone(),
        summary: summary.map(|(_, text)| text),
        provenance: provenance(parts, &dims, created),
        tensors,
    })
}

/// Open and verify every file, then [`compose`] them; parts are labelled with their file names.
/// Errors name the file at fault.
pub fn compose_files(paths: &[&Path], created: &str) -> Result<Composed> {
    let files = paths
        .iter()
        .map(|path| {
            let file = CartFile::open(path)?;
            file.verify()?;
            Ok(file)
        })
        .collect::<Result<Vec<_>>>()?;
    let labels: Vec<String> = paths
        .iter()
        .map(|p| {
            p.file_name().map_or_else(
                || p.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        })
        .collect();
    let parts: Vec<ComposePart<'_>> = files
        .iter()
        .zip(&labels)
        .map(|(file, label)| ComposePart {
            label,
            header: file.header(),
            raw: file.raw_payload(),
        })
        .collect();
    compose(&parts, created)
}

/// Tensor `name` of every part, joined along the token axis, as `dtype` bytes.
///
/// KV tensors are `[heads, tokens, head_dim]` and biases `[heads, tokens]` (token axis 1): for
/// each head, the parts' rows follow one another. A part without a bias contributes zeros.
/// Soft-prompt embeddings are `[tokens, hidden]` (token axis 0): plain concatenation.
fn concat_tensor(parts: &[ComposePart<'_>], name: &str, dtype: DType) -> Result<Vec<u8>> {
    let mut blocks = Vec::with_capacity(parts.len());
    let mut heads = 1usize;
    let mut total = 0usize;
    for part in parts {
        heads = match part.header.dims {
            Dims::Kv(d) => d.kv_heads as usize,
            Dims::SoftPrompt(_) => 1,
        };
        let Some(entry) = part.header.tensors.iter().find(|t| t.name == name) else {
            match part.header.dims {
                // Zero is all-zero bytes in every dtype.
                Dims::Kv(d) if name.starts_with("bias.") && !d.biased => {
                    let zeros = vec![0u8; heads * d.tokens as usize * dtype.size() as usize];
                    total += zeros.len();
                    blocks.push(zeros);
                    continue;
                }
                _ => return Err(CartError::NoSuchTensor(format!("{name} of {}", part.label))),
            }
        };
        let bytes = tensor_bytes(entry, part.raw)?;
        let bytes = if part.header.dtype == dtype {
            bytes.to_vec()
        } else {
            let view = TensorView {
                entry,
                dtype: part.header.dtype,
                bytes,
            };
            view.to_f32_vec()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
        total += bytes.len();
        blocks.push(bytes);
    }
    // Each part's tensor is `heads` equal rows of (its tokens x row width): interleave by head.
    let mut out = Vec::with_capacity(total);
    for h in 0..heads {
        for (part, block) in parts.iter().zip(&blocks) {
            let row = block.len() / heads;
            let slice = block.get(h * row..(h + 1) * row).ok_or_else(|| {
                CartError::InvalidInput(format!(
                    "{}: tensor {name} is not {heads} equal rows",
                    part.label
                ))
            })?;
            out.extend_from_slice(slice);
        }
    }
    Ok(out)
}

/// The composed file's provenance: a record per part, with the slots it occupies in the result.
fn provenance(parts: &[ComposePart<'_>], dims: &Dims, created: &str) -> Provenance {
    let mut start = 0u64;
    let records: Vec<serde_json::Value> = parts
        .iter()
        .map(|part| {
            let h = part.header;
            let len = h.dims.tokens() as u64;
            let frozen = match h.dims {
                Dims::Kv(d) => Some(d.frozen_tokens),
                Dims::SoftPrompt(_) => None,
            };
            let record = json!({
                "label": part.label,
                "slots": [start, start + len],
                "tokens": len,
                "frozen_tokens": frozen,
                "dtype": h.dtype.name(),
                "tool": h.provenance.tool,
                "created": h.provenance.created,
                "corpus_digest": h.provenance.corpus_digest,
                "tensors_digest": tensors_digest(h),
            });
            start += len;
            record
        })
        .collect();
    // A common corpus digest survives; parts of different corpora leave it null (each part's
    // own digest is in its record).
    let first_digest = parts
        .first()
        .and_then(|p| p.header.provenance.corpus_digest.clone());
    let corpus_digest = first_digest.filter(|d| {
        parts
            .iter()
            .all(|p| p.header.provenance.corpus_digest.as_ref() == Some(d))
    });
    let positions = match dims {
        Dims::Kv(_) => "each part keeps the positions it was trained at (keys are not re-rotated)",
        Dims::SoftPrompt(_) => "embeddings run after any cartridges, at the positions that follow",
    };
    Provenance {
        created: created.to_string(),
        corpus_digest,
        training: json!({
            "composition": {
                "parts": records,
                "positions": positions,
            }
        }),
        metadata: BTreeMap::new(),
        ..Provenance::default()
    }
}

/// `sha256:<hex>` over the part's tensor checksums in file order: an identity of its data.
fn tensors_digest(header: &Header) -> String {
    let mut sha = Sha256::new();
    for t in &header.tensors {
        sha.update(t.name.as_bytes());
        sha.update(b"=");
        sha.update(t.checksum.as_bytes());
        sha.update(b"\n");
    }
    let hex: String = sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cart::{encode, parse, CartView, Compression, KvDims};

    fn model() -> ModelFingerprint {
        ModelFingerprint {
            architecture: "llama".into(),
            num_layers: 2,
            hidden_size: 8,
            num_attention_heads: 2,
            num_kv_heads: 2,
            head_dim: 3,
            vocab_size: 32,
            rope_theta: 1e4,
            rope_scaling: None,
            tokenizer_hash: "sha256:00".into(),
            weights_hash: "sha256:00".into(),
        }
    }

    /// A KV file whose element (layer l, k/v, head h, token t, dim d) is a readable number; with
    /// `biased`, bias (l, h, t) is `tag + 100 l + 10 h + t`.
    fn kv_file(tag: f32, tokens: u32, frozen: u32, dtype: DType, biased: bool) -> Vec<u8> {
        let m = model();
        let dims = Dims::Kv(KvDims {
            layers: m.num_layers,
            kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
            tokens,
            frozen_tokens: frozen,
            biased,
        });
        let put = |b: &mut Vec<u8>, v: f32| match dtype {
            DType::F32 => b.extend(v.to_le_bytes()),
            DType::F16 => b.extend(half::f16::from_f32(v).to_le_bytes()),
            DType::Bf16 => b.extend(half::bf16::from_f32(v).to_le_bytes()),
        };
        let mut bufs = Vec::new();
        for l in 0..m.num_layers {
            for kv in 0..2 {
                let mut b = Vec::new();
                for h in 0..m.num_kv_heads {
                    for t in 0..tokens {
                        for d in 0..m.head_dim {
                            let v =
                                tag + (l * 1000 + kv * 100 + h * 10 + t) as f32 + d as f32 / 8.0;
                            put(&mut b, v);
                        }
                    }
                }
                bufs.push(b);
            }
            if biased {
                let mut b = Vec::new();
                for h in 0..m.num_kv_heads {
                    for t in 0..tokens {
                        put(&mut b, tag + (l * 100 + h * 10 + t) as f32);
                    }
                }
                bufs.push(b);
            }
        }
        encode(
            &CartContents {
                dims,
                dtype,
                model: m,
                provenance: Provenance::default(),
                summary: None,
                tensors: bufs.iter().map(Vec::as_slice).collect(),
            },
            Compression::None,
        )
        .expect("encode")
    }

    fn part<'a>(label: &'a str, view: &'a CartView<'a>) -> ComposePart<'a> {
        ComposePart {
            label,
            header: &view.header,
            raw: view.stored,
        }
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn kv_parts_are_joined_per_head_along_the_token_axis() {
        let (a, b) = (
            kv_file(0.0, 2, 1, DType::F32, false),
            kv_file(0.5, 3, 1, DType::F32, false),
        );
        let (va, vb) = (parse(&a).expect("a"), parse(&b).expect("b"));
        let parts = [part("a.cart", &va), part("b.cart", &vb)];
        let c = compose(&parts, "2026-11-29T00:00:00Z").expect("compose");
        let Dims::Kv(d) = c.dims else {
            panic!("kv expected")
        };
        assert_eq!((d.tokens, d.frozen_tokens), (5, 1));
        // keys.1 (l = 1, kv = 0), head 1: a's two tokens, then b's three.
        let keys1 = f32s(&c.tensors[2]);
        let row = |h: usize, t: usize| keys1[(h * 5 + t) * 3];
        assert_eq!(
            [row(1, 0), row(1, 1), row(1, 2), row(1, 3), row(1, 4)],
            [1010.0, 1011.0, 1010.5, 1011.5, 1012.5]
        );
        let bytes = encode(&c.contents(), Compression::None).expect("encode");
        parse(&bytes).expect("parse").verify().expect("verify");
        let training = &c.provenance.training["composition"]["parts"];
        assert_eq!(training[1]["slots"], json!([2, 5]));
        assert_eq!(training[0]["label"], "a.cart");
    }

    #[test]
    fn a_part_without_a_bias_contributes_zeros_to_the_composed_bias() {
        let (a, b) = (
            kv_file(0.0, 2, 1, DType::F32, false),
            kv_file(0.5, 3, 1, DType::F32, true),
        );
        let (va, vb) = (parse(&a).expect("a"), parse(&b).expect("b"));
        let pa = part("a", &va);
        let pb = part("b", &vb);
        let c = compose(&[pa, pb], "").expect("compose");
        let Dims::Kv(d) = c.dims else {
            panic!("kv expected")
        };
        assert!(d.biased);
        // Per layer: keys, values, bias. bias.1, head 1: a's two zeros, then b's three.
        assert_eq!(c.tensors.len(), 6);
        assert_eq!(f32s(&c.tensors[5])[5..], [0.0, 0.0, 110.5, 111.5, 112.5]);
        // The keys still line up (the unbiased part's tensors are found by name).
        assert_eq!(f32s(&c.tensors[3])[(5 + 2) * 3], 1010.5);
        let bytes = encode(&c.contents(), Compression::None).expect("encode");
        parse(&bytes).expect("parse").verify().expect("verify");
        // Two unbiased parts stay unbiased.
        let plain = compose(&[pa, pa], "").expect("compose");
        assert!(matches!(plain.dims, Dims::Kv(d) if !d.biased));
        assert_eq!(plain.tensors.len(), 4);
    }

    #[test]
    fn mixed_dtypes_widen_to_f32_and_equal_dtypes_stay() {
        let (a, b) = (
            kv_file(0.0, 2, 1, DType::F16, false),
            kv_file(0.0, 1, 1, DType::Bf16, false),
        );
        let (va, vb) = (parse(&a).expect("a"), parse(&b).expect("b"));
        let pa = part("a", &va);
        let pb = part("b", &vb);
        assert_eq!(compose(&[pa, pa], "").expect("same").dtype, DType::F16);
        let mixed = compose(&[pa, pb], "").expect("mixed");
        assert_eq!(mixed.dtype, DType::F32);
        assert_eq!(f32s(&mixed.tensors[0])[..4], [0.0, 0.125, 0.25, 1.0]);
    }

    #[test]
    fn other_model_and_kind_are_refused_naming_both_parts() {
        let a = kv_file(0.0, 2, 1, DType::F32, false);
        let va = parse(&a).expect("a");
        let mut other = va.header.clone();
        other.model.weights_hash = "sha256:ff".into();
        let err = compose(
            &[
                part("a.cart", &va),
                ComposePart {
                    label: "z.cart",
                    header: &other,
                    raw: va.stored,
                },
            ],
            "",
        )
        .expect_err("other model");
        let msg = err.to_string();
        assert!(
            msg.contains("a.cart") && msg.contains("z.cart") && msg.contains("weights_hash"),
            "{msg}"
        );
        assert!(compose(&[], "").is_err());
    }
}
