//! Initial values of the trained parameters (Eyuboglu et al. 2025, §4.3 ablation: the KV of the
//! corpus's first `p` tokens beats random text and random vectors; DESIGN.md §5).
//!
//! Everything here is seeded: the same settings give the same starting bytes, which exact resume
//! and reproducible builds rely on. Random normals come from our own Box-Muller over a seeded
//! `StdRng` because candle's `randn` draws from an unseeded thread RNG.

use candle_core::{DType, Device, Tensor};
use cartridge_runtime::{PrefixKv, Transformer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::coverage::{coverage_pick, SegmentReads};
use crate::error::{Error, Result};
use crate::key_fit::Observed;
use crate::value_fit::{NormalEquations, Observers, RIDGE};

/// How the parameters start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitKind {
    /// The KV (or embeddings) of the first tokens of the corpus text the caller passes.
    CorpusText,
    /// The KV (or embeddings) of uniformly random token ids.
    RandomText,
    /// Gaussian vectors with the per-layer scale of real K and V (or of the embeddings).
    RandomVectors,
    /// The KV (or embeddings) of [`SAMPLED_CHUNKS`] windows of the corpus text at seeded random
    /// offsets, concatenated (positions `0..p-1` over the concatenation).
    SampledChunks,
    /// The `p` keys (and their values) of the whole corpus that best cover what a question after
    /// it reads, chosen per layer and KV head and moved to positions `0..p-1` in their corpus
    /// order (KV-cache compression as a starting point; see [`select_corpus_kv`]). Slot 0 keeps the
    /// first token of the ids the caller passes, the attention sink (the CLI passes the teacher's
    /// system message around the corpus, so that is the chat template's first token). The
    /// default: it starts closer to the corpus in context than [`InitKind::CorpusText`] and stays
    /// ahead after training (BENCHMARKS.md, "Training").
    #[default]
    SelectedKeys,
    /// [`InitKind::SelectedKeys`]' keys at their distances in the corpus, with each key's value
    /// refitted so that the few keys read what the whole corpus read ([`crate::value_fit`]): one
    /// more forward over the corpus.
    SelectedFitted,
    /// [`InitKind::SelectedFitted`] with the keys then refined by gradient descent against the
    /// value fit's observers, the fitted values held ([`crate::key_fit`]).
    SelectedRefined,
    /// Parameters the caller made before and passes in [`crate::RunOptions::initial`]: a
    /// cartridge or soft prompt to train further, or an expensive start computed once and
    /// reused (the CLI's `--init-from F.cart`).
    Given,
}

/// The parameters a [`InitKind::Given`] run starts from.
#[derive(Debug, Clone)]
pub enum InitialParams {
    /// A KV cartridge of the run's `p` slots.
    Kv(PrefixKv),
    /// Soft-prompt embeddings `[n, hidden]`.
    SoftPrompt(Tensor),
}

/// Windows drawn by [`InitKind::SampledChunks`].
pub const SAMPLED_CHUNKS: usize = 4;

/// Longest corpus segment scored in one forward by [`InitKind::SelectedKeys`] (the model's window
/// when smaller): attention statistics cost grows with the square of it.
pub const SELECT_SEGMENT_TOKENS: usize = 8192;

/// Corpus tokens [`InitKind::SelectedKeys`] scores at most; a longer corpus contributes evenly
/// spaced segments up to this many tokens, which keeps the start of a build bounded.
pub const SELECT_MAX_TOKENS: usize = 65_536;

/// Observer tokens the key selection reads from at most, spread evenly over the segments: every
/// observer's reads of its segment are held at once, per head (`groups x tokens x segment` f32).
pub const COVERAGE_OBSERVER_TOKENS: usize = 8192;

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

/// A part of the corpus-selected starts, as reported while it runs (quenmar's 512-token
/// [`InitKind::SelectedRefined`] start takes about 10 minutes on 2 CPU cores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitStage {
    /// Choosing each layer's keys (counted in layers).
    SelectKeys,
    /// Refitting the values: one forward per corpus segment (counted in segments).
    FitValues,
    /// Refining the keys by gradient descent (counted in layer x KV head).
    RefineKeys,
}

impl InitStage {
    /// What [`InitProgress::done`] counts.
    pub fn unit(self) -> &'static str {
        match self {
            Self::SelectKeys => "layers",
            Self::FitValues => "segments",
            Self::RefineKeys => "heads",
        }
    }
}

/// How far a start has come: `done` of `total` units of `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InitProgress {
    /// The part running.
    pub stage: InitStage,
    /// Units finished.
    pub done: usize,
    /// Units of this part.
    pub total: usize,
}

/// The initial KV cartridge of `p` slots (positions `0..p-1`).
pub fn init_kv(
    model: &Transformer,
    p: usize,
    kind: InitKind,
    corpus_ids: Option<&[u32]>,
    seed: u64,
) -> Result<PrefixKv> {
    init_kv_reporting(model, p, kind, corpus_ids, seed, &mut |_| {})
}

/// [`init_kv`], telling `progress` how far the corpus-selected starts have come.
pub fn init_kv_reporting(
    model: &Transformer,
    p: usize,
    kind: InitKind,
    corpus_ids: Option<&[u32]>,
    seed: u64,
    progress: &mut dyn FnMut(InitProgress),
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
        InitKind::SelectedKeys | InitKind::SelectedFitted | InitKind::SelectedRefined => {
            let ids = corpus_ids.ok_or_else(|| {
                Error::Config("selected-keys initialisation needs the corpus token ids".into())
            })?;
            let fit = match kind {
                InitKind::SelectedFitted => Fit::Values,
                InitKind::SelectedRefined => Fit::Refined,
                _ => Fit::None,
            };
            select_corpus_kv_reporting(model, p, ids, fit, progress)
        }
        InitKind::Given => Err(given_elsewhere()),
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

fn given_elsewhere() -> Error {
    Error::Config("a given start comes with the run (RunOptions::initial), not from init".into())
}

/// What [`select_corpus_kv`] fits to the selected keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Nothing: each key keeps its own value.
    None,
    /// The values ([`InitKind::SelectedFitted`]).
    Values,
    /// The values, then the keys by gradient descent ([`InitKind::SelectedRefined`]).
    Refined,
}

/// The `p` corpus keys per layer and KV head that best cover what a question after the corpus
/// reads, as a cartridge.
///
/// The corpus runs in segments of at most [`SELECT_SEGMENT_TOKENS`]. Its observers are the
/// segment's queries moved to the segment's end, where they see every key, as a question after
/// the corpus would ([`Transformer::move_queries`]; at most [`COVERAGE_OBSERVER_TOKENS`] tokens,
/// evenly spaced). Slot 0 is the corpus's first token (the attention sink); the other `p - 1`
/// slots are each head's keys chosen greedily for coverage of those observers' reads
/// ([`crate::coverage`]), in corpus order, moved from their segment positions to `1..p`
/// ([`Transformer::move_keys`]). Heads choose independently: attention is per head, so slot `j`
/// need not be the same token in every head. The values keep what the whole segment put in them,
/// which the first `p` tokens alone never see. (Ranking keys by the attention they receive on
/// average instead: tidewright's answer log-likelihood -5.514 against -5.245, -4.924 against
/// -4.770 fitted; scoring by the causal read, each query where it was, did worse still;
/// BENCHMARKS.md.)
///
/// With a [`Fit`], the values are refitted ([`crate::value_fit`]) and the keys instead keep
/// their distances to the end of their segment ([`keep_corpus_distances`]): the fit reproduces
/// the reads of queries at the corpus's own distances, and the cartridge serves it best at those.
/// (Measured on quenmar's questions: -4.562 against -4.631 with the keys at `1..p`. Without the
/// fit, `1..p` wins: -4.830 against -4.986.)
///
/// Observing from the training conversations instead (placed after the corpus, as SnapKV
/// observes from the question) was measured and lost on both held-out metrics (BENCHMARKS.md).
pub fn select_corpus_kv(
    model: &Transformer,
    p: usize,
    corpus: &[u32],
    fit: Fit,
) -> Result<PrefixKv> {
    select_corpus_kv_reporting(model, p, corpus, fit, &mut |_| {})
}

/// [`select_corpus_kv`], telling `progress` after each layer selected, segment fitted and head
/// refined.
pub fn select_corpus_kv_reporting(
    model: &Transformer,
    p: usize,
    corpus: &[u32],
    fit: Fit,
    progress: &mut dyn FnMut(InitProgress),
) -> Result<PrefixKv> {
    if corpus.len() < p {
        return Err(Error::Config(format!(
            "a cartridge of {p} tokens selected from the corpus, but the corpus has only {} tokens",
            corpus.len()
        )));
    }
    let cfg = model.config();
    let groups = cfg.num_attention_heads / cfg.num_kv_heads;
    let segment_len = SELECT_SEGMENT_TOKENS.min(cfg.max_position_embeddings);
    let all: Vec<&[u32]> = corpus.chunks(segment_len).collect();
    // Evenly spaced segments when the corpus is longer than the budget.
    let keep = (SELECT_MAX_TOKENS / segment_len).clamp(1, all.len());
    let chosen_segments: Vec<&[u32]> = (0..keep).map(|i| all[i * all.len() / keep]).collect();
    let observer_tokens = (COVERAGE_OBSERVER_TOKENS / keep).max(1);
    // Per segment: its K/V and, per layer, its observers' queries moved to its end.
    let mut segments: Vec<(PrefixKv, Vec<Tensor>)> = Vec::with_capacity(keep);
    for &seg in &chosen_segments {
        let (kv, queries) = model.kv_and_queries(seg)?;
        let rows = observer_rows(seg.len(), groups, observer_tokens, model.device())?;
        let at_end = queries
            .iter()
            .map(|q| {
                let moved = model.move_queries(q, seg.len(), seg.len() as u32 - 1)?;
                Ok(moved.index_select(&rows, 1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        segments.push((kv, at_end));
    }
    let segment_lens: Vec<usize> = chosen_segments.iter().map(|s| s.len()).collect();
    let mut layers = Vec::with_capacity(cfg.num_layers);
    // Per layer and KV head, the (segment, position) of each slot's key.
    let mut picks: Vec<Vec<Vec<(usize, usize)>>> = Vec::with_capacity(cfg.num_layers);
    // Per layer, the selected keys where they were computed (only for [`Fit::Refined`]).
    let mut frame_keys = Vec::new();
    // Each part reports once as it starts (0 done), so that a display shows it at once.
    progress(InitProgress {
        stage: InitStage::SelectKeys,
        done: 0,
        total: cfg.num_layers,
    });
    for li in 0..cfg.num_layers {
        let mut keys = Vec::with_capacity(cfg.num_kv_heads);
        let mut values = Vec::with_capacity(cfg.num_kv_heads);
        let mut slots = Vec::with_capacity(cfg.num_kv_heads);
        for h in 0..cfg.num_kv_heads {
            let reads = segments
                .iter()
                .map(|(kv, queries)| {
                    SegmentReads::new(&queries[li].get(h)?, &kv.layers()[li].0.get(h)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let head_slots: Vec<(usize, usize)> = std::iter::once((0, 0))
                .chain(coverage_pick(&reads, p - 1)?)
                .collect();
            let (mut ks, mut vs) = (Vec::with_capacity(p), Vec::with_capacity(p));
            for &(segment, position) in &head_slots {
                let (k, v) = segments[segment].0.layers()[li].clone();
                ks.push(k.narrow(0, h, 1)?.narrow(1, position, 1)?);
                vs.push(v.narrow(0, h, 1)?.narrow(1, position, 1)?);
            }
            keys.push(Tensor::cat(&ks, 1)?);
            values.push(Tensor::cat(&vs, 1)?);
            slots.push(head_slots);
        }
        let keys = Tensor::cat(&keys, 0)?;
        if fit == Fit::Refined {
            frame_keys.push(keys.clone());
        }
        let k = if fit != Fit::None {
            keep_corpus_distances(model, &keys, &slots, &segment_lens, p)?
        } else {
            let from: Vec<Vec<u32>> = slots
                .iter()
                .map(|head| head.iter().map(|&(_, pos)| pos as u32).collect())
                .collect();
            let to: Vec<u32> = (0..p as u32).collect();
            model.move_keys(&keys, &from, &to)?
        };
        layers.push((k, Tensor::cat(&values, 0)?));
        picks.push(slots);
        progress(InitProgress {
            stage: InitStage::SelectKeys,
            done: li + 1,
            total: cfg.num_layers,
        });
    }
    // The fits run their own forwards; the observers' queries are not needed any more.
    drop(segments);
    match fit {
        Fit::None => {}
        Fit::Values => refit_values(model, &chosen_segments, &picks, &mut layers, None, progress)?,
        Fit::Refined => {
            let mut observed: Vec<Vec<Observed>> = (0..cfg.num_layers)
                .map(|_| (0..cfg.num_kv_heads).map(|_| Observed::default()).collect())
                .collect();
            refit_values(
                model,
                &chosen_segments,
                &picks,
                &mut layers,
                Some(&mut observed),
                progress,
            )?;
            let heads = cfg.num_layers * cfg.num_kv_heads;
            progress(InitProgress {
                stage: InitStage::RefineKeys,
                done: 0,
                total: heads,
            });
            for (li, layer) in layers.iter_mut().enumerate() {
                let mut keys = Vec::with_capacity(cfg.num_kv_heads);
                for (h, obs) in observed[li].iter().enumerate() {
                    let start = frame_keys[li].get(h)?;
                    keys.push(match obs.read_error(&picks[li][h])? {
                        Some(error) => error.refine(&start, &layer.1.get(h)?)?,
                        None => start,
                    });
                    progress(InitProgress {
                        stage: InitStage::RefineKeys,
                        done: li * cfg.num_kv_heads + h + 1,
                        total: heads,
                    });
                }
                let keys = Tensor::stack(&keys, 0)?;
                layer.0 = keep_corpus_distances(model, &keys, &picks[li], &segment_lens, p)?;
            }
        }
    }
    Ok(PrefixKv::new(layers)?)
}

/// Row indices of [`Transformer::kv_and_queries`]' queries (rows ordered (group, token)) for at
/// most `tokens` evenly spaced tokens of an `n`-token segment, every query head of the group.
fn observer_rows(n: usize, groups: usize, tokens: usize, device: &Device) -> Result<Tensor> {
    let m = tokens.min(n);
    let rows: Vec<u32> = (0..groups)
        .flat_map(|g| (0..m).map(move |i| (g * n + i * n / m) as u32))
        .collect();
    Ok(Tensor::new(rows.as_slice(), device)?)
}

/// Keys `[kv_heads, p, d]` computed at their corpus positions, moved back by `len - p` (`len`:
/// the length of the key's segment), so that a prompt at position `p` sees each at the distance
/// the question after its segment would: the fitted values reproduce reads at those distances.
fn keep_corpus_distances(
    model: &Transformer,
    keys: &Tensor,
    slots: &[Vec<(usize, usize)>],
    segment_lens: &[usize],
    p: usize,
) -> Result<Tensor> {
    // RoPE is relative: moving every key from `len - p + base` to `base` moves it back by
    // `len - p`; `base` keeps both positions non-negative when a segment is shorter than `p`.
    let base = segment_lens
        .iter()
        .map(|&len| p.saturating_sub(len))
        .max()
        .unwrap_or(0);
    let from: Vec<Vec<u32>> = slots
        .iter()
        .map(|head| {
            head.iter()
                .map(|&(segment, _)| (segment_lens[segment] + base - p) as u32)
                .collect()
        })
        .collect();
    Ok(model.move_keys(keys, &from, &vec![base as u32; p])?)
}

/// Replaces each selected key's value by the least-squares fit of [`crate::value_fit`]: one more
/// forward per segment, for its queries (the selection's forwards do not keep them: a segment's
/// queries take 1.5x the memory of its K/V, which the selection already holds for every segment).
/// With `observed`, each head's observers are also kept there for [`crate::key_fit`].
fn refit_values(
    model: &Transformer,
    segments: &[&[u32]],
    picks: &[Vec<Vec<(usize, usize)>>],
    layers: &mut [(Tensor, Tensor)],
    mut observed: Option<&mut Vec<Vec<Observed>>>,
    progress: &mut dyn FnMut(InitProgress),
) -> Result<()> {
    let cfg = model.config();
    let groups = cfg.num_attention_heads / cfg.num_kv_heads;
    let mut equations: Vec<Vec<Option<NormalEquations>>> = (0..cfg.num_layers)
        .map(|_| (0..cfg.num_kv_heads).map(|_| None).collect())
        .collect();
    progress(InitProgress {
        stage: InitStage::FitValues,
        done: 0,
        total: segments.len(),
    });
    for (si, seg) in segments.iter().enumerate() {
        let (kv, queries) = model.kv_and_queries(seg)?;
        for (li, ((k, v), q)) in kv.layers().iter().zip(&queries).enumerate() {
            let at_end = model.move_queries(q, seg.len(), seg.len() as u32 - 1)?;
            for (h, eq) in equations[li].iter_mut().enumerate() {
                let chosen: Vec<Option<usize>> = picks[li][h]
                    .iter()
                    .map(|&(segment, position)| (segment == si).then_some(position))
                    .collect();
                let (k, v) = (k.get(h)?, v.get(h)?);
                for (q, observers) in [(q, Observers::InPlace), (&at_end, Observers::AtEnd)] {
                    let q = q.get(h)?;
                    if let Some(obs) = observed.as_deref_mut() {
                        obs[li][h].add(&q, &k, &v, si, observers == Observers::AtEnd)?;
                    }
                    *eq = NormalEquations::add(eq.take(), &q, &k, &v, &chosen, groups, observers)?;
                }
            }
        }
        progress(InitProgress {
            stage: InitStage::FitValues,
            done: si + 1,
            total: segments.len(),
        });
    }
    for (layer, eqs) in layers.iter_mut().zip(equations) {
        let mut values = Vec::with_capacity(eqs.len());
        for (h, eq) in eqs.iter().enumerate() {
            let v0 = layer.1.get(h)?;
            values.push(match eq {
                Some(eq) => eq.solve(&v0, RIDGE)?,
                None => v0,
            });
        }
        layer.1 = Tensor::stack(&values, 0)?;
    }
    Ok(())
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
        // Selected keys have no counterpart among input embeddings (a key depends on its whole
        // context): with the default kind, a soft prompt starts from the corpus's first tokens.
        InitKind::CorpusText
        | InitKind::SelectedKeys
        | InitKind::SelectedFitted
        | InitKind::SelectedRefined => rows(text_ids(corpus_ids, n, "a soft prompt")?),
        InitKind::RandomText => rows(&random_ids(&mut rng, n, vocab)),
        InitKind::Given => Err(given_elsewhere()),
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
    fn observer_rows_are_evenly_spaced_tokens_of_every_group() {
        let rows = |n, tokens| {
            observer_rows(n, 2, tokens, &Device::Cpu)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
        };
        assert_eq!(rows(10, 4), vec![0, 2, 5, 7, 10, 12, 15, 17]);
        assert_eq!(rows(3, 8), vec![0, 1, 2, 3, 4, 5]);
    }

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
