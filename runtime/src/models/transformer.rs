//! The decoder shared by Llama, Qwen2 and Qwen3: pre-norm blocks of grouped-query attention
//! (Ainslie et al. 2023, "GQA") with rotary embeddings (Su et al. 2021) and a SwiGLU MLP (Shazeer
//! 2020), RMSNorm everywhere, as in the Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` /
//! `Qwen3ForCausalLM` reference implementations. Tensor names follow the Hugging Face checkpoints.
//!
//! What differs from those references, and why:
//! - Every forward takes a resolved prefix ([`PrefixKv`]: cartridges + soft prompts) whose K/V are
//!   shared by the whole batch, and an optional caller-owned [`KvCache`]. Attention runs over the
//!   two sources with one joint softmax (shared max, summed denominators), so the prefix is never
//!   copied per sequence nor concatenated with the cache.
//! - Grouped-query attention never repeats K/V: queries are reshaped to
//!   `[b, kv_heads, groups * t, d]` so one KV head serves its group in one matmul.
//! - On the CPU in f32/f64, a forward of several tokens (prefill, training, scoring) runs
//!   attention as one fused op with its own backward ([`crate::attention`]); decoding one token
//!   per sequence, and other devices and dtypes, use the composed ops.
//! - [`Path::Train`] uses only differentiable ops so gradients reach prefix K/V and soft prompts;
//!   [`Path::Infer`] uses candle's fused RMSNorm (and, off the CPU, its RoPE). On the CPU, RoPE
//!   is our fused op on both paths: with the move to heads-first layout and the query scaling in
//!   the same pass ([`crate::ops::rope_heads_first`]).
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use cartridge_runtime::{safetensors_dir, Logits, Path, PrefixStack};
//!
//! # fn main() -> cartridge_runtime::Result<()> {
//! let (_cfg, model) =
//!     safetensors_dir::load_model("model-dir".as_ref(), DType::F32, &Device::Cpu)?;
//! // A cartridge from the KV of some corpus tokens (keys post-RoPE at positions 0..p-1).
//! let cart = model.prefix_kv(None, &[1, 42, 7, 99])?;
//! let prefix = PrefixStack::new().with_cartridge(cart).resolve(&model, Path::Infer)?;
//! // The user's tokens start at position 4; decode with a cache the caller owns.
//! let mut cache = model.new_cache(1);
//! let ids = Tensor::new(&[[5u32, 6, 7]], &Device::Cpu)?;
//! let logits = model.forward(prefix.as_ref(), Some(&mut cache), &ids, Logits::Last, Path::Infer)?;
//! assert_eq!(logits.dims(), &[1, model.config().vocab_size]);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::attention::{self, Visibility};
use crate::decode_attention;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::models::config::{Architecture, ModelConfig};
use crate::ops::{self, Path, RopeScaling, RopeTables};
use crate::prefix::{PrefixKv, PrefixLayer};
use crate::small_matmul;

/// How a forward's attention knows what each query may see.
enum Masking {
    /// The fused CPU op ([`attention::attention`]), told by ranges.
    Fused(Arc<Visibility>),
    /// One token per sequence on the inference path, on the CPU
    /// ([`decode_attention::decode_attention`]): sequence `b` sees its slots from `pads[b]` on.
    Decode(Vec<usize>),
    /// Composed candle ops with an additive mask (`None`: nothing masked).
    Additive(Option<Tensor>),
}

/// The architecture-specific switches of the shared decoder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Quirks {
    /// Bias on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm over each query/key head before RoPE (Qwen3).
    pub qk_norm: bool,
}

fn quirks(arch: Architecture) -> Quirks {
    match arch {
        Architecture::Llama => super::llama::QUIRKS,
        Architecture::Qwen2 => super::qwen2::QUIRKS,
        Architecture::Qwen3 => super::qwen3::QUIRKS,
    }
}

/// Tokens (summed over the batch) per forward when an inference prefill is chunked.
const PREFILL_CHUNK_TOKENS: usize = 512;

/// Which logits a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `[b, t, vocab]`: every position (training, scoring).
    All,
    /// `[b, vocab]`: the last position only (decoding; with left padding it is every sequence's
    /// newest token).
    Last,
    /// `[b, t, hidden]`: the final-normed hidden states of every position, without the LM head
    /// (for a fused LM-head + loss that never materialises `[tokens, vocab]`; multiply by
    /// [`Transformer::lm_head_weight`]`^T` to get logits).
    Hidden,
    /// No LM head at all (computing K/V only).
    None,
}

/// Fetch one weight, turning a missing or misshapen tensor into an error naming it.
fn weight<S: Into<candle_core::Shape>>(vb: &VarBuilder, shape: S, name: &str) -> Result<Tensor> {
    vb.get(shape, name).map_err(|e| Error::Weight {
        name: format!("{}{}", prefix_of(vb), name),
        message: e.to_string(),
    })
}

fn prefix_of(vb: &VarBuilder) -> String {
    let p = vb.prefix();
    if p.is_empty() {
        p
    } else {
        format!("{p}.")
    }
}

/// Rows (batch x tokens) up to which an inference matmul uses the quantised weight when there is
/// one. Decoding one or two sequences is memory-bound, so reading 4x fewer weight bytes wins;
/// from three rows on, the packed f32 kernel is faster than candle's quantised one (BENCHMARKS.md,
/// decode tok/s quantised / f32: 97 / 45 at batch 1, 113 / 92 at 2, 119 / 128 at 3, 133 / 342
/// at 8; measured on AVX-512, and kept for the AVX2 kernel without a measurement there). Where
/// there is no packed kernel (neither AVX-512 nor AVX2), candle's f32 gemm is slower at small
/// batches, so the limit is higher there.
fn quant_max_rows() -> usize {
    if small_matmul::has_packed_kernel() {
        2
    } else {
        16
    }
}

/// Rows (batch x tokens) up to which an f32 inference matmul on the CPU runs as `(W x^T)^T`.
/// candle's gemm tiles the rows of its left operand 64 at a time (AVX-512), so `x W^T` with a few
/// rows leaves most of every tile empty; with W on the left the weight's rows fill the tiles. On
/// SmolLM2's shapes (2 cores) the projections run 1.45-5.6x faster at 8-32 rows and the LM head
/// 1.15x, so decoding 8-32 sequences is 1.5-2.1x faster (BENCHMARKS.md); from 64 rows on the LM
/// head gets slower, and one row is a matrix-vector product either way. The values are the same.
/// Where the CPU has AVX-512 or AVX2, inference matmuls of any number of rows go to our own kernel
/// instead, on a copy of the weight packed once for it ([`small_matmul::PackedWeight`]).
const SMALL_ROWS: usize = 32;

/// candle 0.11 has SIMD dot products for Q4_0, Q8_0 and the k-quants, but only scalar code for
/// Q4_1/Q5_0/Q5_1 (4x slower than f32 here). Those are re-quantised once to Q8_0: 8.5 bits per
/// weight (still 3.8x fewer bytes than f32), with a rounding error below the original 4-5 bits'.
fn fast_quant(q: QTensor) -> Result<QTensor> {
    use candle_core::quantized::GgmlDType;
    match q.dtype() {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let w = q.dequantize(&q.device())?;
            Ok(QTensor::quantize(&w, GgmlDType::Q8_0)?)
        }
        _ => Ok(q),
    }
}

/// `y = x W^T (+ b)` with a frozen weight `[out, in]`, optionally also held quantised (GGUF) for
/// the inference path.
#[derive(Debug, Clone)]
struct Linear {
    w: Tensor,
    b: Option<Tensor>,
    q: Option<QMatMul>,
    /// The weight packed for our CPU kernel, made the first time this layer runs an inference
    /// forward on the CPU (`None` inside where the kernel does not apply). Training never makes
    /// it, so only inference pays its memory (one more copy of the f32 weights).
    packed: OnceLock<Option<Arc<small_matmul::PackedWeight>>>,
    /// `W^T` packed the same way, for the training path's backward (`grad W`); made the first
    /// time this layer runs a training forward.
    packed_t: OnceLock<Option<Arc<small_matmul::PackedWeight>>>,
}

impl Linear {
    fn load(vb: &VarBuilder, out: usize, inp: usize, name: &str, bias: bool) -> Result<Self> {
        let w = weight(vb, (out, inp), &format!("{name}.weight"))?;
        let b = if bias {
            Some(weight(vb, out, &format!("{name}.bias"))?)
        } else {
            None
        };
        Ok(Self {
            w,
            b,
            q: None,
            packed: OnceLock::new(),
            packed_t: OnceLock::new(),
        })
    }

    /// The packed weight, packed on first use.
    fn packed(&self) -> Result<Option<Arc<small_matmul::PackedWeight>>> {
        packed_once(&self.packed, || Ok(self.w.clone()))
    }

    /// The packed weight and its packed transpose, packed on first use.
    fn packed_pair(&self) -> Result<Option<small_matmul::PackedLinear>> {
        let (Some(w), Some(wt)) = (
            self.packed()?,
            packed_once(&self.packed_t, || Ok(self.w.t()?))?,
        ) else {
            return Ok(None);
        };
        Ok(Some(small_matmul::PackedLinear::new(w, wt)))
    }

    fn forward(&self, x: &Tensor, path: Path) -> Result<Tensor> {
        // Fold batch and time into the rows of one 2-D matmul: a single large gemm instead of a
        // batch of small ones, and no broadcast copy of the weight.
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, inp))?;
        let y = match &self.q {
            Some(q) if path == Path::Infer && rows <= quant_max_rows() => {
                q.forward(&x2.contiguous()?)?
            }
            _ if path == Path::Infer && x.device().is_cpu() => match self.packed()? {
                // Our kernel on the packed weight where the CPU has AVX-512 or AVX2 (see small_matmul).
                Some(packed) => small_matmul::linear(&x2, &packed)?,
                None if (2..=SMALL_ROWS).contains(&rows) => {
                    self.w.matmul(&x2.t()?)?.t()?.contiguous()?
                }
                None => ops::frozen_linear(&x2, &self.w, path)?,
            },
            _ if path == Path::Train && x.device().is_cpu() => match self.packed_pair()? {
                // The same kernel forward and backward (see small_matmul::PackedLinear).
                Some(op) => x2.contiguous()?.apply_op1(op)?,
                None => ops::frozen_linear(&x2, &self.w, path)?,
            },
            _ => ops::frozen_linear(&x2, &self.w, path)?,
        };
        let y = match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.w.dim(0)?;
        Ok(y.reshape(out)?)
    }
}

/// The content of `cell`, packing `weight()` on first use (`None` inside where the kernel does not
/// apply).
fn packed_once(
    cell: &OnceLock<Option<Arc<small_matmul::PackedWeight>>>,
    weight: impl FnOnce() -> Result<Tensor>,
) -> Result<Option<Arc<small_matmul::PackedWeight>>> {
    if let Some(p) = cell.get() {
        return Ok(p.clone());
    }
    let p = small_matmul::PackedWeight::new(&weight()?)?.map(Arc::new);
    // Two threads may pack at once; both results are the same, one is kept.
    Ok(cell.get_or_init(|| p).clone())
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A Llama / Qwen2 / Qwen3 decoder with a prefix stack.
#[derive(Debug, Clone)]
pub struct Transformer {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: RopeTables,
    dtype: DType,
    device: Device,
}

impl Transformer {
    /// Load from Hugging Face tensor names (`model.embed_tokens.weight`, `model.layers.{i}...`,
    /// `model.norm.weight`, `lm_head.weight` unless tied). Works with any `VarBuilder`: mmapped
    /// safetensors, or `VarBuilder::from_tensors` over a GGUF loader's de-permuted tensors.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let q = quirks(cfg.architecture);
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim);
        let hidden = cfg.hidden_size;
        let inter = cfg.intermediate_size;
        let m = vb.pp("model");
        let embed = weight(&m, (cfg.vocab_size, hidden), "embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = m.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let mlp = l.pp("mlp");
            layers.push(Layer {
                input_norm: weight(&l, hidden, "input_layernorm.weight")?,
                post_norm: weight(&l, hidden, "post_attention_layernorm.weight")?,
                q: Linear::load(&a, h * d, hidden, "q_proj", q.qkv_bias)?,
                k: Linear::load(&a, kv * d, hidden, "k_proj", q.qkv_bias)?,
                v: Linear::load(&a, kv * d, hidden, "v_proj", q.qkv_bias)?,
                o: Linear::load(&a, hidden, h * d, "o_proj", false)?,
                q_norm: if q.qk_norm {
                    Some(weight(&a, d, "q_norm.weight")?)
                } else {
                    None
                },
                k_norm: if q.qk_norm {
                    Some(weight(&a, d, "k_norm.weight")?)
                } else {
                    None
                },
                gate: Linear::load(&mlp, inter, hidden, "gate_proj", false)?,
                up: Linear::load(&mlp, inter, hidden, "up_proj", false)?,
                down: Linear::load(&mlp, hidden, inter, "down_proj", false)?,
            });
        }
        let norm = weight(&m, hidden, "norm.weight")?;
        let lm_head = Linear {
            w: if cfg.tie_word_embeddings {
                embed.clone()
            } else {
                weight(&vb, (cfg.vocab_size, hidden), "lm_head.weight")?
            },
            b: None,
            q: None,
            packed: OnceLock::new(),
            packed_t: OnceLock::new(),
        };
        let scaling = RopeScaling::from_json(cfg.rope_scaling.as_deref())?;
        let rope = RopeTables::new(
            d,
            cfg.rope_theta,
            &scaling,
            cfg.max_position_embeddings,
            vb.dtype(),
            vb.device(),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rope,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The configuration this model was loaded with.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The compute dtype (weights, K/V, logits).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh cache for `batch` sequences without padding.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.cfg.num_layers, batch)
    }

    /// Token embeddings: `[b, t]` ids -> `[b, t, hidden]`.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let flat = tokens.flatten_all()?;
        Ok(self
            .embed
            .index_select(&flat, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Also hold the linear layers (and the LM head) quantised, from a GGUF's still-quantised
    /// tensors under Hugging Face names (`GgufFile::load_quantized`). Inference forwards with at
    /// most 16 rows (decoding a few sequences) then read the quantised weights (`QMatMul`:
    /// activations quantised to 8 bits, integer dot products); training, long prefills and larger
    /// batches keep the f32 weights. Returns how many matrices were attached. Results differ from f32 by the quantisation of activations.
    pub fn attach_quantized(&mut self, mut weights: BTreeMap<String, QTensor>) -> Result<usize> {
        let mut take = |name: &str, linear: &mut Linear| -> Result<usize> {
            let Some(q) = weights.remove(name) else {
                return Ok(0);
            };
            if q.shape().dims() != linear.w.dims() {
                return Err(Error::Weight {
                    name: name.to_string(),
                    message: format!(
                        "quantised shape {:?} differs from {:?}",
                        q.shape().dims(),
                        linear.w.dims()
                    ),
                });
            }
            linear.q = Some(QMatMul::from_qtensor(fast_quant(q)?)?);
            Ok(1)
        };
        let mut n = 0;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            n += take(&format!("{p}.self_attn.q_proj.weight"), &mut l.q)?;
            n += take(&format!("{p}.self_attn.k_proj.weight"), &mut l.k)?;
            n += take(&format!("{p}.self_attn.v_proj.weight"), &mut l.v)?;
            n += take(&format!("{p}.self_attn.o_proj.weight"), &mut l.o)?;
            n += take(&format!("{p}.mlp.gate_proj.weight"), &mut l.gate)?;
            n += take(&format!("{p}.mlp.up_proj.weight"), &mut l.up)?;
            n += take(&format!("{p}.mlp.down_proj.weight"), &mut l.down)?;
        }
        let head = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        n += take(head, &mut self.lm_head)?;
        Ok(n)
    }

    /// The LM head `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head.w
    }

    /// The LM head's products for a hand-written backward (`compiler`'s fused loss): on our packed
    /// CPU kernel where it applies, packing the head (and its transpose) on first use.
    pub fn lm_head_products(&self) -> Result<crate::LinearProducts> {
        Ok(crate::LinearProducts::packed(
            self.lm_head.w.clone(),
            self.lm_head.packed_pair()?,
        ))
    }

    /// The token embedding matrix `[vocab, hidden]` (e.g. to initialise a soft prompt).
    pub fn embedding_matrix(&self) -> &Tensor {
        &self.embed
    }

    /// Forward `tokens: [b, t]` (u32) after `prefix`, appending to `cache` when given.
    ///
    /// Positions start at `prefix.len() + cache.len() - pads[b]`. Without a cache the batch has no
    /// padding. See [`Logits`] for the returned shape; the logits have the model's dtype.
    pub fn forward(
        &self,
        prefix: Option<&PrefixKv>,
        cache: Option<&mut KvCache>,
        tokens: &Tensor,
        logits: Logits,
        path: Path,
    ) -> Result<Tensor> {
        let x = self.embed(tokens)?;
        self.forward_chunked(prefix, cache, x, logits, path)
    }

    /// Inference prefill of many tokens into a cache runs in column chunks: attention then skips
    /// the fully masked upper blocks and the score buffers stay small. Results are identical.
    fn forward_chunked(
        &self,
        prefix: Option<&PrefixKv>,
        cache: Option<&mut KvCache>,
        x: Tensor,
        logits: Logits,
        path: Path,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let chunk = (PREFILL_CHUNK_TOKENS / b.max(1)).max(16);
        let out = match cache {
            Some(cache) if path == Path::Infer && logits == Logits::Last && t > chunk => {
                let mut last = None;
                let mut start = 0;
                while start < t {
                    let len = chunk.min(t - start);
                    let part = x.narrow(1, start, len)?;
                    last = self
                        .run(prefix, Some(&mut *cache), part, logits, path, false)?
                        .0;
                    start += len;
                }
                last
            }
            cache => self.run(prefix, cache, x, logits, path, false)?.0,
        };
        out.ok_or_else(|| Error::Msg("forward asked for no logits".into()))
    }

    /// Like [`Self::forward`] but from input embeddings `[b, t, hidden]` (soft-prompt training,
    /// custom inputs).
    pub fn forward_embeds(
        &self,
        prefix: Option<&PrefixKv>,
        cache: Option<&mut KvCache>,
        embeds: &Tensor,
        logits: Logits,
        path: Path,
    ) -> Result<Tensor> {
        self.forward_chunked(prefix, cache, embeds.clone(), logits, path)
    }

    /// Forward several sequences packed into each row of `tokens: [b, t]` (no cache).
    ///
    /// `segments[r]` lists the lengths of the sequences packed, in order, at the start of row `r`
    /// (their sum may be below `t`: the rest is padding). Every sequence starts at position
    /// `prefix.len()` and sees the whole prefix and, causally, only its own tokens (a
    /// block-diagonal mask), so the result for each sequence equals running it alone — without
    /// the compute a right-padded batch spends on padding.
    pub fn forward_packed(
        &self,
        prefix: Option<&PrefixKv>,
        tokens: &Tensor,
        segments: &[Vec<usize>],
        logits: Logits,
        path: Path,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if segments.len() != b {
            return Err(Error::Msg(format!(
                "{} segment lists for a batch of {b} rows",
                segments.len()
            )));
        }
        if let Some((r, _)) = segments
            .iter()
            .enumerate()
            .find(|(_, s)| s.iter().sum::<usize>() > t || s.contains(&0))
        {
            return Err(Error::Msg(format!(
                "row {r}: packed segments must be non-empty and fit in {t} tokens"
            )));
        }
        let x = self.embed(tokens)?;
        self.run_layout(prefix, None, x, logits, path, false, Some(segments), None)?
            .0
            .ok_or_else(|| Error::Msg("forward asked for no logits".into()))
    }

    /// Per-layer post-RoPE K/V of `tokens` placed after `prefix` (positions `prefix.len()..`),
    /// computed on the inference path. This is how a cartridge is initialised from corpus tokens;
    /// the result covers only `tokens` (compose with `prefix` via [`PrefixKv::concat`]).
    ///
    /// Long texts (a corpus in context) are prefilled through a cache in chunks, so the score
    /// buffers stay `chunk x length` instead of `length x length` and masked blocks are skipped.
    pub fn prefix_kv(&self, prefix: Option<&PrefixKv>, tokens: &[u32]) -> Result<PrefixKv> {
        let ids = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &self.device)?;
        if tokens.len() <= PREFILL_CHUNK_TOKENS {
            let x = self.embed(&ids)?;
            return self.kv_of(prefix, x, Path::Infer);
        }
        let mut cache = self.new_cache(1);
        self.forward(prefix, Some(&mut cache), &ids, Logits::Last, Path::Infer)?;
        cache.to_prefix(0)
    }

    /// Per-layer K/V of `tokens` (positions `0..n-1`) and each layer's scaled post-RoPE queries
    /// `[kv_heads, groups * n, head_dim]`, rows ordered (group, token). One forward of all the
    /// tokens, so they must fit the model's positions.
    pub fn kv_and_queries(&self, tokens: &[u32]) -> Result<(PrefixKv, Vec<Tensor>)> {
        let n = tokens.len();
        let ids = Tensor::from_vec(tokens.to_vec(), (1, n), &self.device)?;
        let x = self.embed(&ids)?;
        let mut queries = Vec::new();
        let (_, kv) = self.run_layout(
            None,
            None,
            x,
            Logits::None,
            Path::Infer,
            true,
            None,
            Some(&mut queries),
        )?;
        let layers = kv
            .into_iter()
            .map(|(k, v)| Ok((k.squeeze(0)?, v.squeeze(0)?)))
            .collect::<Result<Vec<_>>>()?;
        let queries = queries
            .into_iter()
            .map(|q| Ok(q.squeeze(0)?))
            .collect::<Result<Vec<_>>>()?;
        Ok((PrefixKv::new(layers)?, queries))
    }

    /// Post-RoPE keys `[kv_heads, n, head_dim]` moved from the positions they were computed at
    /// (`from[h][j]`: head `h`, slot `j`) to the positions `to[j]`. RoPE rotates each frequency
    /// pair by an angle proportional to the position, so undoing one rotation and applying
    /// another moves a key exactly (up to rounding), without the text that produced it.
    pub fn move_keys(&self, keys: &Tensor, from: &[Vec<u32>], to: &[u32]) -> Result<Tensor> {
        let (kvh, n, _) = keys.dims3()?;
        if from.len() != kvh || from.iter().any(|f| f.len() != n) || to.len() != n {
            return Err(Error::Msg(format!(
                "moving keys {:?}: {} position lists of lengths {:?}, {} targets",
                keys.dims(),
                from.len(),
                from.iter().map(Vec::len).collect::<Vec<_>>(),
                to.len()
            )));
        }
        // Heads as the batch: [kvh, 1, n, d] with per-head angles [kvh, n, d/2].
        let x = keys.unsqueeze(1)?;
        let (cos, sin) = self.rope.gather(from)?;
        let back = ops::rope(&x, &cos, &sin.neg()?, Path::Train)?;
        let (cos, sin) = self.rope.gather(&vec![to.to_vec(); kvh])?;
        Ok(ops::rope(&back, &cos, &sin, Path::Train)?.squeeze(1)?)
    }

    /// Queries `[kv_heads, groups * n, head_dim]` as [`Self::kv_and_queries`] returns them (rows
    /// ordered (group, token), each at its token's position) moved to position `to`: how the
    /// same queries would read from there ([`Self::move_keys`]; RoPE rotates queries and keys
    /// alike).
    pub fn move_queries(&self, queries: &Tensor, tokens: usize, to: u32) -> Result<Tensor> {
        let (kvh, rows, _) = queries.dims3()?;
        if tokens == 0 || rows % tokens != 0 {
            return Err(Error::Msg(format!(
                "moving queries {:?}: rows are not groups of {tokens} tokens",
                queries.dims()
            )));
        }
        let from: Vec<u32> = (0..rows).map(|r| (r % tokens) as u32).collect();
        self.move_keys(queries, &vec![from; kvh], &vec![to; rows])
    }

    /// Per-layer K/V of input embeddings `[n, hidden]` placed after `prefix`. With
    /// [`Path::Train`] the result stays differentiable w.r.t. `embeds` and `prefix`.
    pub fn embeds_kv(
        &self,
        prefix: Option<&PrefixKv>,
        embeds: &Tensor,
        path: Path,
    ) -> Result<PrefixKv> {
        let x = embeds.unsqueeze(0)?;
        self.kv_of(prefix, x, path)
    }

    fn kv_of(&self, prefix: Option<&PrefixKv>, x: Tensor, path: Path) -> Result<PrefixKv> {
        let (_, kv) = self.run(prefix, None, x, Logits::None, path, true)?;
        let layers = kv
            .into_iter()
            .map(|(k, v)| Ok((k.squeeze(0)?, v.squeeze(0)?)))
            .collect::<Result<Vec<_>>>()?;
        PrefixKv::new(layers)
    }

    /// The decoder. `x: [b, t, hidden]`. Returns the requested logits and, when `collect_kv`, the
    /// per-layer `[b, kv_heads, t, head_dim]` K/V of these tokens.
    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        prefix: Option<&PrefixKv>,
        cache: Option<&mut KvCache>,
        x: Tensor,
        logits: Logits,
        path: Path,
        collect_kv: bool,
    ) -> Result<(Option<Tensor>, Vec<(Tensor, Tensor)>)> {
        self.run_layout(prefix, cache, x, logits, path, collect_kv, None, None)
    }

    /// [`Self::run`] with optional packed rows (see [`Self::forward_packed`]; no cache then), and
    /// optionally each layer's scaled post-RoPE queries `[b, kv_heads, groups * t, head_dim]`
    /// pushed to `queries` (for attention statistics).
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn run_layout(
        &self,
        prefix: Option<&PrefixKv>,
        mut cache: Option<&mut KvCache>,
        x: Tensor,
        logits: Logits,
        path: Path,
        collect_kv: bool,
        packed: Option<&[Vec<usize>]>,
        mut queries: Option<&mut Vec<Tensor>>,
    ) -> Result<(Option<Tensor>, Vec<(Tensor, Tensor)>)> {
        let cfg = &self.cfg;
        let (b, t, hidden) = x.dims3()?;
        if t == 0 {
            return Err(Error::Msg("forward needs at least one token".into()));
        }
        if hidden != cfg.hidden_size {
            return Err(Error::Msg(format!(
                "input width {hidden} does not match the model's hidden size {}",
                cfg.hidden_size
            )));
        }
        let prefix = prefix.filter(|p| !p.is_empty());
        if let Some(p) = prefix {
            p.check(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype)?;
        }
        let p_len = prefix.map_or(0, PrefixKv::len);
        let (past, pads) = match cache.as_deref() {
            Some(c) => {
                if c.batch() != b {
                    return Err(Error::Msg(format!(
                        "forward batch {b} does not match the KV cache batch {}",
                        c.batch()
                    )));
                }
                (c.len(), c.pads().to_vec())
            }
            None => (0, vec![0; b]),
        };

        // RoPE angles of the new slots: one shared table slice when nothing is padded, else per
        // sequence (slot s of sequence b is at position P + s - pads[b]).
        let (cos, sin) = if let Some(segments) = packed {
            if cache.is_some() {
                return Err(Error::Msg("packed rows cannot use a KV cache".into()));
            }
            let positions: Vec<Vec<u32>> = segments
                .iter()
                .map(|segs| {
                    let mut row: Vec<u32> = segs
                        .iter()
                        .flat_map(|&len| (0..len).map(|i| (p_len + i) as u32))
                        .collect();
                    row.resize(t, p_len as u32);
                    row
                })
                .collect();
            self.rope.gather(&positions)?
        } else if pads.iter().all(|&p| p == 0) {
            self.rope.range(p_len + past, t)?
        } else {
            let positions: Vec<Vec<u32>> = pads
                .iter()
                .map(|&pad| {
                    (0..t)
                        .map(|i| (p_len + (past + i).saturating_sub(pad)) as u32)
                        .collect()
                })
                .collect();
            self.rope.gather(&positions)?
        };
        // Several new tokens on the CPU: the fused attention op (no score tensors, skipped masked
        // blocks). One token per sequence (decoding): the decode kernel, which reads the shared
        // prefix and the caches in place (it has no backward, so the training path keeps the
        // composed ops).
        let cpu_kernels = crate::cpu_kernel::supported(&self.device, self.dtype);
        let masking = if t > 1 && cpu_kernels {
            Masking::Fused(Arc::new(match packed {
                Some(segments) => Visibility::packed(segments, t),
                None => Visibility::causal(&pads, past, t),
            }))
        } else if t == 1 && cpu_kernels && path == Path::Infer && packed.is_none() {
            Masking::Decode(pads.clone())
        } else {
            Masking::Additive(match packed {
                Some(segments) => Some(self.packed_mask(segments, t)?),
                None => self.mask(&pads, past, t)?,
            })
        };

        let mut x = x;
        let mut kvs = Vec::new();
        let n_layers = self.layers.len();
        for (li, layer) in self.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps, path)?;
            let pl = prefix.and_then(|p| p.attention_layer(li));
            let (attn, k, v, q) = self.attention(
                layer,
                &h,
                pl,
                cache.as_deref_mut().map(|c| (c, li)),
                (&cos, &sin),
                &masking,
                path,
            )?;
            if collect_kv {
                kvs.push((k, v));
            }
            if let Some(qs) = queries.as_deref_mut() {
                qs.push(q);
            }
            x = (x + attn)?;
            if li + 1 == n_layers && logits == Logits::None {
                // Only K/V were asked for: the last MLP cannot change them.
                break;
            }
            let h = ops::rms_norm(&x, &layer.post_norm, cfg.rms_norm_eps, path)?;
            let gate = layer.gate.forward(&h, path)?;
            let up = layer.up.forward(&h, path)?;
            x = (x + layer.down.forward(&ops::swiglu(&gate, &up)?, path)?)?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        let out = match logits {
            Logits::None => None,
            Logits::All => {
                let h = ops::rms_norm(&x, &self.norm, cfg.rms_norm_eps, path)?;
                Some(self.lm_head.forward(&h, path)?)
            }
            Logits::Hidden => Some(ops::rms_norm(&x, &self.norm, cfg.rms_norm_eps, path)?),
            Logits::Last => {
                let last = x.narrow(1, t - 1, 1)?;
                let h = ops::rms_norm(&last, &self.norm, cfg.rms_norm_eps, path)?;
                let l = self.lm_head.forward(&h, path)?;
                Some(l.squeeze(1)?)
            }
        };
        Ok((out, kvs))
    }

    /// The dtype attention scores and their softmax are computed in: f32 for half-precision
    /// models (a bf16 exponential summed over thousands of keys loses the small weights),
    /// otherwise the model's own.
    fn score_dtype(&self) -> DType {
        match self.dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        }
    }

    /// Additive mask `[b, 1, 1, t, past + t]` over the cache part (the prefix is always visible),
    /// or `None` when nothing is masked (one new token, no padding).
    fn mask(&self, pads: &[usize], past: usize, t: usize) -> Result<Option<Tensor>> {
        let b = pads.len();
        if t == 1 && pads.iter().all(|&p| p == 0) {
            return Ok(None);
        }
        let total = past + t;
        let mut m = vec![0f32; b * t * total];
        for (bi, &pad) in pads.iter().enumerate() {
            for i in 0..t {
                let q = past + i;
                let row = &mut m[(bi * t + i) * total..(bi * t + i + 1) * total];
                for (j, cell) in row.iter_mut().enumerate() {
                    // Causal, and padding invisible — except a slot to itself, so that no softmax
                    // row is empty (a pad query's output is never read).
                    let visible = j <= q && (j >= pad || j == q);
                    if !visible {
                        *cell = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let m =
            Tensor::from_vec(m, (b, 1, 1, t, total), &self.device)?.to_dtype(self.score_dtype())?;
        Ok(Some(m))
    }

    /// Additive block-diagonal causal mask `[b, 1, 1, t, t]` of packed rows: a token sees the
    /// earlier tokens of its own segment; padding sees only itself (its output is never read).
    fn packed_mask(&self, segments: &[Vec<usize>], t: usize) -> Result<Tensor> {
        let b = segments.len();
        let mut m = vec![f32::NEG_INFINITY; b * t * t];
        for (bi, segs) in segments.iter().enumerate() {
            let row = &mut m[bi * t * t..(bi + 1) * t * t];
            let mut start = 0;
            for &len in segs {
                for i in start..start + len {
                    row[i * t + start..=i * t + i].fill(0.0);
                }
                start += len;
            }
            for i in start..t {
                row[i * t + i] = 0.0;
            }
        }
        let m = Tensor::from_vec(m, (b, 1, 1, t, t), &self.device)?.to_dtype(self.score_dtype())?;
        Ok(m)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        prefix: Option<PrefixLayer<'_>>,
        cache: Option<(&mut KvCache, usize)>,
        (cos, sin): (&Tensor, &Tensor),
        masking: &Masking,
        path: Path,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim);
        let g = h / kvh;
        let q = layer.q.forward(x, path)?.reshape((b, t, h, d))?;
        let k = layer.k.forward(x, path)?.reshape((b, t, kvh, d))?;
        let v = layer
            .v
            .forward(x, path)?
            .reshape((b, t, kvh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        // The norms are over each head's `d` values, so they apply before the move to heads-first.
        let (q, k) = match (&layer.q_norm, &layer.k_norm) {
            (Some(qn), Some(kn)) => (
                ops::rms_norm(&q, qn, cfg.rms_norm_eps, path)?,
                ops::rms_norm(&k, kn, cfg.rms_norm_eps, path)?,
            ),
            _ => (q, k),
        };
        // Scale the queries (t*d values) rather than the scores (t*(P+T) values).
        let q = ops::rope_heads_first(&q, cos, sin, 1.0 / (d as f64).sqrt(), path)?;
        let k = ops::rope_heads_first(&k, cos, sin, 1.0, path)?;
        // Query heads of one KV head are adjacent: [b, h, t, d] == [b, kv, g*t, d], rows (g, t).
        let qg = q.reshape((b, kvh, g * t, d))?;

        let (kc, vc) = match cache {
            Some((c, li)) => c.append(li, &k, &v)?,
            None => (k.clone(), v.clone()),
        };
        let mask = match masking {
            Masking::Fused(vis) => {
                let out = attention::attention(&qg, prefix, &kc, &vc, vis)?
                    .reshape((b, h, t, d))?
                    .transpose(1, 2)?
                    .reshape((b, t, h * d))?;
                return Ok((layer.o.forward(&out, path)?, k, v, qg));
            }
            Masking::Decode(pads) => {
                let out = decode_attention::decode_attention(&qg, prefix, &kc, &vc, pads)?
                    .reshape((b, t, h * d))?;
                return Ok((layer.o.forward(&out, path)?, k, v, qg));
            }
            Masking::Additive(mask) => mask.as_ref(),
        };
        let tc = kc.dim(2)?;
        let acc = self.score_dtype();
        let sc = qg.matmul(&kc.t()?)?.to_dtype(acc)?;
        let sc = match mask {
            Some(m) => {
                sc.reshape((b, kvh, g, t, tc))?
                    .broadcast_add(m)?
                    .reshape((b, kvh, g * t, tc))?
            }
            None => sc,
        };
        let mut max = sc.max_keepdim(D::Minus1)?;

        // Prefix scores in a [kv, b, g*t, P] layout: one 3-D matmul per KV head against the
        // shared [kv, P, d] prefix, whatever the batch size.
        let sp = match prefix {
            Some(PrefixLayer { k: kp, bias, .. }) => {
                let pl = kp.dim(1)?;
                let qp = qg
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((kvh, b * g * t, d))?;
                let sp = qp
                    .matmul(&kp.t()?)?
                    .to_dtype(acc)?
                    .reshape((kvh, b, g * t, pl))?;
                let sp = match bias {
                    Some(bias) => {
                        sp.broadcast_add(&bias.to_dtype(acc)?.reshape((kvh, 1, 1, pl))?)?
                    }
                    None => sp,
                };
                max = max.maximum(&sp.max_keepdim(D::Minus1)?.transpose(0, 1)?)?;
                Some(sp)
            }
            None => None,
        };
        // One softmax over prefix ++ cache: a common shift (a constant for the gradient, hence
        // detached), exponentials of both parts, one denominator.
        let max = max.detach();
        // In half precision the probabilities go back to the model's dtype for the matmul with
        // V; the denominator and the division stay in the score dtype.
        let dt = self.dtype;
        let ec = sc.broadcast_sub(&max)?.exp()?;
        let mut num = ec.to_dtype(dt)?.matmul(&vc)?.to_dtype(acc)?;
        let mut den = ec.sum_keepdim(D::Minus1)?;
        if let (Some(sp), Some(PrefixLayer { v: vp, .. })) = (sp, prefix) {
            let pl = vp.dim(1)?;
            let ep = sp.broadcast_sub(&max.transpose(0, 1)?)?.exp()?;
            let np = ep
                .to_dtype(dt)?
                .reshape((kvh, b * g * t, pl))?
                .matmul(vp)?
                .to_dtype(acc)?
                .reshape((kvh, b, g * t, d))?
                .transpose(0, 1)?;
            let dp = ep.sum_keepdim(D::Minus1)?.transpose(0, 1)?;
            num = (num + np)?;
            den = (den + dp)?;
        }
        let out = num.broadcast_div(&den)?.to_dtype(dt)?;
        let out = out
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        Ok((layer.o.forward(&out, path)?, k, v, qg))
    }
}
