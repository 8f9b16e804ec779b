//! Time one training step (forward + backward + Adam of the cartridge) on the default model:
//! `cargo run --release -p cartridge-compiler --example step_time -- [p] [batch] [seq_len] [steps]`
//! (defaults 256, 4, 256, 4). Every token is a target with a random top-20, as in distillation.
//! The last line is a JSON summary (median step after the first, tokens/s, peak RSS) that
//! `scripts/bench_train.py` reads.

use std::time::Instant;

use candle_core::{Device, Tensor};
use cartridge_compiler::data::Example;
use cartridge_compiler::objective::{loss_sum, Batch};
use cartridge_compiler::params::{KvParams, Params};
use cartridge_compiler::{Adam, AdamParams, Objective};
use cartridge_runtime::{loader, Path};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    cartridge_runtime::ops::pin_thread_count();
    cartridge_runtime::malloc::keep_freed_memory();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (p, b, t, steps) = (arg(0, 256), arg(1, 4), arg(2, 256), arg(3, 4));
    let loaded = loader::load_default(&Device::Cpu)?;
    let net = loaded.transformer()?;
    let vocab = net.config().vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(0);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
    let init = net.prefix_kv(None, &ids(p))?;
    let examples: Vec<Example> = (0..b)
        .map(|_| Example {
            tokens: ids(t),
            rows: (0..t as u32).collect(),
            next: vec![0; t],
            topk_ids: ids(t * 20),
            topk_logprobs: vec![-3.0; t * 20],
            k: 20,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = Batch::new(&refs, Objective::Distill, &Device::Cpu)?;
    let params = Params::Kv(KvParams::new(&init, 1)?);
    let vars = params.vars();
    let mut adam = Adam::new(vars.clone(), AdamParams::default())?;
    println!("p={p} batch={b}x{t} on {}", loaded.path.display());
    let mut times = Vec::with_capacity(steps);
    for s in 0..steps {
        let t0 = Instant::now();
        let prefix = params.stack()?.resolve(&net, Path::Train)?;
        let loss = loss_sum(&net, prefix.as_ref(), &batch, Path::Train)?
            .affine(1.0 / batch.targets as f64, 0.0)?;
        let t1 = Instant::now();
        let store = loss.backward()?;
        let t2 = Instant::now();
        let grads: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| store.get(v.as_tensor()).cloned())
            .collect();
        adam.update(&grads, 2e-2)?;
        let total = t0.elapsed().as_secs_f64();
        times.push(total);
        println!(
            "step {s}: loss {:.4} forward {:.2} s backward {:.2} s total {:.2} s ({:.0} tokens/s)",
            loss.to_scalar::<f32>()?,
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            total,
            (b * t) as f64 / total
        );
    }
    // The first step pays first-touch page faults; a long-lived trainer pays them once.
    let mut counted = if times.len() > 1 {
        times[1..].to_vec()
    } else {
        times
    };
    counted.sort_by(f64::total_cmp);
    let median = counted.get(counted.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "{}",
        serde_json::json!({"p": p, "batch": b, "seq": t, "median_step_s": median,
            "tokens_per_s": (b * t) as f64 / median, "peak_rss_mb": peak_rss_mib()})
    );
    Ok(())
}

/// The process's peak resident set (VmHWM) in MiB, or NaN where /proc is missing.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
