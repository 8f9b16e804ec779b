//! Rough speed probe of the forward on a real model: prefill tokens/s, decode tokens/s at a few
//! batch sizes (with and without a cartridge), one training step (forward + backward into a
//! cartridge). Usage: `cargo run --release -p cartridge-runtime --example forward_speed [MODEL]`
//! (default: the fetched SmolLM2 GGUF). `FORWARD_SPEED=prefill|decode|decode-cases|train` runs one
//! part.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use cartridge_runtime::generate::{
    generate_batch, BatchOptions, Control, GenerateRequest, SamplingParams,
};
use cartridge_runtime::{loader, Logits, Path, PrefixKv, Transformer};

fn main() -> anyhow::Result<()> {
    cartridge_runtime::ops::pin_thread_count();
    cartridge_runtime::malloc::keep_freed_memory();
    // `FORWARD_SPEED=decode` runs only the batch-1 decode, `prefill` only the prefills (for
    // profiling and A/B runs).
    let only_prefill = std::env::var("FORWARD_SPEED").is_ok_and(|v| v == "prefill");
    let only_decode = std::env::var("FORWARD_SPEED").is_ok_and(|v| v == "decode");
    let only_train = std::env::var("FORWARD_SPEED").is_ok_and(|v| v == "train");
    // `decode-cases`: only the decode table (batch 1/8/32, no prefix / cartridge / context).
    let only_cases = std::env::var("FORWARD_SPEED").is_ok_and(|v| v == "decode-cases");
    let arg = std::env::args().nth(1).map(std::path::PathBuf::from);
    let path = loader::resolve_model_path(arg.as_deref())?;
    let dev = Device::Cpu;
    let m = loader::load(&path, &dev)?;
    let net = Transformer::load(m.var_builder(), &m.config)?;
    let vocab = m.config.vocab_size as u32;
    let toks = |n: usize, s: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 7919 + s * 104729) % (vocab - 10) + 5)
            .collect()
    };

    if only_decode {
        let req = GenerateRequest {
            prompt: toks(8, 1),
            sampling: SamplingParams::greedy(),
            max_tokens: 200,
            stop_tokens: vec![],
            top_logprobs: 0,
        };
        let t = Instant::now();
        generate_batch(&net, None, &[req], &BatchOptions::default(), |_, _| {
            Control::Continue
        })?;
        println!(
            "decode 200 tokens: {:.1} tok/s",
            200.0 / t.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let sizes = if only_prefill {
        vec![512usize, 2048, 512, 2048]
    } else {
        vec![512, 2048]
    };
    for n in sizes.into_iter().filter(|_| !only_train && !only_cases) {
        let ids = Tensor::from_vec(toks(n, 1), (1, n), &dev)?;
        let mut cache = net.new_cache(1);
        let t = Instant::now();
        net.forward(None, Some(&mut cache), &ids, Logits::Last, Path::Infer)?;
        let s = t.elapsed().as_secs_f64();
        println!("prefill {n}: {:.2} s, {:.0} tok/s", s, n as f64 / s);
    }
    if only_prefill {
        return Ok(());
    }
    let cart = net.prefix_kv(None, &toks(256, 2))?;
    let ctx = net.prefix_kv(None, &toks(if only_train { 8 } else { 2048 }, 3))?;
    let cases = if only_train {
        vec![]
    } else {
        vec![
            ("no prefix", None),
            ("cartridge 256", Some(&cart)),
            ("context 2048", Some(&ctx)),
        ]
    };
    for (name, prefix) in cases {
        for b in [1usize, 8, 32] {
            let reqs: Vec<GenerateRequest> = (0..b)
                .map(|i| GenerateRequest {
                    prompt: toks(8, 10 + i as u32),
                    sampling: SamplingParams::greedy(),
                    max_tokens: 32,
                    stop_tokens: vec![],
                    top_logprobs: 0,
                })
                .collect();
            let t = Instant::now();
            let mut n = 0usize;
            generate_batch(&net, prefix, &reqs, &BatchOptions::default(), |_, _| {
                n += 1;
                Control::Continue
            })?;
            let s = t.elapsed().as_secs_f64();
            println!(
                "decode {name} batch {b}: {n} tokens in {s:.2} s, {:.1} tok/s (incl. prefill of 8)",
                n as f64 / s
            );
        }
    }
    if only_cases {
        return Ok(());
    }
    // One training step's forward + backward into a 256-slot cartridge, 4 x 256 tokens.
    let vars: Vec<(Var, Var)> = cart
        .layers()
        .iter()
        .map(|(k, v)| Ok((Var::from_tensor(k)?, Var::from_tensor(v)?)))
        .collect::<candle_core::Result<_>>()?;
    let prefix = PrefixKv::new(
        vars.iter()
            .map(|(k, v)| (k.as_tensor().clone(), v.as_tensor().clone()))
            .collect(),
    )?;
    let ids = Tensor::from_vec(toks(4 * 256, 5), (4, 256), &dev)?;
    for step in 0..2 {
        let t = Instant::now();
        let logits = net.forward(Some(&prefix), None, &ids, Logits::All, Path::Train)?;
        let lsm = cartridge_runtime::ops::log_softmax_last_dim(&logits)?;
        let loss = lsm.mean_all()?;
        let f = t.elapsed().as_secs_f64();
        let _g = loss.backward()?;
        println!(
            "train step {step}: forward {f:.2} s, total {:.2} s",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
