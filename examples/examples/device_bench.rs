//! Speed on one device (a GPU, or the CPU for a smoke run): the figures issue #8 asks for, with
//! the device's own limits measured in the same run.
//!
//! ```text
//! scripts/build-cuda.sh build-example device_bench      # or, on CPU:
//! cargo run --release -p cartridge-examples --example device_bench -- --device cpu --scale smoke
//! ```
//!
//! Flags: `--device cpu|cuda[:N]` (default cpu), `--scale full|smoke` (default full),
//! `--models smollm2-135m,llama-1b` (full scale only; smoke uses a tiny model), `--dtype f32|bf16`
//! (default bf16 off the CPU, f32 on it), `--out FILE.jsonl` (append every row there too).
//!
//! Rows, one JSON object per line on stdout (`scripts/bench_gpu.py` prints the same rows for
//! PyTorch on the same shapes, and `scripts/gpu-check.sh` puts the two side by side):
//! - `matmul`: an n x n x n product in the compute dtype (the device's matmul rate);
//! - `bandwidth`: a device-to-device copy, bytes read + written per second;
//! - `train`: one distillation step (forward after a trainable KV prefix of `p` slots, top-20 loss
//!   at every token, backward to the prefix, Adam), batch 16 x 1024, f32 master parameters cast to
//!   the compute dtype inside the graph — the trainer's own code path;
//! - `decode`: greedy decoding of 64 tokens for a batch of 8-token prompts after a shared prefix:
//!   a 512-slot cartridge vs 4096 tokens of context (ICL), batch 1 / 32 / 128;
//! - `synth`: self-study's answer role: 64 requests after one shared 1024-token chunk, 128 tokens
//!   each, greedy, the top-20 log-probabilities recorded at every token.
//!
//! The models have random weights of the real shapes (SmolLM2-135M and Llama-3.2-1B): speed does
//! not depend on the values, and the benchmark then needs no download. Each `train` row carries
//! the model FLOPs per token and the share of the measured matmul rate it reaches; each `decode`
//! row the tokens/s that reading the weights and KV once per step at the measured bandwidth allows.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use cartridge_compiler::data::Example;
use cartridge_compiler::objective::Batch;
use cartridge_compiler::params::{KvParams, Params};
use cartridge_compiler::{step_gradients, Adam, AdamParams, Objective};
use cartridge_runtime::generate::{
    generate_batch, BatchOptions, Control, GenerateRequest, SamplingParams,
};
use cartridge_runtime::models::{Architecture, ModelConfig};
use cartridge_runtime::{device, PrefixKv, Transformer};
use serde_json::{json, Value};

/// Shapes of one run.
struct Scale {
    matmul_n: usize,
    copy_bytes: usize,
    train_ps: [usize; 2],
    train_batch: usize,
    train_seq: usize,
    train_steps: (usize, usize),
    decode_prefixes: [(&'static str, usize); 2],
    decode_batches: [usize; 3],
    decode_tokens: usize,
    synth: (usize, usize, usize),
}

const FULL: Scale = Scale {
    matmul_n: 8192,
    copy_bytes: 1 << 30,
    train_ps: [512, 2048],
    train_batch: 16,
    train_seq: 1024,
    train_steps: (2, 5),
    decode_prefixes: [("cartridge", 512), ("icl", 4096)],
    decode_batches: [1, 32, 128],
    decode_tokens: 64,
    synth: (1024, 64, 128),
};

const SMOKE: Scale = Scale {
    matmul_n: 256,
    copy_bytes: 16 << 20,
    train_ps: [16, 64],
    train_batch: 2,
    train_seq: 32,
    train_steps: (1, 2),
    decode_prefixes: [("cartridge", 16), ("icl", 128)],
    decode_batches: [1, 4, 8],
    decode_tokens: 8,
    synth: (64, 8, 8),
};

/// The model shapes the benchmark knows (random weights).
fn model_config(name: &str) -> Result<ModelConfig> {
    // (vocab, hidden, inter, layers, heads, kv_heads, head_dim, rope theta)
    let (vocab, hidden, inter, layers, heads, kv, d, theta) = match name {
        "smollm2-135m" => (49152, 576, 1536, 30, 9, 3, 64, 100_000.0),
        "llama-1b" => (128_256, 2048, 8192, 16, 32, 8, 64, 500_000.0),
        "tiny" => (512, 64, 128, 2, 4, 2, 16, 10_000.0),
        other => bail!("unknown model {other:?} (smollm2-135m, llama-1b)"),
    };
    Ok(ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_attention_heads: heads,
        num_kv_heads: kv,
        head_dim: d,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    })
}

/// Hands out random weights of whatever shape the model asks for: N(0, 0.02) for matrices, ones
/// for the RMSNorm gains (so activations keep a sane scale through the layers).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if name.ends_with("norm.weight") {
            Tensor::ones(s, dtype, dev)
        } else {
            Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
        }
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: random weights need a shape")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

struct Args {
    device: String,
    scale: &'static Scale,
    smoke: bool,
    models: Vec<String>,
    dtype: Option<DType>,
    out: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        device: "cpu".into(),
        scale: &FULL,
        smoke: false,
        models: vec!["smollm2-135m".into(), "llama-1b".into()],
        dtype: None,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => a.device = value()?,
            "--scale" => match value()?.as_str() {
                "full" => (a.scale, a.smoke) = (&FULL, false),
                "smoke" => (a.scale, a.smoke) = (&SMOKE, true),
                s => bail!("--scale {s}: expected full or smoke"),
            },
            "--models" => a.models = value()?.split(',').map(str::to_string).collect(),
            "--dtype" => {
                a.dtype = Some(match value()?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    s => bail!("--dtype {s}: expected f32 or bf16"),
                })
            }
            "--out" => a.out = Some(value()?.into()),
            "-h" | "--help" => {
                println!("see the top of examples/examples/device_bench.rs");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see examples/examples/device_bench.rs)"),
        }
    }
    if a.smoke {
        a.models = vec!["tiny".into()];
    }
    Ok(a)
}

/// Prints rows and appends them to the `--out` file.
struct Report {
    out: Option<std::fs::File>,
    base: Value,
}

impl Report {
    fn row(&mut self, mut row: Value) -> Result<()> {
        if let (Value::Object(r), Value::Object(b)) = (&mut row, &self.base) {
            for (k, v) in b {
                r.entry(k.clone()).or_insert(v.clone());
            }
        }
        let line = row.to_string();
        println!("{line}");
        if let Some(f) = &mut self.out {
            use std::io::Write;
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let spec = device::parse(&args.device)?;
    let dev = spec.open()?;
    let dtype = args.dtype.unwrap_or(if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    });
    let name = match &dev {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        _ => args.device.clone(),
    };
    let out = match &args.out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("{}", p.display()))?,
        ),
        None => None,
    };
    let mut report = Report {
        out,
        base: json!({"impl": "cartridge", "device": name, "dtype": dtype_name(dtype)}),
    };
    let s = args.scale;

    let tflops = matmul_rate(&dev, dtype, s.matmul_n)?;
    report.row(json!({"bench": "matmul", "n": s.matmul_n, "seconds": 2.0 * (s.matmul_n as f64).powi(3) / tflops / 1e12, "tflops": tflops}))?;
    let gbps = copy_bandwidth(&dev, s.copy_bytes)?;
    report.row(json!({"bench": "bandwidth", "bytes": 2 * s.copy_bytes, "seconds": 2.0 * s.copy_bytes as f64 / gbps / 1e9, "gb_per_s": gbps}))?;

    for model in &args.models {
        let cfg = model_config(model)?;
        eprintln!("{model}: random weights, {}", dtype_name(dtype));
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, dev.clone());
        let net = Transformer::load(vb, &cfg)?;
        for &p in &s.train_ps {
            let mut row = train_row(&net, p, s, tflops)?;
            row["model"] = json!(model);
            report.row(row)?;
        }
        for &(kind, prefix_tokens) in &s.decode_prefixes {
            let prefix = net.prefix_kv(None, &random_ids(&cfg, prefix_tokens, 1))?;
            for &b in &s.decode_batches {
                let (secs, tokens) = decode(&net, &prefix, b, s.decode_tokens, 0)?;
                let limit = decode_limit(&cfg, dtype, prefix_tokens, b, s.decode_tokens, gbps);
                report.row(json!({"bench": "decode", "model": model, "prefix": kind,
                    "prefix_tokens": prefix_tokens, "batch": b, "new_tokens": s.decode_tokens,
                    "seconds": secs, "tokens_per_s": tokens as f64 / secs,
                    "limit_tokens_per_s": limit}))?;
            }
        }
        let (chunk, b, n) = s.synth;
        let prefix = net.prefix_kv(None, &random_ids(&cfg, chunk, 2))?;
        let (secs, tokens) = decode(&net, &prefix, b, n, 20)?;
        report.row(
            json!({"bench": "synth", "model": model, "chunk_tokens": chunk, "batch": b,
            "new_tokens": n, "top_k": 20, "seconds": secs, "tokens_per_s": tokens as f64 / secs}),
        )?;
    }
    Ok(())
}

/// Deterministic token ids in `2..vocab` (no model here has special-token behaviour).
fn random_ids(cfg: &ModelConfig, n: usize, seed: u64) -> Vec<u32> {
    let v = cfg.vocab_size as u64 - 2;
    (0..n as u64)
        .map(|i| ((i * 7919 + seed * 104_729 + (i * i) % 977) % v + 2) as u32)
        .collect()
}

/// Mean seconds of `f` over `timed` runs after `warm` runs; `f` must leave nothing queued.
fn time_it(
    dev: &Device,
    warm: usize,
    timed: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    dev.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..timed {
        f()?;
    }
    dev.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() / timed as f64)
}

/// Median seconds of `f` over `timed` runs after `warm` runs, each run synchronised (training
/// steps: long enough that per-step timing is exact, and the median ignores a stray slow step).
fn median_step(
    dev: &Device,
    warm: usize,
    timed: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    let mut secs = Vec::with_capacity(timed);
    for _ in 0..timed {
        dev.synchronize()?;
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        secs.push(t0.elapsed().as_secs_f64());
    }
    secs.sort_by(f64::total_cmp);
    Ok(secs[secs.len() / 2])
}

/// TFLOP/s of an n x n x n matmul in `dtype`.
fn matmul_rate(dev: &Device, dtype: DType, n: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let secs = time_it(dev, 3, 10, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / secs / 1e12)
}

/// GB/s (read + write) of copying `bytes` bytes on the device into a preallocated buffer (no
/// allocation inside the timing: candle's CUDA backend has no caching allocator).
fn copy_bandwidth(dev: &Device, bytes: usize) -> Result<f64> {
    let src = Tensor::ones(bytes / 4, DType::F32, dev)?;
    let dst = Tensor::zeros(bytes / 4, DType::F32, dev)?;
    let secs = time_it(dev, 3, 10, || {
        dst.slice_set(&src, 0, 0)?;
        Ok(())
    })?;
    Ok(2.0 * bytes as f64 / secs / 1e9)
}

/// Forward FLOPs per training token after a prefix of `p` (matmuls only: projections, MLP, LM
/// head, and attention scores + weighted values over `p` plus on average half the sequence).
fn flops_per_token(cfg: &ModelConfig, p: usize, seq: usize) -> f64 {
    let (h, q, kv) = (
        cfg.hidden_size as f64,
        (cfg.num_attention_heads * cfg.head_dim) as f64,
        (cfg.num_kv_heads * cfg.head_dim) as f64,
    );
    let per_layer = h * (2.0 * q + 2.0 * kv) + 3.0 * h * cfg.intermediate_size as f64;
    let linear = per_layer * cfg.num_layers as f64 + h * cfg.vocab_size as f64;
    let attention = 2.0 * q * (p as f64 + seq as f64 / 2.0) * cfg.num_layers as f64;
    2.0 * (linear + attention)
}

/// One training step as the trainer runs it (micro-batches accumulated), timed; halves the
/// micro-batch when the device runs out of memory.
fn train_row(net: &Transformer, p: usize, s: &Scale, tflops: f64) -> Result<Value> {
    let cfg = net.config();
    let (b, t) = (s.train_batch, s.train_seq);
    let init = net
        .prefix_kv(None, &random_ids(cfg, p, 3))?
        .to_dtype(DType::F32)?;
    let params = Params::Kv(KvParams::new(&init, 1)?);
    let mut adam = Adam::new(params.vars(), AdamParams::default())?;
    let examples: Vec<Example> = (0..b)
        .map(|i| Example {
            tokens: random_ids(cfg, t, 10 + i as u64),
            rows: (0..t as u32).collect(),
            next: vec![0; t],
            topk_ids: random_ids(cfg, t * 20, 100 + i as u64),
            topk_logprobs: vec![-3.0; t * 20],
            k: 20,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let mut micro = b;
    loop {
        let mut last_loss = 0f64;
        let mut step = || -> Result<()> {
            let batches = refs
                .chunks(micro)
                .map(|c| Batch::new(c, Objective::Distill, net.device()));
            let (grads, loss, _) = step_gradients(net, &params, batches, b * t)?;
            adam.update(&grads, 2e-2)?;
            last_loss = loss;
            Ok(())
        };
        let (warm, timed) = s.train_steps;
        match median_step(net.device(), warm, timed, &mut step) {
            Ok(secs) => {
                let fpt = flops_per_token(cfg, p, t);
                // Training = forward + backward to the activations (no weight gradients): about
                // twice the forward's FLOPs.
                let achieved = 2.0 * fpt * (b * t) as f64 / secs / 1e12;
                return Ok(json!({"bench": "train", "p": p, "batch": b, "seq": t,
                    "micro_batch": micro, "step_s": secs, "tokens_per_s": (b * t) as f64 / secs,
                    "loss": last_loss, "flops_per_token": 2.0 * fpt,
                    "share_of_matmul_rate": achieved / tflops}));
            }
            Err(e) if micro > 1 && e.to_string().to_lowercase().contains("out of memory") => {
                eprintln!("train p={p}: out of memory at micro-batch {micro}, halving");
                micro /= 2;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Greedy decoding of `new_tokens` for `batch` distinct 8-token prompts after `prefix`, with the
/// top-`top_k` log-probabilities at every token when `top_k > 0`: (mean seconds, tokens).
fn decode(
    net: &Transformer,
    prefix: &PrefixKv,
    batch: usize,
    new_tokens: usize,
    top_k: usize,
) -> Result<(f64, usize)> {
    let cfg = net.config();
    let reqs: Vec<GenerateRequest> = (0..batch)
        .map(|i| GenerateRequest {
            prompt: random_ids(cfg, 8, 1000 + i as u64),
            sampling: SamplingParams::greedy(),
            max_tokens: new_tokens,
            stop_tokens: vec![],
            top_logprobs: top_k,
        })
        .collect();
    let mut tokens = 0;
    let secs = time_it(net.device(), 1, 3, || {
        tokens = 0;
        generate_batch(
            net,
            Some(prefix),
            &reqs,
            &BatchOptions::default(),
            |_, _| {
                tokens += 1;
                Control::Continue
            },
        )?;
        Ok(())
    })?;
    Ok((secs, tokens))
}

/// Tokens/s if each decode step read every weight once, the shared prefix once and each
/// sequence's own KV once, at `gbps`.
fn decode_limit(
    cfg: &ModelConfig,
    dtype: DType,
    prefix: usize,
    batch: usize,
    new_tokens: usize,
    gbps: f64,
) -> f64 {
    let el = dtype.size_in_bytes() as f64;
    let (h, q, kv) = (
        cfg.hidden_size as f64,
        (cfg.num_attention_heads * cfg.head_dim) as f64,
        (cfg.num_kv_heads * cfg.head_dim) as f64,
    );
    let per_layer = h * (2.0 * q + 2.0 * kv) + 3.0 * h * cfg.intermediate_size as f64;
    let weights = (per_layer * cfg.num_layers as f64 + h * cfg.vocab_size as f64) * el;
    let kv_per_token = 2.0 * kv * cfg.num_layers as f64 * el;
    // Own KV: the 8-token prompt plus on average half the generated tokens.
    let own = 8.0 + new_tokens as f64 / 2.0;
    let bytes = weights + kv_per_token * (prefix as f64 + batch as f64 * own);
    batch as f64 * gbps * 1e9 / bytes
}
