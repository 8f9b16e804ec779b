//! One synthesised conversation (SPEC.md D4): its JSON part, token ids and teacher top-k, with a
//! pure encoder/decoder over the decompressed record bytes.

use serde::{Deserialize, Serialize};

use super::error::{DatasetError, Result};

/// Largest top-k width a record may carry.
pub const MAX_TOP_K: u32 = 1024;
/// Largest number of token ids in one record.
pub const MAX_TOKENS: u32 = 1 << 24;
/// Largest JSON part.
pub const MAX_JSON: u32 = 16 << 20;
/// Largest number of target spans.
pub const MAX_SPANS: usize = 4096;
/// Largest number of messages.
pub const MAX_MESSAGES: usize = 1024;
/// Log-probabilities above this are rejected (rounding may make a certain token's log-prob a hair
/// above zero).
pub const MAX_LOGPROB: f32 = 1e-3;

/// A contiguous run of corpus tokens the teacher saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkPiece {
    /// File path relative to the corpus root, `/`-separated.
    pub file: String,
    /// First token (in that file's tokenisation).
    pub start: u64,
    /// One past the last token.
    pub end: u64,
}

/// Where a conversation's chunk came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ChunkLocation {
    /// Chunk number in the run.
    pub chunk: u64,
    /// The pieces, in the order they appeared in the prompt.
    pub pieces: Vec<ChunkPiece>,
}

/// One chat message (system prompt excluded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// The JSON part of a record, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordMeta {
    id: u64,
    seed_kind: String,
    seed_prompt: String,
    location: ChunkLocation,
    messages: Vec<Message>,
    targets: Vec<(u32, u32)>,
}

/// One conversation with the teacher's top-k at every answer token.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Conversation index in the run (unique in a dataset).
    pub id: u64,
    /// Which kind of seed prompt started it (`structuring`, `summarization`, `question`,
    /// `use_case`, `creative`).
    pub seed_kind: String,
    /// The instruction the user role was given.
    pub seed_prompt: String,
    /// The corpus tokens in the teacher's system prompt.
    pub location: ChunkLocation,
    /// The conversation, without the system prompt.
    pub messages: Vec<Message>,
    /// Exactly what training sees: no BOS, no system message, answer tokens included.
    pub tokens: Vec<u32>,
    /// Answer spans `(start, len)` over `tokens`, sorted, non-overlapping, `start >= 1`.
    pub targets: Vec<(u32, u32)>,
    /// Width of each top-k row.
    pub top_k: u32,
    /// `[m, k]` ids, most probable first, one row per target position in span order.
    pub topk_ids: Vec<u32>,
    /// `[m, k]` natural-log probabilities matching `topk_ids`.
    pub topk_logprobs: Vec<f32>,
}

impl Record {
    /// Number of target positions `m`.
    pub fn num_targets(&self) -> usize {
        self.targets.iter().map(|&(_, l)| l as usize).sum()
    }

    /// Token positions of the targets, in row order.
    pub fn target_positions(&self) -> impl Iterator<Item = usize> + '_ {
        self.targets
            .iter()
            .flat_map(|&(s, l)| (s as usize)..(s as usize + l as usize))
    }

    /// The top-k row of target `r`: `(ids, logprobs)`.
    pub fn topk_row(&self, r: usize) -> Option<(&[u32], &[f32])> {
        let k = self.top_k as usize;
        let ids = self.topk_ids.get(r * k..(r + 1) * k)?;
        let lps = self.topk_logprobs.get(r * k..(r + 1) * k)?;
        Some((ids, lps))
    }

    /// Check every rule of SPEC.md D4 that does not need the teacher; `vocab` (when given) bounds
    /// the ids.
    pub fn validate(&self, vocab: Option<u32>) -> std::result::Result<(), String> {
        let n = self.tokens.len();
        if n as u64 > MAX_TOKENS as u64 {
            return Err(format!("{n} tokens exceed the limit of {MAX_TOKENS}"));
        }
        if self.top_k == 0 || self.top_k > MAX_TOP_K {
            return Err(format!(
                "top-k width {} is not in 1..={MAX_TOP_K}",
                self.top_k
            ));
        }
        if self.targets.len() > MAX_SPANS {
            return Err(format!(
                "{} spans exceed the limit of {MAX_SPANS}",
                self.targets.len()
            ));
        }
        if self.messages.len() > MAX_MESSAGES {
            return Err(format!(
                "{} messages exceed the limit of {MAX_MESSAGES}",
                self.messages.len()
            ));
        }
        let mut prev_end = 1u64;
        for &(s, l) in &self.targets {
            let (s, l) = (s as u64, l as u64);
            if l == 0 || s < prev_end || s + l > n as u64 {
                return Err(format!(
                    "target span [{s}, {l}] is empty, overlaps, starts at 0, or passes the {n} tokens"
                ));
            }
            prev_end = s + l;
        }
        let cells = self.num_targets() * self.top_k as usize;
        if self.topk_ids.len() != cells || self.topk_logprobs.len() != cells {
            return Err(format!(
                "top-k arrays hold {} ids and {} log-probs, {} targets x k {} need {cells}",
                self.topk_ids.len(),
                self.topk_logprobs.len(),
                self.num_targets(),
                self.top_k
            ));
        }
        if let Some(v) = vocab {
            let bad = self
                .tokens
                .iter()
                .chain(&self.topk_ids)
                .find(|&&id| id >= v);
            if let Some(id) = bad {
                return Err(format!(
                    "token id {id} is not below the vocabulary size {v}"
                ));
            }
        }
        if let Some(lp) = self
            .topk_logprobs
            .iter()
            .find(|lp| lp.is_nan() || **lp > MAX_LOGPROB)
        {
            return Err(format!(
                "log-probability {lp} is NaN or above {MAX_LOGPROB}"
            ));
        }
        Ok(())
    }

    /// The decompressed record bytes (SPEC.md D4).
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate(None).map_err(DatasetError::InvalidRecord)?;
        let meta = RecordMeta {
            id: self.id,
            seed_kind: self.seed_kind.clone(),
            seed_prompt: self.seed_prompt.clone(),
            location: self.location.clone(),
            messages: self.messages.clone(),
            targets: self.targets.clone(),
        };
        let json = serde_json::to_vec(&meta)
            .map_err(|e| DatasetError::InvalidRecord(format!("JSON part: {e}")))?;
        if json.len() > MAX_JSON as usize {
            return Err(DatasetError::InvalidRecord(format!(
                "JSON part is {} bytes, over the {MAX_JSON}-byte limit",
                json.len()
            )));
        }
        let m = self.num_targets();
        let mut out = Vec::with_capacity(
            json.len() + 16 + 4 * (self.tokens.len() + 2 * m * self.top_k as usize),
        );
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&(self.tokens.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.top_k.to_le_bytes());
        out.extend_from_slice(&(m as u32).to_le_bytes());
        for t in self.tokens.iter().chain(&self.topk_ids) {
            out.extend_from_slice(&t.to_le_bytes());
        }
        for lp in &self.topk_logprobs {
            out.extend_from_slice(&lp.to_le_bytes());
        }
        Ok(out)
    }

    /// Parse decompressed record bytes; checks the layout and every rule of D4 (`vocab` bounds
    /// the ids when given).
    pub fn decode(bytes: &[u8], vocab: Option<u32>) -> Result<Record> {
        let mut cur = Cursor { bytes, pos: 0 };
        let j = cur.u32()?;
        if j > MAX_JSON {
            return Err(layout(format!("JSON part of {j} bytes exceeds {MAX_JSON}")));
        }
        let json = cur.take(j as usize)?;
        let meta: RecordMeta =
            serde_json::from_slice(json).map_err(|e| layout(format!("JSON part: {e}")))?;
        let n = cur.u32()?;
        let k = cur.u32()?;
        let m = cur.u32()?;
        if n > MAX_TOKENS {
            return Err(layout(format!("{n} tokens exceed {MAX_TOKENS}")));
        }
        if k == 0 || k > MAX_TOP_K {
            return Err(layout(format!("top-k width {k} is not in 1..={MAX_TOP_K}")));
        }
        let cells = (m as u64)
            .checked_mul(k as u64)
            .filter(|&c| c <= MAX_TOKENS as u64 * MAX_TOP_K as u64)
            .ok_or_else(|| layout(format!("{m} targets x k {k} is too large")))?
            as usize;
        // Check the remaining length before allocating anything sized by the file.
        let need = 4 * (n as u64 + 2 * cells as u64);
        if need != cur.remaining() as u64 {
            return Err(layout(format!(
                "{} bytes follow the counts, n={n}, k={k}, m={m} need exactly {need}",
                cur.remaining()
            )));
        }
        let tokens = cur.u32s(n as usize)?;
        let topk_ids = cur.u32s(cells)?;
        let topk_logprobs = cur
            .u32s(cells)?
            .into_iter()
            .map(f32::from_bits)
            .collect::<Vec<_>>();
        let rec = Record {
            id: meta.id,
            seed_kind: meta.seed_kind,
            seed_prompt: meta.seed_prompt,
            location: meta.location,
            messages: meta.messages,
            tokens,
            targets: meta.targets,
            top_k: k,
            topk_ids,
            topk_logprobs,
        };
        if rec.num_targets() != m as usize {
            return Err(layout(format!(
                "m = {m}, but the spans cover {} positions",
                rec.num_targets()
            )));
        }
        rec.validate(vocab).map_err(layout)?;
        Ok(rec)
    }
}

fn layout(msg: impl Into<String>) -> DatasetError {
    DatasetError::RecordLayout(msg.into())
}

/// Bounds-checked little-endian reads.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                layout(format!(
                    "needs {len} bytes at offset {}, record has {}",
                    self.pos,
                    self.bytes.len()
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32s(&mut self, n: usize) -> Result<Vec<u32>> {
        let b = self.take(n.checked_mul(4).ok_or_else(|| layout("length overflow"))?)?;
        Ok(b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(id: u64) -> Record {
        Record {
            id,
            seed_kind: "question".into(),
            seed_prompt: "Ask something.".into(),
            location: ChunkLocation {
                chunk: 2,
                pieces: vec![ChunkPiece {
                    file: "a/b.txt".into(),
                    start: 5,
                    end: 40,
                }],
            },
            messages: vec![
                Message {
                    role: "user".into(),
                    content: "What?".into(),
                },
                Message {
                    role: "assistant".into(),
                    content: "That.".into(),
                },
            ],
            tokens: vec![10, 11, 12, 13, 14, 15],
            targets: vec![(3, 2), (5, 1)],
            top_k: 2,
            topk_ids: vec![13, 1, 14, 2, 15, 3],
            topk_logprobs: vec![-0.1, -2.0, -0.2, -3.0, -0.01, -5.0],
        }
    }

    #[test]
    fn round_trip() {
        let r = sample(7);
        let bytes = r.encode().expect("encode");
        assert_eq!(Record::decode(&bytes, Some(100)).expect("decode"), r);
        assert_eq!(r.target_positions().collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn bad_records_are_refused() {
        let mut r = sample(1);
        r.targets = vec![(0, 2)];
        r.topk_ids.truncate(4);
        r.topk_logprobs.truncate(4);
        assert!(r.encode().is_err(), "span at 0");
        let mut r = sample(1);
        r.topk_logprobs[0] = f32::NAN;
        assert!(r.encode().is_err(), "NaN");
        let r = sample(1);
        let bytes = r.encode().expect("encode");
        assert!(Record::decode(&bytes, Some(12)).is_err(), "ids past vocab");
        assert!(
            Record::decode(&bytes[..bytes.len() - 1], None).is_err(),
            "short"
        );
        let mut long = bytes.clone();
        long.push(0);
        assert!(Record::decode(&long, None).is_err(), "trailing byte");
    }
}
