//! Initial values of the trained parameters (Eyuboglu et al. 2025, §4.3 ablation: the KV of the
//! corpus's first `p` tokens beats random text and random vectors; DESIGN.md §5).
//!
//! Everything here is seeded: the same settings give the same starting bytes, which exact resume
//! and reproducible builds rely on. Random normals come from our own Box-Muller over a seeded
//! `StdRng` because candle's `randn` draws from an unseeded thread RNG.

use candle_core::{DType, Tensor};
use cartridge_runtime::{PrefixKv, Transformer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the parameters start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitKind {
    /// The KV (or embeddings) of the first tokens of the corpus text the caller passes.
    #[default]
    CorpusText,
    /// The KV (or embeddings) of uniformly random token ids.
    RandomText,
    /// Gaussian vectors with the per-layer scale of real K and V (or of the embeddings).
    RandomVectors,
    /// The KV (or embeddings) of [`SAMPLED_CHUNKS`] windows of the corpus text at seeded random
    /// offsets, concatenated (positions `0..p-1` over the concatenation).
    SampledChunks,
}

/// Windows drawn by [`InitKind::SampledChunks`].
pub const SAMPLED_CHUNKS: usize = 4;

/// Tokens used to measure the scale of real K/V for [`InitKind::RandomVectors`].
const SCALE_PROBE_TOKENS: usize = 64;

fn random_ids(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// `n` standard normals (Box-Muller), f32.
fn normals(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 - u keeps the logarithm's argument in (0, 1].
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Standard deviation of all elements of `t`.
fn std_of(t: &Tensor) -> Result<f64> {
    let t = t.to_dtype(DType::F64)?.flatten_all()?;
    let mean = t.mean_all()?.to_scalar::<f64>()?;
    let var = t
        .affine(1.0, -mean)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?;
    Ok(var.sqrt())
}

fn gaussian_like(rng: &mut StdRng, like: &Tensor, p: usize, scale: f64) -> Result<Tensor> {
    let (h, _, d) = like.dims3()?;
    let v = normals(rng, h * p * d);
    let t = Tensor::from_vec(v, (h, p, d), like.device())?;
    Ok(t.affine(scale, 0.0)?.to_dtype(like.dtype())?)
}

/// `n` ids from [`SAMPLED_CHUNKS`] windows of `ids` at random offsets (whole windows, in the
/// order drawn; the last window takes the remainder).
fn sampled_ids(rng: &mut StdRng, ids: Option<&[u32]>, n: usize, what: &str) -> Result<Vec<u32>> {
    let ids = text_ids(ids, n, what).map(|_| ids.unwrap_or_default())?;
    let mut out = Vec::with_capacity(n);
    let per = n.div_ceil(SAMPLED_CHUNKS);
    while out.len() < n {
        let len = per.min(n - out.len());
        let start = rng.random_range(0..=ids.len() - len);
        out.extend_from_slice(&ids[start..start + len]);
    }
    Ok(out)
}

fn text_ids<'a>(ids: Option<&'a [u32]>, n: usize, what: &str) -> Result<&'a [u32]> {
    let ids = ids.ok_or_else(|| {
        Error::Config(format!(
            "{what} initialisation from corpus text needs the corpus token ids"
        ))
    })?;
    ids.get(..n).ok_or_else(|| {
        Error::Config(format!(
            "{what} of {n} tokens initialised from corpus text, but the corpus has only {} tokens",
            ids.len()
        ))
    })
}

/// The initial KV cartridge of `p` slots (positions `0..p-1`).
pub fn init_kv(
    model: &Transformer,
    p: usize,
    kind: InitKind,
    corpus_ids: Option<&[u32]>,
    seed: u64,
) -> Result<PrefixKv> {
    if p == 0 {
        return Err(Error::Config("a cartridge needs at least one token".into()));
    }
    let vocab = model.config().vocab_size;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1A17_CA27);
    match kind {
        InitKind::CorpusText => Ok(model.prefix_kv(None, text_ids(corpus_ids, p, "a cartridge")?)?),
        InitKind::RandomText => Ok(model.prefix_kv(None, &random_ids(&mut rng, p, vocab))?),
        InitKind::SampledChunks => {
            Ok(model.prefix_kv(None, &sampled_ids(&mut rng, corpus_ids, p, "a cartridge")?)?)
        }
        InitKind::RandomVectors => {
            let probe = model.prefix_kv(None, &random_ids(&mut rng, SCALE_PROBE_TOKENS, vocab))?;
            let layers = probe
                .layers()
                .iter()
                .map(|(k, v)| {
                    Ok((
                        gaussian_like(&mut rng, k, p, std_of(k)?)?,
                        gaussian_like(&mut rng, v, p, std_of(v)?)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(PrefixKv::new(layers)?)
        }
    }
}

/// The initial soft prompt `[n, hidden]`.
pub fn init_soft_prompt(
    model: &Transformer,
    n: usize,
    kind: InitKind,
    corpus_ids: Option<&[u32]>,
    seed: u64,
) -> Result<Tensor> {
    if n == 0 {
        return Err(Error::Config(
            "a soft prompt needs at least one token".into(),
        ));
    }
    let emb = model.embedding_matrix();
    let vocab = model.config().vocab_size;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x50F7_960E);
    let rows = |ids: &[u32]| -> Result<Tensor> {
        let ids = Tensor::from_vec(ids.to_vec(), ids.len(), emb.device())?;
        Ok(emb.index_select(&ids, 0)?.to_dtype(DType::F32)?)
    };
    match kind {
        InitKind::CorpusText => rows(text_ids(corpus_ids, n, "a soft prompt")?),
        InitKind::RandomText => rows(&random_ids(&mut rng, n, vocab)),
        InitKind::SampledChunks => rows(&sampled_ids(&mut rng, corpus_ids, n, "a soft prompt")?),
        InitKind::RandomVectors => {
            let hidden = model.config().hidden_size;
            let scale = std_of(emb)?;
            let v = normals(&mut rng, n * hidden);
            Ok(Tensor::from_vec(v, (n, hidden), emb.device())?.affine(scale, 0.0)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_windows_come_from_the_text() {
        let text: Vec<u32> = (100..200).collect();
        let ids = sampled_ids(&mut StdRng::seed_from_u64(1), Some(&text), 10, "x").unwrap();
        assert_eq!(ids.len(), 10);
        // Windows of 3, 3, 3, 1 consecutive ids.
        for w in [&ids[0..3], &ids[3..6], &ids[6..9]] {
            assert!(w[1] == w[0] + 1 && w[2] == w[1] + 1, "{ids:?}");
        }
        assert!(sampled_ids(&mut StdRng::seed_from_u64(1), Some(&text[..5]), 10, "x").is_err());
        assert!(sampled_ids(&mut StdRng::seed_from_u64(1), None, 10, "x").is_err());
    }

    #[test]
    fn normals_are_seeded_and_standard() {
        let a = normals(&mut StdRng::seed_from_u64(3), 20_001);
        let b = normals(&mut StdRng::seed_from_u64(3), 20_001);
        assert_eq!(a, b);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
