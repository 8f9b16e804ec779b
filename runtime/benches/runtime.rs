//! Runtime speed on the default model (SmolLM2-135M, f32, CPU), next to the physical limits of
//! this machine measured in the same run. Prints one JSON object; `scripts/bench_runtime.py` runs
//! it next to PyTorch + transformers and writes the table for BENCHMARKS.md.
//!
//! `cargo bench -p cartridge-runtime --bench runtime` (needs `scripts/fetch-model.sh`).
//!
//! Figures: prefill tokens/s at 512 and 2048 tokens; decode tokens/s at batch 1, 8, 32 with no
//! prefix, a 256-token cartridge and 2048 tokens of context; time to first token with the
//! cartridge vs prefilling the 2048-token context; f32 matmul rate and memory read bandwidth.

use std::hint::black_box;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use cartridge_runtime::{loader, Logits, Path, Transformer};
use serde_json::json;

/// Deterministic token ids away from the special tokens.
fn tokens(n: usize, seed: u32, vocab: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| {
            (i.wrapping_mul(7919)
                .wrapping_add(seed.wrapping_mul(104_729)))
                % (vocab - 200)
                + 100
        })
        .collect()
}

fn best_of<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// f32 GFLOP/s of one large matmul with the shapes of an MLP projection (candle, all threads).
fn matmul_gflops(dev: &Device) -> candle_core::Result<f64> {
    let (m, k, n) = (2048usize, 576usize, 1536usize);
    let a = Tensor::randn(0f32, 1.0, (m, k), dev)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), dev)?;
    a.matmul(&b)?;
    let s = best_of(5, || a.matmul(&b).map(|t| t.dims().len()));
    Ok(2.0 * (m * k * n) as f64 / s / 1e9)
}

/// Memory read bandwidth (GB/s): summing a 1 GiB buffer on two threads.
fn read_bandwidth() -> f64 {
    let data = vec![1u64; (1usize << 30) / 8];
    let sum = |chunk: &[u64]| {
        let mut acc = [0u64; 8];
        for c in chunk.chunks_exact(8) {
            for i in 0..8 {
                acc[i] = acc[i].wrapping_add(c[i]);
            }
        }
        acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
    };
    let half = data.len() / 2;
    let run = || {
        std::thread::scope(|s| {
            let h = s.spawn(|| sum(&data[..half]));
            let b = sum(&data[half..]);
            h.join().unwrap_or(0).wrapping_add(b)
        })
    };
    run();
    let s = best_of(5, run);
    (data.len() * 8) as f64 / s / 1e9
}

fn main() -> anyhow::Result<()> {
    cartridge_runtime::ops::pin_thread_count();
    cartridge_runtime::malloc::keep_freed_memory();
    let dev = Device::Cpu;
    let path = loader::resolve_model_path(None)?;
    let m = loader::load(&path, &dev)?;
    let net = Transformer::load(m.var_builder(), &m.config)?;
    let qnet = m.quantized_transformer()?;
    let cfg = m.config.clone();
    let vocab = cfg.vocab_size as u32;

    let gflops = matmul_gflops(&dev)?;
    let bandwidth = read_bandwidth();

    // Parameter counts for the limits.
    let kv_dim = cfg.num_kv_heads * cfg.head_dim;
    let per_layer = cfg.hidden_size * cfg.hidden_size * 2 // q, o
        + cfg.hidden_size * kv_dim * 2 // k, v
        + 3 * cfg.hidden_size * cfg.intermediate_size; // gate, up, down
    let linear = (per_layer * cfg.num_layers) as f64;
    let head = (cfg.vocab_size * cfg.hidden_size) as f64;
    let attn_flops = |ctx: f64| {
        4.0 * cfg.num_layers as f64 * (cfg.num_attention_heads * cfg.head_dim) as f64 * ctx
    };
    let kv_bytes_per_token = (cfg.num_layers * 2 * kv_dim * 4) as f64;

    let mut prefill = Vec::new();
    for n in [512usize, 2048] {
        let ids = Tensor::from_vec(tokens(n, 1, vocab), (1, n), &dev)?;
        let s = best_of(2, || {
            let mut cache = net.new_cache(1);
            net.forward(None, Some(&mut cache), &ids, Logits::Last, Path::Infer)
                .map(|t| t.dims().len())
        });
        let flops_per_token = 2.0 * linear + attn_flops(n as f64 / 2.0);
        prefill.push(json!({
            "tokens": n,
            "seconds": s,
            "tokens_per_s": n as f64 / s,
            "limit_tokens_per_s": gflops * 1e9 / flops_per_token,
        }));
    }

    let cart = net.prefix_kv(None, &tokens(256, 2, vocab))?;
    let context = net.prefix_kv(None, &tokens(2048, 3, vocab))?;
    let prompt_len = 16usize;
    let steps = 16usize;
    let mut decode = Vec::new();
    for (name, weights, net, prefix, ctx) in [
        ("none", "f32", &net, None, 0usize),
        ("cartridge_256", "f32", &net, Some(&cart), 256),
        ("context_2048", "f32", &net, Some(&context), 2048),
        ("none", "quantized", &qnet, None, 0usize),
    ] {
        for b in [1usize, 8, 32] {
            let grid: Vec<u32> = (0..b)
                .flat_map(|i| tokens(prompt_len, 10 + i as u32, vocab))
                .collect();
            let ids = Tensor::from_vec(grid, (b, prompt_len), &dev)?;
            let mut best = f64::INFINITY;
            for _ in 0..2 {
                let mut cache = net.new_cache(b);
                let mut logits =
                    net.forward(prefix, Some(&mut cache), &ids, Logits::Last, Path::Infer)?;
                let t = Instant::now();
                for _ in 0..steps {
                    let next = logits.argmax(1)?.to_dtype(DType::U32)?.reshape((b, 1))?;
                    logits =
                        net.forward(prefix, Some(&mut cache), &next, Logits::Last, Path::Infer)?;
                }
                black_box(logits.dims().len());
                best = best.min(t.elapsed().as_secs_f64());
            }
            let avg_ctx = (ctx + prompt_len + steps / 2) as f64;
            // Per step: every weight once (the prefix KV is shared by the batch; the per-sequence
            // cache is read per sequence), and the FLOPs of b tokens.
            let bytes = (linear + head) * 4.0
                + kv_bytes_per_token * (ctx as f64 + b as f64 * (prompt_len + steps / 2) as f64);
            let flops = b as f64 * (2.0 * (linear + head) + attn_flops(avg_ctx));
            // Quantised weights: Q8_0 after re-quantisation, 8.5 bits per weight.
            let bytes = if weights == "f32" {
                bytes
            } else {
                bytes - (linear + head) * (4.0 - 8.5 / 8.0)
            };
            let step_limit = (bytes / (bandwidth * 1e9)).max(flops / (gflops * 1e9));
            decode.push(json!({
                "prefix": name,
                "weights": weights,
                "batch": b,
                "tokens_per_s": (b * steps) as f64 / best,
                "limit_tokens_per_s": b as f64 / step_limit,
            }));
        }
    }

    // Time to first token: a 16-token question after the cartridge vs after prefilling the context.
    let q = Tensor::from_vec(tokens(prompt_len, 99, vocab), (1, prompt_len), &dev)?;
    let ttft_cart = best_of(3, || {
        net.forward(Some(&cart), None, &q, Logits::Last, Path::Infer)
            .map(|t| t.dims().len())
    });
    let full: Vec<u32> = tokens(2048, 3, vocab)
        .into_iter()
        .chain(tokens(prompt_len, 99, vocab))
        .collect();
    let full = Tensor::from_vec(full, (1, 2048 + prompt_len), &dev)?;
    let ttft_icl = best_of(2, || {
        net.forward(None, None, &full, Logits::Last, Path::Infer)
            .map(|t| t.dims().len())
    });

    let out = json!({
        "model": path.display().to_string(),
        "dtype": "f32",
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "matmul_gflops": gflops,
        "read_bandwidth_gbs": bandwidth,
        "prefill": prefill,
        "decode": decode,
        "ttft": {
            "cartridge_256_s": ttft_cart,
            "icl_2048_s": ttft_icl,
            "speedup": ttft_icl / ttft_cart,
        },
        "kv_bytes": {
            "cartridge_256": 256.0 * kv_bytes_per_token,
            "context_2048": 2048.0 * kv_bytes_per_token,
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
