//! Tokenizers: a Hugging Face `tokenizer.json`, or one rebuilt from a GGUF file's metadata.
//!
//! A GGUF carries its tokenizer as metadata (`tokenizer.ggml.model`, `.tokens`, `.token_type`,
//! `.merges`, `.pre`, special token ids). For byte-level BPE models (`model = "gpt2"`) we rebuild
//! the equivalent `tokenizer.json` document and hand it to the `tokenizers` crate, so encoding is the
//! same code Hugging Face runs. The pre-tokenizer is not stored as such, only as a name
//! (`tokenizer.ggml.pre`) that llama.cpp maps to regular expressions; [`pre_tokenizer_for`] mirrors
//! that table for the names we support and refuses the others rather than tokenising differently.
//!
//! Token types follow llama.cpp: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
//! Control and user-defined tokens become added tokens, which the `tokenizers` crate never splits;
//! control tokens are also special (skipped when decoding with `skip_special_tokens`).

use std::path::Path;

use serde_json::{json, Value as Json};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A tokenizer plus the special tokens generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// The Hugging Face pre-tokenizer (as `tokenizer.json` JSON) for a GGUF `tokenizer.ggml.pre` name.
///
/// llama.cpp splits text with a list of regular expressions per name (`llama-vocab.cpp`); these are
/// the `tokenizers` pre-tokenizers that split identically.
pub fn pre_tokenizer_for(pre: &str) -> Option<Json> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let split = |pattern: &str| {
        json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
               "invert": false})
    };
    match pre {
        // GPT-2's own regex, applied by ByteLevel itself.
        "gpt2" | "default" => Some(byte_level(true)),
        // StarCoder family (SmolLM, SmolLM2): every digit is its own piece, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva" => {
            Some(json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}))
        }
        // Llama 3: numbers in groups of up to three.
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => Some(json!({"type": "Sequence",
        "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false),
        ]})),
        // Qwen2/2.5/3: every digit separate.
        "qwen2" => Some(json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false),
        ]})),
        _ => None,
    }
}

fn as_i64(v: &candle_core::quantized::gguf_file::Value) -> Option<i64> {
    use candle_core::quantized::gguf_file::Value as V;
    match v {
        V::U8(x) => Some(i64::from(*x)),
        V::I8(x) => Some(i64::from(*x)),
        V::U16(x) => Some(i64::from(*x)),
        V::I16(x) => Some(i64::from(*x)),
        V::U32(x) => Some(i64::from(*x)),
        V::I32(x) => Some(i64::from(*x)),
        V::I64(x) => Some(*x),
        V::U64(x) => i64::try_from(*x).ok(),
        _ => None,
    }
}

/// The `tokenizer.json` document equivalent to a GGUF file's tokenizer metadata.
pub fn gguf_tokenizer_json(gguf: &GgufFile) -> Result<Json> {
    let model = gguf.get_str("tokenizer.ggml.model")?;
    if model == "llama" {
        return sentencepiece_tokenizer_json(gguf);
    }
    if model != "gpt2" {
        return Err(Error::Tokenizer(format!(
            "{}: GGUF tokenizer model {model:?} is not supported (byte-level BPE \"gpt2\" and \
             SentencePiece BPE \"llama\" are); load the model from a Hugging Face folder with \
             tokenizer.json instead",
            gguf.path().display()
        )));
    }
    let pre_name = gguf.get_str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = pre_tokenizer_for(pre_name).ok_or_else(|| {
        Error::Tokenizer(format!(
            "{}: GGUF pre-tokenizer {pre_name:?} is not supported; load the model from a Hugging \
             Face folder with tokenizer.json instead",
            gguf.path().display()
        ))
    })?;

    let tokens = gguf.get_array("tokenizer.ggml.tokens")?;
    let types = match gguf.metadata().get("tokenizer.ggml.token_type") {
        Some(_) => Some(gguf.get_array("tokenizer.ggml.token_type")?),
        None => None,
    };
    if let Some(types) = types {
        if types.len() != tokens.len() {
            return Err(Error::Tokenizer(format!(
                "{}: {} token types for {} tokens",
                gguf.path().display(),
                types.len(),
                tokens.len()
            )));
        }
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        let text = tok
            .to_string()
            .map_err(|e| Error::Tokenizer(format!("token {id}: {e}")))?;
        let id = u32::try_from(id).map_err(tok_err)?;
        // The first occurrence wins, as in llama.cpp's token-to-id map.
        vocab.entry(text.clone()).or_insert(json!(id));
        let ty = types
            .and_then(|t| t.get(id as usize))
            .and_then(as_i64)
            .unwrap_or(1);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": text, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    let merges: Vec<Json> = match gguf.metadata().get("tokenizer.ggml.merges") {
        None => Vec::new(),
        Some(_) => gguf
            .get_array("tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let s = m
                    .to_string()
                    .map_err(|e| Error::Tokenizer(format!("merge {i}: {e}")))?;
                let (a, b) = s
                    .split_once(' ')
                    .ok_or_else(|| Error::Tokenizer(format!("merge {i} has no space: {s:?}")))?;
                Ok(json!([a, b]))
            })
            .collect::<Result<_>>()?,
    };
    let token_texts: Vec<String> = tokens
        .iter()
        .map(|t| t.to_string().cloned().unwrap_or_default())
        .collect();
    // Byte-level post-processing only fixes offsets; byte-level models rarely add BOS.
    let post_processor = bos_post_processor(
        gguf,
        &token_texts,
        false,
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
               "use_regex": true}),
    )?;
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    }))
}

/// The post-processor for `encode(text, add_special_tokens = true)`: BOS in front when the GGUF says
/// `tokenizer.ggml.add_bos_token` (default `default_add_bos`), as Hugging Face's `tokenizer.json`
/// for the same model does; otherwise `fallback`.
fn bos_post_processor(
    gguf: &GgufFile,
    tokens: &[String],
    default_add_bos: bool,
    fallback: Json,
) -> Result<Json> {
    let add_bos = match gguf.metadata().get("tokenizer.ggml.add_bos_token") {
        Some(candle_core::quantized::gguf_file::Value::Bool(b)) => *b,
        _ => default_add_bos,
    };
    let bos = gguf
        .get_u64_opt("tokenizer.ggml.bos_token_id")?
        .and_then(|id| Some((id, tokens.get(usize::try_from(id).ok()?)?)));
    Ok(match bos {
        Some((id, text)) if add_bos => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": text, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": text, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": text, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {text.as_str(): {"id": text, "ids": [id], "tokens": [text]}},
        }),
        _ => fallback,
    })
}

/// Token texts and llama.cpp token types of a GGUF (type 1, normal, when the file has none).
fn gguf_tokens(gguf: &GgufFile) -> Result<(Vec<String>, Vec<i64>)> {
    let tokens = gguf
        .get_array("tokenizer.ggml.tokens")?
        .iter()
        .enumerate()
        .map(|(id, t)| {
            t.to_string()
                .cloned()
                .map_err(|e| Error::Tokenizer(format!("token {id}: {e}")))
        })
        .collect::<Result<Vec<String>>>()?;
    let types = match gguf.metadata().get("tokenizer.ggml.token_type") {
        Some(_) => gguf
            .get_array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| as_i64(v).unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(Error::Tokenizer(format!(
            "{}: {} token types for {} tokens",
            gguf.path().display(),
            types.len(),
            tokens.len()
        )));
    }
    Ok((tokens, types))
}

/// The `tokenizer.json` of a SentencePiece BPE model (Llama 1/2, TinyLlama, Mistral v1), built the
/// way Hugging Face converts a SentencePiece model (`convert_slow_tokenizer.py`, `LlamaConverter`):
/// a `▁` is prepended and spaces become `▁`, BPE with byte fallback over `<0xXX>` tokens, and the
/// merges recovered from the vocabulary: every split of a piece into two pieces that are both in
/// the vocabulary, ordered by the merged piece's score (highest first), ties by the halves' ids.
pub fn sentencepiece_tokenizer_json(gguf: &GgufFile) -> Result<Json> {
    let (tokens, types) = gguf_tokens(gguf)?;
    let scores: Vec<f32> = match gguf.metadata().get("tokenizer.ggml.scores") {
        Some(_) => gguf
            .get_array("tokenizer.ggml.scores")?
            .iter()
            .map(|v| match v {
                candle_core::quantized::gguf_file::Value::F32(x) => *x,
                candle_core::quantized::gguf_file::Value::F64(x) => *x as f32,
                _ => 0.0,
            })
            .collect(),
        None => vec![0.0; tokens.len()],
    };
    if scores.len() != tokens.len() {
        return Err(Error::Tokenizer(format!(
            "{}: {} scores for {} tokens",
            gguf.path().display(),
            scores.len(),
            tokens.len()
        )));
    }
    let mut ids: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for (id, t) in tokens.iter().enumerate() {
        ids.entry(t.as_str()).or_insert(id as u32);
    }
    // Merges as Hugging Face's SentencePieceExtractor derives them.
    let mut merges: Vec<(f32, usize, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let mut local = Vec::new();
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                local.push((li, ri));
            }
        }
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (scores[id], id, l, r)));
    }
    // Stable sort by score, highest first: ties keep vocabulary order.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    let merges: Vec<Json> = merges
        .iter()
        .map(|&(_, _, l, r)| json!([tokens[l as usize], tokens[r as usize]]))
        .collect();

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    let mut unk = None;
    for (id, (text, &ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.entry(text.clone()).or_insert(json!(id));
        if ty == TOKEN_TYPE_UNKNOWN && unk.is_none() {
            unk = Some(text.clone());
        }
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED || ty == TOKEN_TYPE_UNKNOWN {
            added.push(json!({
                "id": id, "content": text, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty != TOKEN_TYPE_USER_DEFINED,
            }));
        }
    }
    let add_space_prefix = match gguf.metadata().get("tokenizer.ggml.add_space_prefix") {
        Some(candle_core::quantized::gguf_file::Value::Bool(b)) => *b,
        _ => true,
    };
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        // SentencePiece Llama tokenizers add BOS unless the file says otherwise.
        "post_processor": bos_post_processor(gguf, &tokens, true, Json::Null)?,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    }))
}

impl Tokenizer {
    /// Wrap a `tokenizers` tokenizer with its BOS and EOS ids.
    pub fn new(
        inner: tokenizers::Tokenizer,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        Self {
            inner,
            bos_token_id,
            eos_token_ids,
        }
    }

    /// Build the tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let doc = gguf_tokenizer_json(gguf)?;
        let bytes = serde_json::to_vec(&doc).map_err(tok_err)?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(tok_err)?;
        let id = |k: &str| -> Result<Option<u32>> {
            Ok(gguf.get_u64_opt(k)?.and_then(|v| u32::try_from(v).ok()))
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        Ok(Self::new(inner, bos, gguf.eos_token_ids()?))
    }

    /// Load a `tokenizer.json` file.
    pub fn from_file(
        path: impl AsRef<Path>,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::new(inner, bos_token_id, eos_token_ids))
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// BOS id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// EOS ids (generation stops on any).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The text of a token id (as stored in the vocabulary, e.g. byte-level `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string (vocabulary form), including added tokens.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) become their
    /// ids; `add_special_tokens` lets the post-processor add BOS/EOS where the tokenizer says so
    /// (Hugging Face convention: `true` for raw text, `false` for a rendered chat template, which
    /// writes its own BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special_tokens` drops special (control) tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// A canonical description of what determines token ids: model type, vocabulary in id order,
    /// merges, added tokens (id, text, special), normaliser and pre-tokenizer. Two tokenizers that
    /// encode identically have the same description whether they came from a GGUF or a
    /// `tokenizer.json` (the `tokenizers` crate serialises both the same way).
    pub fn canonical_description(&self) -> Result<String> {
        let doc: Json = serde_json::from_str(&self.inner.to_string(false).map_err(tok_err)?)
            .map_err(tok_err)?;
        let model = doc.get("model").cloned().unwrap_or(Json::Null);
        let mut vocab: Vec<(u64, String)> = model
            .get("vocab")
            .and_then(Json::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_u64().map(|id| (id, k.clone())))
                    .collect()
            })
            .unwrap_or_default();
        vocab.sort();
        let merges: Vec<String> = model
            .get("merges")
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .map(|m| match m {
                        Json::String(s) => s.clone(),
                        Json::Array(p) => p
                            .iter()
                            .map(|x| x.as_str().unwrap_or_default())
                            .collect::<Vec<_>>()
                            .join(" "),
                        other => other.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut added: Vec<(u64, String, bool)> = doc
            .get("added_tokens")
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| {
                        Some((
                            t.get("id")?.as_u64()?,
                            t.get("content")?.as_str()?.to_string(),
                            t.get("special")?.as_bool()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        added.sort();
        let desc = json!({
            "model": model.get("type").cloned().unwrap_or(Json::Null),
            "vocab": vocab.into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
            "merges": merges,
            "added_tokens": added,
            "normalizer": doc.get("normalizer").cloned().unwrap_or(Json::Null),
            "pre_tokenizer": doc.get("pre_tokenizer").cloned().unwrap_or(Json::Null),
        });
        serde_json::to_string(&desc).map_err(tok_err)
    }

    /// `sha256:<hex>` of [`Tokenizer::canonical_description`].
    pub fn hash(&self) -> Result<String> {
        Ok(cartridge_formats::fingerprint::sha256_hex(
            self.canonical_description()?.as_bytes(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_pre_tokenizer_parses() {
        for name in ["gpt2", "smollm", "llama-bpe", "qwen2"] {
            let pre = pre_tokenizer_for(name).expect("known name");
            let doc = json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": null, "pre_tokenizer": pre, "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                            "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": {"a": 0}, "merges": []},
            });
            let bytes = serde_json::to_vec(&doc).expect("json");
            assert!(
                tokenizers::Tokenizer::from_bytes(bytes).is_ok(),
                "pre-tokenizer {name} does not parse"
            );
        }
        assert!(pre_tokenizer_for("no-such-pre").is_none());
    }
}
